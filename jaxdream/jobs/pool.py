"""The job's workers: how many, what each asks for, starting them, asking whether they are up,
and burying the dead.

Workers are long-lived Ray actors (:class:`DreamWorker`), one per GPU, per TPU host, or per
CPU-only node (:func:`plan_workers`). Each loads the model once and renders unit after unit
through :func:`jaxdream.render.render_items`, which writes every PNG straight to the output
folder atomically. Ray restarts an actor lost with its node (``max_restarts``); the pool learns
that it is back by probing it. ``ray.util.ActorPool`` is not used: it keeps one call in flight
per actor (a worker here holds two units, so it never idles while the next one crosses the
network) and it hands work to an actor whatever its state, where a lost worker must get none
until it answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from jaxdream.errors import JobError

if TYPE_CHECKING:
    from jaxdream.config import JobConfig, JobSettings
    from jaxdream.render import Outcome, WorkItem


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """How many workers to start and what each asks the cluster for."""

    count: int
    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float]
    platform: str  #: JAX_PLATFORMS for the workers: "cpu", "cuda" or "tpu"

    def describe(self) -> str:
        asks = [f"{self.num_cpus:g} CPU"]
        if self.num_gpus:
            asks.append(f"{self.num_gpus:g} GPU")
        asks += [f"{amount:g} {name}" for name, amount in self.resources.items()]
        return f"{self.count} {self.platform} worker(s), each {' + '.join(asks)}"


def plan_workers(settings: JobSettings, cluster: Mapping[str, float],
                 node_resources: Sequence[Mapping[str, float]], units: int) -> WorkerPlan:
    """Workers for a cluster with ``cluster`` resources in all, nodes with ``node_resources``.

    One worker per TPU host (holding all of its chips), else one per ``gpus_per_worker`` GPUs
    (1 when the cluster has GPUs and the config says nothing), else one per CPU node;
    ``workers`` in the config sets the count instead. Never more workers than ``units``: each
    worker loads the model and traces its own programs.

    One worker per CPU node, not per CPU, because XLA already spreads one program over all of
    a machine's cores: on 2 cores, 2 workers dreamed 32 photos 0.8x as fast as 1
    (benchmarks/ray_overhead.py), each paying for its own tracing and sharing the cores.
    """
    tpu_hosts = [node.get("TPU", 0.0) for node in node_resources if node.get("TPU", 0.0) > 0]
    gpus = settings.gpus_per_worker
    resources: dict[str, float] = {}
    if tpu_hosts and not gpus:
        resources["TPU"] = min(tpu_hosts)
        count, gpus, platform = settings.workers or len(tpu_hosts), 0.0, "tpu"
    else:
        if gpus is None:
            gpus = 1.0 if cluster.get("GPU", 0.0) > 0 else 0.0
        if gpus > 0:
            count = settings.workers or max(1, math.floor(cluster.get("GPU", 0.0) / gpus))
            platform = "cuda"
        else:
            cpu_nodes = [node for node in node_resources
                         if node.get("CPU", 0.0) >= settings.cpus_per_worker]
            count = settings.workers or max(1, len(cpu_nodes))
            platform = "cpu"
    return WorkerPlan(count=max(1, min(count, units)), num_cpus=float(settings.cpus_per_worker),
                      num_gpus=float(gpus), resources=resources, platform=platform)


def worker_env(platform: str, cpus: float = 1.0) -> dict[str, str]:
    """The JAX environment of a worker process, set explicitly rather than inherited.

    ``JAX_PLATFORMS`` pins the backend, so a CPU worker on a GPU node never grabs the GPU and
    a GPU worker fails loudly instead of falling back to the CPU. Preallocation is off: JAX
    would otherwise take 75% of the GPU's memory at start, which breaks workers that share a
    GPU (``gpus_per_worker`` below 1) and leaves nothing to anything else on the device.
    Programs are built ahead, and the tile engine dreams images at once, by as many threads
    as the worker has CPUs (at most 4), not as the node has: several workers share a node
    (the driver's own ``JAXDREAM_COMPILE_AHEAD`` and ``JAXDREAM_TILE_WORKERS`` win).
    """
    from jaxdream.engine import COMPILE_AHEAD_ENV, builders_for
    from jaxdream.tiles import TILE_WORKERS_ENV

    env = {"JAX_PLATFORMS": platform, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TF_CPP_MIN_LOG_LEVEL": "1"}
    for name in (COMPILE_AHEAD_ENV, TILE_WORKERS_ENV):
        env[name] = os.environ.get(name, "").strip() or str(builders_for(cpus))
    return env


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What a worker sends back for one unit: plain data, one outcome per item."""

    outcomes: list[Outcome]
    worker: str  #: host:pid
    node: str  #: the Ray node id
    seconds: float
    programs: int
    compile_seconds: float


class DreamWorker:
    """A Ray actor that renders units of work; it lives for the whole job.

    The model is loaded when the actor starts, and compiled programs stay in the process
    (and in the on-disk compilation cache), so each worker pays for them once.
    """

    def __init__(self, cwd: str, model: str, weights: str | None,
                 batch_size: int | None, shards: str = "") -> None:
        # Relative paths in a config mean the driver's working directory. On a cluster whose
        # nodes share that folder it exists here too; otherwise (a working_dir runtime
        # environment) the worker's own copy of the project is the right place.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        from jaxdream import heap
        from jaxdream.engine import use_disk_cache
        from jaxdream.models import load_model

        heap.set_up()  # XLA's scratch memory reused, Python's collector run less often
        use_disk_cache()  # a read-only home slows a worker down, it does not stop it
        import jax

        self.weights = weights
        self.batch_size = batch_size
        #: The output folder or prefix when outputs are tar shards (one per unit), else "".
        self.shards = shards
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()
        self.platform = jax.default_backend()
        self.devices = jax.local_device_count()
        load_model(model, weights)

    def ready(self) -> dict[str, Any]:
        return {"worker": self.name, "node": self.node, "platform": self.platform,
                "devices": self.devices}

    def render(self, items: Sequence[WorkItem]) -> UnitResult:
        from jaxdream.render import render_items

        start = time.perf_counter()
        reports = []

        def run(sink: Any = None) -> list[Outcome]:
            # Every item sent here is to be (re)rendered: the driver already skipped the
            # finished ones, and an existing output is the leftover of an earlier attempt.
            reports.append(render_items(items, weights=self.weights, batch_size=self.batch_size,
                                        overwrite=True, progress=False,
                                        report=lambda line: None, sink=sink))
            return reports[-1].outcomes

        if self.shards:  # the unit's PNGs go into one tar shard, written whole
            from jaxdream.jobs.tarout import render_unit

            outcomes = render_unit(items, self.shards, run)
        else:
            outcomes = run()
        stats = reports[-1].compile_stats
        return UnitResult(outcomes, self.name, self.node, time.perf_counter() - start,
                          stats.programs, stats.seconds)


def connect(address: str | None) -> bool:
    """Joins the cluster at ``address`` or starts a private Ray instance on this machine.

    Returns True when this call started Ray (so the caller must shut it down). A process that
    is already connected (a test, a notebook) keeps its connection.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        with warnings.catch_warnings():
            # Ray starts its processes with subprocess (fork immediately followed by exec),
            # which JAX's warning about forking a multithreaded process does not concern.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                    category=RuntimeWarning)
            if address:
                _check_reachable(address)
                ray.init(address=address, **options)
            else:
                # "local" never joins a cluster that happens to run on this machine: a job
                # without an address is private, and uses this machine's cores (and GPUs).
                ray.init(address="local", include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise JobError(f"cannot connect to {where}: "
                       f"{' '.join(str(error).split()) or type(error).__name__}") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fails fast on a ``host:port`` nobody listens on (``ray.init`` retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://...": Ray resolves these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {address} "
                              f"({error.strerror or type(error).__name__})") from None


@dataclasses.dataclass
class Worker:
    """One worker actor as the driver sees it."""

    handle: Any
    state: str = "starting"  # starting -> ready; restarting after a loss; dead when gone
    inflight: int = 0
    name: str = ""
    probing: bool = False  #: a readiness probe is in flight
    probe_at: float | None = None  #: when to probe a restarting worker again


class WorkerPool:
    """The workers of one job and the readiness probes in flight."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        #: Object reference of a readiness probe -> its worker.
        self.probes: dict[Any, Worker] = {}
        self.last_death = "every worker died"
        self.last_ready = time.monotonic()

    def start(self, plan: WorkerPlan, config: JobConfig, retries: int) -> None:
        """Starts ``plan.count`` workers for ``config`` and probes each."""
        weights = (os.path.abspath(config.weights) if config.weights
                   and os.path.exists(config.weights) else config.weights)
        actor = ray.remote(DreamWorker).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=dict(plan.resources),
            # A restart is how a worker lost with its node comes back elsewhere; the units it
            # held are retried by the scheduler, never re-run by Ray behind its back (so each
            # attempt is counted, and a unit goes to whichever worker is free first).
            max_restarts=retries, max_task_retries=0,
            # Across nodes where possible: one node's loss then takes few workers with it.
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": worker_env(plan.platform, plan.num_cpus)})
        shards = (config.output_url or str(config.output)) if config.output_shards else ""
        for _ in range(plan.count):
            worker = Worker(actor.remote(os.getcwd(), config.model, weights,
                                         config.job.batch_size, shards))
            self.workers.append(worker)
            self.probe(worker)

    def probe(self, worker: Worker) -> None:
        """Asks a worker whether it is up; the answer comes once it is (Ray queues the call
        while the actor starts or restarts)."""
        worker.probing, worker.probe_at = True, None
        self.probes[worker.handle.ready.remote()] = worker

    def reprobe(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.probe_at is not None and worker.probe_at <= now and not worker.probing:
                self.probe(worker)

    def answered(self, ref: Any) -> None:
        """Takes the answer to a probe: the worker is ready, restarting, or dead."""
        worker = self.probes.pop(ref)
        worker.probing = False
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as error:
            self.bury(worker, error)
            return
        except ray.exceptions.RayActorError:
            # Unavailable for now (restarting after its node died): ask again in a moment.
            worker.state, worker.probe_at = "restarting", time.monotonic() + 1.0
            return
        except ray.exceptions.RayError as error:
            self.bury(worker, error)
            return
        worker.state, worker.name = "ready", info["worker"]
        self.last_ready = time.monotonic()

    def lost(self, worker: Worker, error: BaseException) -> None:
        """A call to ``worker`` failed because the actor (or its node) went away."""
        if isinstance(error, ray.exceptions.ActorDiedError):
            self.bury(worker, error)
        elif worker.state == "ready":
            worker.state = "restarting"  # no more units until a probe says it is back
            if not worker.probing:
                self.probe(worker)

    def bury(self, worker: Worker, error: BaseException) -> None:
        if worker.state != "dead":
            worker.state = "dead"
            worker.name = worker.name or "worker"
            self.last_death = reason(error)

    def ready(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.state == "ready"]

    def all_dead(self) -> bool:
        return all(worker.state == "dead" for worker in self.workers)

    def stop(self) -> None:
        """Ends every worker of the job (they would otherwise live as long as the driver)."""
        for worker in self.workers:
            try:
                ray.kill(worker.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor already gone is what we want
                pass


def reason(error: BaseException) -> str:
    """A Ray error as one short line: its cause when it has one, else its first line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(error, ray.exceptions.RayActorError):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(error).__name__}: {error}"
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
