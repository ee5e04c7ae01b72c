"""Running a job to the end: plan (as a stream), resume, connect, schedule, sheets and
gallery."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from tqdm import tqdm

from jaxdream.errors import JaxdreamError
from jaxdream.files import clean_temporaries, display
from jaxdream.jobs.manifest import (
    MANIFEST_NAME, ManifestWriter, compact_manifest, finished_keys, item_key, make_row,
    read_manifest, unreadable_id,
)
from jaxdream.jobs.pool import connect
from jaxdream.jobs.scheduler import WORKER_WAIT_S, JobSummary, Scheduler

if TYPE_CHECKING:
    from jaxdream.config import JobConfig
    from jaxdream.render import Outcome, WorkItem



def run_job(config: JobConfig, *, address: str | None = None, resume: bool = False,
            progress: bool = True, say: Callable[[str], None] | None = None,
            on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
            worker_wait_s: float = WORKER_WAIT_S, force: bool = False) -> JobSummary:
    """Runs a job config to the end and returns what it did.

    Per-item problems (a bad image, a failed write) are rows with a reason, never exceptions.
    Raises ConfigError for a bad config (before anything starts: every input entry is opened
    before the first item is planned, then listed while the job runs) and
    JobError when the job as a whole cannot go on (no cluster, no worker, an unwritable
    manifest); in every case the outputs already written are complete and the manifest lists
    them, so ``resume`` finishes the job. ``on_rows`` sees each batch of manifest rows once it
    is on disk. Units are sent as the inputs are listed (:mod:`jaxdream.planning`).

    The output folder is locked for the whole job: a second job on it raises OutputBusy naming
    this one. ``force`` allows the filesystem root or the home folder as the output; for an
    object-store prefix it takes over the prefix's lock, whoever holds it.
    """
    from jaxdream.outdir import claim, refuse_dangerous
    from jaxdream.planning import plan_stream

    if config.output_url:  # an object-store prefix: no folder, the manifest in parts
        from jaxdream.jobs.remote import run_remote_job

        return run_remote_job(config, address=address, resume=resume, progress=progress,
                              say=say, on_rows=on_rows, worker_wait_s=worker_wait_s,
                              force=force)
    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    refuse_dangerous(config.output, force=force)
    if config.motion is not None:  # an animate: or video: job: clips, see .clips
        from jaxdream.jobs.clips import run_motion_job

        with claim(config.output, "jaxdream run", force=force):
            return run_motion_job(config, address=address, resume=resume, progress=progress,
                                  say=say, worker_wait_s=worker_wait_s)
    start = time.perf_counter()
    planned = plan_stream(config)
    with claim(config.output, "jaxdream run", force=force):
        return _run_locked(config, planned, address=address, resume=resume,
                           progress=progress, say=say, on_rows=on_rows,
                           worker_wait_s=worker_wait_s, start=start)


def _run_locked(config: JobConfig, planned: Iterable[WorkItem | Outcome], *,
                address: str | None, resume: bool, progress: bool, say: Callable[[str], None],
                on_rows: Callable[[list[dict[str, Any]]], None] | None,
                worker_wait_s: float, start: float) -> JobSummary:
    """:func:`run_job` once the output folder is locked."""
    outdir = config.output
    summary = JobSummary(manifest=outdir / MANIFEST_NAME)
    # Every entry is opened before anything is written: a config error leaves no trace.
    planned = iter(planned)
    first = next(planned, None)
    planned = itertools.chain([first] if first is not None else [], planned)
    finished = finished_keys(summary.manifest, outdir) if resume else set()
    items: list[WorkItem] = []  # for the contact sheets and the gallery
    writer = ManifestWriter(summary.manifest, outdir)
    try:
        intake = Intake(planned, finished, writer, summary, outdir, say=say, resume=resume,
                        keep=items)
        schedule(config, intake, writer, summary, address=address, say=say,
                 progress=progress, on_rows=on_rows, worker_wait_s=worker_wait_s)
        clean_temporaries(item.output for item in items)
    finally:
        writer.close()
    try:  # each item's last row is what counts; keep one, so the manifest reads simply
        compact_manifest(summary.manifest, outdir)
    except (OSError, JaxdreamError) as error:
        say(f"error: {summary.manifest}: cannot tidy the manifest: {display(str(error))}")
        summary.problems += 1
    if config.output_shards:  # tar shards: their index and a summary page, no thumbnails
        summary.problems += _shard_index(config, summary.manifest, say)
    else:
        summary.problems += _sheets_and_gallery(config, items, summary.manifest, say)
    summary.seconds = time.perf_counter() - start
    return summary


class Intake:
    """The plan, as the scheduler takes it: items still to do. On the way it counts what was
    planned, leaves out what ``finished`` holds (``--resume``: (id, output) keys, see
    :func:`jaxdream.jobs.manifest.item_key`), and writes a failed row for each input that
    could not be planned (in batches: a row lost with a killed driver is planned again)."""

    #: Failed rows written at a time.
    BATCH = 512

    def __init__(self, planned: Iterable[WorkItem | Outcome],
                 finished: Container[tuple[str, str]],
                 writer: Any, summary: JobSummary, outdir: Path, *,
                 say: Callable[[str], None], resume: bool,
                 keep: list[WorkItem] | None = None,
                 on_item: Callable[[tuple[str, str]], None] | None = None) -> None:
        self.planned, self.finished, self.writer = planned, finished, writer
        self.summary, self.outdir, self.say, self.resume = summary, outdir, say, resume
        self.keep, self.on_item = keep, on_item
        self.failures: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[WorkItem]:
        from jaxdream.render import Outcome

        items = 0
        for planned in self.planned:
            self.summary.planned += 1
            if isinstance(planned, Outcome):
                self._failed(planned)
                continue
            items += 1
            if self.keep is not None:
                self.keep.append(planned)
            key = item_key(planned, self.outdir)
            if self.on_item is not None:
                self.on_item(key)
            if key in self.finished:
                self.summary.already_done += 1
            else:
                yield planned
        self._flush()
        if self.resume:
            self.say(f"resuming: {self.summary.already_done} of {items} item(s) already done")

    def _failed(self, outcome: Outcome) -> None:
        row = make_row(None, outcome, unreadable_id(outcome.input), self.outdir)
        self.say(f"error: {display(row['error'])}")
        self.summary.failed += 1
        self.failures.append(row)
        if len(self.failures) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        rows, self.failures = self.failures, []
        self.writer.append(rows)


def schedule(config: JobConfig, todo: Iterable[WorkItem], writer: Any, summary: JobSummary,
             *, address: str | None, say: Callable[[str], None], progress: bool,
             on_rows: Callable[[list[dict[str, Any]]], None] | None,
             worker_wait_s: float) -> None:
    """Renders ``todo`` (an :class:`Intake`, or any iterable of items) on Ray workers,
    connecting (or starting a private Ray) only when there is work, rows into ``writer``."""
    source = iter(todo)
    first = next(source, None)  # plans until the first item to do, or the end of the plan
    if first is None:
        return
    started = connect(address)
    scheduler: Scheduler | None = None
    try:
        scheduler = Scheduler(config, itertools.chain([first], source), writer, summary,
                              say=say, progress=progress, on_rows=on_rows,
                              worker_wait_s=worker_wait_s)
        scheduler.run()
    finally:
        if scheduler is not None:
            scheduler.stop()
        if started:
            ray.shutdown()


def _shard_index(config: JobConfig, manifest: Path, say: Callable[[str], None]) -> int:
    """``shards/index.json`` and ``index.html`` for tar-shard outputs (:mod:`.tarout`), from
    the compacted manifest; returns how many ``error:`` lines a problem here cost."""
    from jaxdream.jobs.tarout import finish_shards, write_summary

    try:
        rows = read_manifest(manifest)
        counts = finish_shards(str(config.output), rows)
        write_summary(str(config.output), f"jaxdream: {config.source}", rows, counts)
    except (JaxdreamError, OSError) as error:
        say(f"error: shard index not written: {display(str(error))}")
        return 1
    return 0


def _sheets_and_gallery(config: JobConfig, items: Sequence[WorkItem], manifest: Path,
                        say: Callable[[str], None]) -> int:
    """Contact sheets (for a grid) and index.html from what the manifest records (failed
    inputs included); returns how many ``error:`` lines a problem here cost. The outputs are
    safe either way, but the exit status must show it."""
    from jaxdream.gallery import sheets_and_gallery
    from jaxdream.render import Outcome

    try:
        rows = read_manifest(manifest)
    except (JaxdreamError, OSError) as error:
        say(f"error: gallery not written: {display(str(error))}")
        return 1
    outcomes = [Outcome(row["input"], config.output / row["output"] if row.get("output")
                        else None, row["status"], row.get("error") or "", row["id"])
                for row in rows if isinstance(row.get("id"), str)]
    errors = 0

    def counting(line: str) -> None:
        nonlocal errors
        errors += line.startswith("error:")
        say(line)

    sheets_and_gallery(config, items, outcomes, report=counting)
    return errors
