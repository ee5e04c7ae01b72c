"""``jaxdream run`` for a config with ``animate:`` or ``video:``: clips, with a manifest.

Each input becomes a clip: ``OUTDIR/<stem>.<format>`` with its frames in
``OUTDIR/<stem>_frames/`` (``format: png``: the frame folder is the output). A video is cut
into segments (one task each), an animation is one task; :mod:`.motion` sends the tasks to the
workers. The manifest gets one row per finished segment (``kind: segment``, ``frames: [first,
end]``, ``folder``: the frame folder) and one per finished clip once it is encoded (``kind:
clip``), with the same columns as a still's; ``output`` is always a file (a segment's last
frame, the clip, or a PNG folder's ``animation.json``). ``--resume`` skips a clip whose clip
row is done and a segment whose row is, as long as their frames (and output) exist; anything
else is dreamed again from its first missing frame. Without ``--resume`` a job starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from jaxdream.errors import JaxdreamError, JobError
from jaxdream.files import display, output_folder
from jaxdream.jobs.manifest import MANIFEST_NAME, ManifestWriter, read_manifest, unreadable_id
from jaxdream.jobs.motion import Task, TaskResult, run_tasks, start_pool
from jaxdream.jobs.pool import connect
from jaxdream.jobs.scheduler import WORKER_WAIT_S, JobSummary

if TYPE_CHECKING:
    from jaxdream.config import JobConfig


@dataclasses.dataclass
class Clip:
    """One input's clip: where it goes, what it is, and its tasks."""

    input: str
    output: Path  #: the encoded clip, or the frame folder for format png
    folder: Path
    id: str
    frames: int
    fps: Any
    params: dict[str, Any]  #: the clip's whole recipe (animation.json's identity)
    audio_from: str | None
    tasks: list[Task] = dataclasses.field(default_factory=list)
    left: int = 0  #: tasks not finished yet
    failed: bool = False
    complete: bool = False  #: encoded and recorded

    @property
    def record(self) -> Path:
        """The file a clip row names: the encoded clip, or a PNG folder's animation.json
        (rows name files, so that every manifest reader can check that they exist)."""
        from jaxdream.motion.common import ANIMATION_FILE

        return self.output if self.output != self.folder else self.folder / ANIMATION_FILE

    def last_frame(self, frames: tuple[int, int]) -> Path:
        """The file a segment row names: the segment's last frame."""
        from jaxdream.motion.videoio import frame_name

        return self.folder / frame_name(frames[1] - 1)


def _digest(path: str, max_file_bytes: int) -> str:
    from jaxdream.render import _file_sha256

    return _file_sha256(path, max_file_bytes)


def _plan_clip(config: JobConfig, path: str, stem: str, weights_sha256: str,
               resume: bool) -> Clip:
    """The clip of one input, its frame folder prepared (checked against the frames already
    there on resume, emptied otherwise); raises JaxdreamError for an input that cannot be."""
    from jaxdream.motion import animate as anim
    from jaxdream.motion import video as vid
    from jaxdream.motion.common import DreamSchedules, frames_folder, prepare_folder
    from jaxdream.motion.schedules import MOTION_KEYS, Schedule
    from jaxdream.motion.videoio import probe_video

    motion = config.motion
    assert motion is not None
    suffix = "" if motion.format == "png" else f".{motion.format}"
    output = config.output / f"{stem}{suffix}"
    folder = frames_folder(output)
    dream = DreamSchedules(config.variants[0].recipe, motion.dream, motion.layer_weights)
    digest = _digest(path, config.max_file_bytes)
    if motion.kind == "video":
        info = probe_video(path, config.max_pixels)
        video = vid.VideoDream(
            dream, blend=motion.values.get("blend", Schedule.constant(vid.DEFAULT_BLEND)),
            independent=motion.independent, use_flow=motion.flow,
            refresh=vid.DEFAULT_REFRESH if motion.refresh is None else motion.refresh)
        identity = video.identity(info, digest, weights_sha256)
        segments = vid.plan_segments(info.frames, motion.segments,
                                     0 if motion.independent else motion.warmup)
        frames, fps, audio = info.frames, info.fps, path
    else:
        animation = anim.Animation(
            dream, frames=motion.frames or anim.DEFAULT_FRAMES,
            fps=motion.fps or anim.DEFAULT_FPS,
            motion={key: s for key, s in motion.values.items() if key in MOTION_KEYS})
        identity = animation.identity(digest, weights_sha256)
        frames, fps, audio = animation.frames, animation.fps, None
    prepare_folder(folder, identity, {"frames": frames, "input": Path(path).name},
                   overwrite=not resume)
    clip_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()
                             ).hexdigest()[:32]
    clip = Clip(path, output, folder, clip_id, frames, fps, identity, audio)
    if motion.kind == "video":
        clip.tasks = [Task((clip, f"{clip_id}-{s.first:06d}-{s.end:06d}-{s.warm:06d}",
                            (s.first, s.end)), "segment",
                           (info, s, video, str(folder), digest)) for s in segments]
    else:
        clip.tasks = [Task((clip, clip_id, (0, frames)), "animate",
                           (animation, os.path.abspath(path), str(folder)))]
    return clip


def _row(clip: Clip, id_: str, output: Path | None, frames: tuple[int, int], status: str,
         outdir: Path, *, kind: str, error: str = "", result: TaskResult | None = None,
         attempt: int = 1) -> dict[str, Any]:
    """A manifest row with the columns of a still's, plus ``kind``, ``folder`` and ``frames``."""
    import datetime

    return {"id": id_, "input": clip.input,
            "output": None if output is None else os.path.relpath(output, outdir),
            "status": status, "error": error, "params": clip.params, "point": {},
            "seconds": round(result.seconds, 4) if result else 0.0,
            "worker": result.worker if result else "", "node": result.node if result else "",
            "attempt": attempt, "kind": kind, "folder": os.path.relpath(clip.folder, outdir),
            "frames": list(frames),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")}


def _finished(row: Mapping[str, Any], outdir: Path) -> bool:
    """A row says done and what it records is all there: its output and its frames."""
    from jaxdream.motion.videoio import frame_name

    frames, folder = row.get("frames"), row.get("folder")
    if (row.get("status") != "done" or not isinstance(row.get("output"), str)
            or not isinstance(folder, str) or not isinstance(frames, list) or len(frames) != 2
            or not all(isinstance(t, int) for t in frames)):
        return False
    return (outdir / row["output"]).is_file() and all(
        (outdir / folder / frame_name(t)).is_file() for t in range(frames[0], frames[1]))


def _encode(clip: Clip) -> None:
    from jaxdream.images import load_rgb
    from jaxdream.motion.videoio import frame_name, write_gif, write_mp4

    frames = (load_rgb(clip.folder / frame_name(t)) for t in range(clip.frames))
    if clip.output.suffix == ".mp4":
        write_mp4(clip.output, frames, clip.fps, audio_from=clip.audio_from)
    elif clip.output.suffix == ".gif":
        write_gif(clip.output, frames, float(clip.fps))


class _Job:
    """The driver's bookkeeping: rows as tasks finish, clips encoded as they complete."""

    def __init__(self, outdir: Path, writer: ManifestWriter, summary: JobSummary,
                 say: Callable[[str], None], progress: bool) -> None:
        self.outdir, self.writer, self.summary = outdir, writer, summary
        self.say, self.progress = say, progress

    def done(self, task: Task, result: TaskResult) -> None:
        clip, id_, frames = task.key
        kind = "segment" if task.method == "segment" else "clip"
        if kind == "clip":  # an animation: encode before its row says it is done
            self.finish(clip, id_, result, task.attempts + 1)
        else:
            self.writer.append([_row(clip, id_, clip.last_frame(frames), frames, "done",
                                     self.outdir,
                                     kind=kind, result=result, attempt=task.attempts + 1)])
        self.summary.done += 1
        clip.left -= 1
        if self.progress:
            self.say(f"{display(clip.input)}: frames {frames[0] + 1}-{frames[1]} dreamed by "
                     f"{result.worker} in {result.seconds:.1f} s")
        if clip.left == 0 and kind == "segment":
            self.finish(clip, clip.id)

    def failed(self, task: Task, why: str) -> None:
        clip, id_, frames = task.key
        clip.failed = True
        clip.left -= 1
        why = why if why.startswith(clip.input) else f"{clip.input}: {why}"
        self.writer.append([_row(clip, id_, None, frames, "failed", self.outdir,
                                 kind="segment" if task.method == "segment" else "clip",
                                 error=why, attempt=task.attempts + 1)])
        self.summary.failed += 1
        self.say(f"error: {display(why)}")

    def finish(self, clip: Clip, id_: str, result: TaskResult | None = None,
               attempt: int = 1) -> None:
        """Encodes a clip whose frames are all there and records it."""
        try:
            _encode(clip)
        except (JaxdreamError, OSError) as error:
            why = f"{clip.output}: cannot encode the clip: {error}"
            self.writer.append([_row(clip, id_, None, (0, clip.frames), "failed", self.outdir,
                                     kind="clip", error=why)])
            self.summary.failed += 1
            self.say(f"error: {display(why)}")
            return
        self.writer.append([_row(clip, id_, clip.record, (0, clip.frames), "done",
                                 self.outdir, kind="clip", result=result, attempt=attempt)])
        clip.complete = True
        self.say(f"{display(clip.output)}: {clip.frames} frame(s)")


# long: plan, resume, run, encode the rest: the order of a job, read top to bottom
def run_motion_job(config: JobConfig, *, address: str | None = None, resume: bool = False,
                   progress: bool = True, say: Callable[[str], None] | None = None,
                   worker_wait_s: float = WORKER_WAIT_S) -> JobSummary:
    """Runs an ``animate:`` or ``video:`` config to the end (see the module's docstring).

    An input that cannot be read or probed is a failed row, never an exception; JobError
    when the job as a whole cannot go on (no cluster, an unwritable manifest)."""
    from jaxdream.inputs import expand_inputs
    from jaxdream.models import weights_sha256
    from jaxdream.render import output_stems

    say = say or (lambda line: print(line, file=sys.stderr))
    start = time.perf_counter()
    outdir = output_folder(config.output, JobError)
    inputs = expand_inputs(config.inputs, source=f"{config.source}: inputs")
    weights = weights_sha256(config.model, config.weights)
    summary = JobSummary(manifest=outdir / MANIFEST_NAME)
    before = {(row["id"], row["output"]): row for row in
              (read_manifest(summary.manifest) if resume else []) if _finished(row, outdir)}
    clips: list[Clip] = []
    failures: list[dict[str, Any]] = []
    for path, stem in zip(inputs, output_stems(inputs, outdir), strict=True):
        try:
            clips.append(_plan_clip(config, path, stem, weights, resume))
        except (JaxdreamError, OSError) as error:
            why = str(error) if str(error).startswith(path) else f"{path}: {error}"
            failures.append({"id": unreadable_id(path), "input": path, "output": None,
                             "status": "failed", "error": why, "kind": "clip"})
    todo: list[Task] = []
    for clip in clips:
        summary.planned += len(clip.tasks)
        row = before.get((clip.id, os.path.relpath(clip.record, outdir)))
        if row is not None:
            clip.complete = True
            summary.already_done += len(clip.tasks)
            continue
        for task in clip.tasks:
            row = before.get((task.key[1],
                              os.path.relpath(clip.last_frame(task.key[2]), outdir)))
            if row is not None and task.method == "segment":
                summary.already_done += 1
            else:
                todo.append(task)
                clip.left += 1
    summary.planned += len(failures)
    if resume:
        say(f"resuming: {summary.already_done} of {summary.planned} task(s) already done")
    writer = ManifestWriter(summary.manifest, outdir)
    job = _Job(outdir, writer, summary, say, progress)
    try:
        writer.append(failures)
        summary.failed += len(failures)
        for row in failures:
            say(f"error: {display(row['error'])}")
        for clip in clips:  # every segment recorded, the clip not encoded yet: encode it now
            if not clip.complete and clip.left == 0 and clip.tasks[0].method == "segment":
                job.finish(clip, clip.id)
        if todo:
            started = connect(address)
            pool = None
            try:
                pool, summary.workers = start_pool(config.job, config.variants[0].recipe,
                                                   config.weights, len(todo))
                summary.stopped, left = run_tasks(pool, todo, retries=config.job.retries,
                                                  on_done=job.done, on_failed=job.failed,
                                                  worker_wait_s=worker_wait_s)
                summary.not_run = len(left)
            finally:
                if pool is not None:
                    pool.stop()
                if started:
                    ray.shutdown()
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - start
    return summary
