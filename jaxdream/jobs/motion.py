"""Clips on Ray: video segments and animations dreamed by the job's workers.

A video is cut into segments (:func:`jaxdream.motion.video.plan_segments`); each segment is one
task, dreamed by whichever worker is free, starting ``warmup`` frames before its cut and
throwing those frames away, so its frames do not depend on which worker finished first (nor
on the other segments at all). An animation is one task (its frames depend on each other).
Workers write every frame atomically into the clip's frame folder as it finishes, so a task
lost with its worker, or a killed job, continues from the frames that exist.

The workers are long-lived actors (:class:`MotionWorker`) managed by the still job's
:class:`~jaxdream.jobs.pool.WorkerPool` (probes, restarts, the dead); this module only adds
the task loop. ``jaxdream run`` with an ``animate:`` or ``video:`` config goes through
:func:`run_motion_job` (manifest rows per segment and per finished clip, ``--resume`` skips
what they record); ``jaxdream video --ray`` through :func:`render_segments_on_ray`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from jaxdream.errors import JobError
from jaxdream.jobs.pool import Worker, WorkerPool, connect, plan_workers, reason, worker_env
from jaxdream.jobs.scheduler import WORKER_WAIT_S

if TYPE_CHECKING:
    from jaxdream.config import JobSettings
    from jaxdream.motion.animate import Animation
    from jaxdream.motion.video import Segment, VideoDream, VideoReport
    from jaxdream.motion.videoio import VideoInfo
    from jaxdream.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """What a worker sends back for one task."""

    rendered: int
    skipped: int
    cuts: list[int]
    seconds: float
    worker: str
    node: str


class MotionWorker:
    """A Ray actor that dreams segments and animations; it loads the model once."""

    def __init__(self, cwd: str, recipe: Recipe, weights: str | None,
                 batch_size: int | None) -> None:
        if os.path.isdir(cwd):  # relative paths in a config mean the driver's folder
            os.chdir(cwd)
        from jaxdream import heap
        from jaxdream.engine import use_disk_cache
        from jaxdream.motion.common import Engines

        heap.set_up()  # XLA's scratch memory reused, Python's collector run less often
        use_disk_cache()  # a read-only home slows a worker down, it does not stop it
        self.recipe = recipe
        self.engines = Engines.load(recipe, weights, batch_size)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> dict[str, Any]:
        return {"worker": self.name, "node": self.node}

    def segment(self, info: VideoInfo, segment: Segment, video: VideoDream, folder: str,
                input_sha256: str) -> TaskResult:
        from jaxdream.motion.video import render_segments

        start = time.perf_counter()
        report = render_segments(info, [segment], video, self.engines, Path(folder),
                                 input_sha256)
        return TaskResult(report.rendered, report.skipped, report.cuts,
                          time.perf_counter() - start, self.name, self.node)

    def animate(self, animation: Animation, path: str, folder: str) -> TaskResult:
        from jaxdream.images import load_rgb
        from jaxdream.motion.animate import animate_streams, open_stream

        start = time.perf_counter()
        image = load_rgb(path, max_side=self.recipe.max_side)
        stream = open_stream(animation, image, Path(folder), Path(path).name,
                             Path(path).read_bytes(), self.engines.model.weights_sha256)
        report = animate_streams([stream], self.engines)
        return TaskResult(report.rendered, report.skipped, [], time.perf_counter() - start,
                          self.name, self.node)


@dataclasses.dataclass
class Task:
    """One call to a worker: ``method`` with ``args``; ``attempts`` counts workers lost."""

    key: Any
    method: str
    args: tuple[Any, ...]
    attempts: int = 0


def start_pool(settings: JobSettings, recipe: Recipe, weights: str | None, tasks: int
               ) -> tuple[WorkerPool, str]:
    """Starts the workers a cluster allows for ``tasks`` tasks (as a still job plans them)
    and returns the pool and what was started, in words."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    plan = plan_workers(settings, ray.cluster_resources(), nodes, tasks)
    weights = os.path.abspath(weights) if weights and os.path.exists(weights) else weights
    actor = ray.remote(MotionWorker).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=dict(plan.resources),
        max_restarts=settings.retries, max_task_retries=0, scheduling_strategy="SPREAD",
        runtime_env={"env_vars": worker_env(plan.platform, plan.num_cpus)})
    pool = WorkerPool()
    for _ in range(plan.count):
        worker = Worker(actor.remote(os.getcwd(), recipe, weights, settings.batch_size))
        pool.workers.append(worker)
        pool.probe(worker)
    return pool, plan.describe()


def run_tasks(pool: WorkerPool, tasks: Sequence[Task], *, retries: int,
              on_done: Callable[[Task, TaskResult], None],
              on_failed: Callable[[Task, str], None],
              worker_wait_s: float = WORKER_WAIT_S) -> tuple[str, list[Task]]:
    """Sends each task to a free worker (one at a time: tasks are long, and a worker holding
    a second one while another idles would only lengthen the job), retries a task lost with
    its worker at most ``retries`` times, and reports every task to ``on_done`` or
    ``on_failed``. Returns why it stopped early ("" if it did not) and the tasks not run."""
    queue = collections.deque(tasks)
    pending: dict[Any, tuple[Worker, Task]] = {}
    stopped = ""
    while queue or pending:
        if stopped and not pending:
            break
        pool.reprobe()
        if not stopped:
            for worker in pool.ready():
                if worker.inflight == 0 and queue:
                    task = queue.popleft()
                    ref = getattr(worker.handle, task.method).remote(*task.args)
                    pending[ref] = (worker, task)
                    worker.inflight += 1
        if pending or pool.probes:
            done, _ = ray.wait([*pending, *pool.probes], num_returns=1, timeout=1.0)
        else:
            done = []
            time.sleep(0.2)
        for ref in done:
            if ref in pool.probes:
                pool.answered(ref)
                continue
            worker, task = pending.pop(ref)
            worker.inflight -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                on_failed(task, f"worker error: {reason(error)}")  # a retry would fail alike
                continue
            except ray.exceptions.RayError as error:  # the worker or its node went away
                pool.lost(worker, error)
                task.attempts += 1
                if task.attempts > retries:
                    on_failed(task, f"its worker died {task.attempts} time(s), retries "
                                    f"exhausted (last: {reason(error)})")
                else:
                    queue.appendleft(task)  # frames written so far are kept: it continues
                continue
            pool.last_ready = time.monotonic()
            on_done(task, result)
        if queue and not stopped:
            if pool.all_dead():
                stopped = f"no worker left (last: {pool.last_death})"
            elif not pool.ready() and time.monotonic() - pool.last_ready > worker_wait_s:
                stopped = (f"no worker was up for {worker_wait_s:.0f} s; does the cluster "
                           f"have the resources asked for?")
    return stopped, list(queue)


def render_segments_on_ray(info: VideoInfo, segments: Sequence[Segment], video: VideoDream,
                           folder: Path, input_sha256: str, settings: JobSettings, *,
                           weights: str | None = None, address: str | None = None,
                           say: Callable[[str], None] = lambda line: None) -> VideoReport:
    """What :func:`jaxdream.motion.video.render_segments` does, one segment per Ray task.

    Raises JobError when the cluster cannot be reached or a segment could not be dreamed;
    the frames written before are complete, and the same call continues from them.
    """
    from jaxdream.motion.video import VideoReport

    tasks = [Task(segment, "segment", (info, segment, video, str(folder), input_sha256))
             for segment in segments]
    results: list[TaskResult] = []
    failures: list[str] = []

    def done(task: Task, result: TaskResult) -> None:
        results.append(result)
        say(f"frames {task.key.first + 1}-{task.key.end} of {info.frames} dreamed by "
            f"{result.worker} in {result.seconds:.1f} s")

    started = connect(address)
    pool: WorkerPool | None = None
    try:
        pool, workers = start_pool(settings, video.dream.recipe, weights, len(tasks))
        say(f"{len(tasks)} segment(s) on {workers}")
        stopped, _ = run_tasks(pool, tasks, retries=settings.retries, on_done=done,
                               on_failed=lambda task, why: failures.append(why))
    finally:
        if pool is not None:
            pool.stop()
        if started:
            ray.shutdown()
    if failures or stopped:
        raise JobError(f"{info.path}: {failures[0] if failures else stopped}; the frames "
                       f"finished are kept, the same command continues from them")
    seconds = [r.seconds / max(r.rendered, 1) for r in results for _ in range(r.rendered)]
    return VideoReport(sum(r.rendered for r in results), sum(r.skipped for r in results),
                       seconds, f"programs in {workers}",
                       sorted({cut for r in results for cut in r.cuts}))

