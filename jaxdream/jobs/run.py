"""Running a job to the end: plan, resume, connect, schedule, sheets and gallery."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from tqdm import tqdm

from jaxdream.errors import JaxdreamError
from jaxdream.files import clean_temporaries, display
from jaxdream.jobs.manifest import (
    MANIFEST_NAME, ManifestWriter, compact_manifest, finished_rows, item_key, make_row,
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
    Raises ConfigError for a bad config (before anything starts) and JobError when the job as
    a whole cannot go on (no cluster, no worker, an unwritable manifest); in every case the
    outputs already written are complete and the manifest lists them, so ``resume`` finishes
    the job. ``on_rows`` sees each batch of manifest rows once it is on disk.

    The output folder is locked for the whole job: a second job on it raises OutputBusy naming
    this one. ``force`` allows the filesystem root or the home folder as the output; for an
    object-store prefix it takes over the prefix's lock, whoever holds it.
    """
    from jaxdream.outdir import claim, refuse_dangerous
    from jaxdream.render import plan_items

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
    items, unreadable = plan_items(config)
    with claim(config.output, "jaxdream run", force=force):
        return _run_locked(config, items, unreadable, address=address, resume=resume,
                           progress=progress, say=say, on_rows=on_rows,
                           worker_wait_s=worker_wait_s, start=start)


def _run_locked(config: JobConfig, items: list[WorkItem], unreadable: list[Outcome], *,
                address: str | None, resume: bool, progress: bool, say: Callable[[str], None],
                on_rows: Callable[[list[dict[str, Any]]], None] | None,
                worker_wait_s: float, start: float) -> JobSummary:
    """:func:`run_job` once the output folder is locked."""
    outdir = config.output
    summary = JobSummary(planned=len(items) + len(unreadable), manifest=outdir / MANIFEST_NAME)

    finished: dict[tuple[str, str], Mapping[str, Any]] = {}
    if resume:
        planned = {item_key(item, outdir) for item in items}
        finished = {key: row for key, row in
                    finished_rows(read_manifest(summary.manifest), outdir).items()
                    if key in planned}
        clean_temporaries(item.output for item in items)
    todo = [item for item in items if item_key(item, outdir) not in finished]
    summary.already_done = len(items) - len(todo)
    if resume:
        say(f"resuming: {summary.already_done} of {len(items)} item(s) already done")

    writer = ManifestWriter(summary.manifest, outdir)
    try:
        schedule(config, todo, unreadable, writer, summary, address=address, say=say,
                 progress=progress, on_rows=on_rows, worker_wait_s=worker_wait_s)
        clean_temporaries(item.output for item in todo)
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


def schedule(config: JobConfig, todo: Sequence[WorkItem], unreadable: Sequence[Outcome],
             writer: Any, summary: JobSummary, *, address: str | None,
             say: Callable[[str], None], progress: bool,
             on_rows: Callable[[list[dict[str, Any]]], None] | None,
             worker_wait_s: float) -> None:
    """Records the inputs that could not be read, then renders ``todo`` on Ray workers
    (connecting, or starting a private Ray, only when there is work), rows into ``writer``."""
    outdir = config.output
    failures = [make_row(None, outcome, unreadable_id(outcome.input), outdir)
                for outcome in unreadable]
    for row in failures:
        say(f"error: {display(row['error'])}")
    writer.append(failures)
    summary.failed += len(failures)
    if not todo:
        return
    started = connect(address)
    scheduler: Scheduler | None = None
    try:
        scheduler = Scheduler(config, list(todo), writer, summary, say=say, progress=progress,
                              on_rows=on_rows, worker_wait_s=worker_wait_s)
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
