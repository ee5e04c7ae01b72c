"""Running a job whose output is an object-store prefix (``output: s3://bucket/out``).

The same plan, units, workers and retries as :func:`jaxdream.jobs.run.run_job`; what differs
is where things are. Workers upload each PNG as one whole object under its deterministic name
(a retried unit PUTs the same bytes under the same name); the manifest is parts beside the
outputs (:mod:`.parts`), compacted into ``manifest.jsonl`` at the end; ``resume`` lists the
prefix once and reads the manifest from it (as a stream, keeping keys, not rows), so it works
from any machine that can read the prefix. Units go out as the inputs are listed. No node
needs a shared folder. Before anything renders, a small object is written and removed under
the prefix, so a missing bucket, wrong credentials or a forbidden prefix stop the job with one
line (ConfigError, exit status 2); then the prefix is locked (``PREFIX/.jaxdream.lock``,
created with a create-only PUT, see :mod:`jaxdream.outdir`), so that two drivers never compact
one manifest. Contact sheets and the gallery are not written for such outputs.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from jaxdream.jobs.manifest import MANIFEST_NAME
from jaxdream.jobs.parts import (PartsWriter, manifest_objects, read_remote_manifest,
                                 remote_finished_keys, remote_lines)
from jaxdream.jobs.run import Intake, schedule
from jaxdream.jobs.scheduler import WORKER_WAIT_S, JobSummary
from jaxdream.outdir import describe_holder
from jaxdream.storage import check_writable, join, list_prefix, redact

if TYPE_CHECKING:
    from jaxdream.config import JobConfig


def run_remote_job(config: JobConfig, *, address: str | None = None, resume: bool = False,
                   progress: bool = True, say: Callable[[str], None] | None = None,
                   on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
                   worker_wait_s: float = WORKER_WAIT_S, force: bool = False) -> JobSummary:
    """:func:`jaxdream.jobs.run_job` for ``config.output_url``; same contract. The prefix is
    locked for the whole job (:func:`jaxdream.outdir.acquire_prefix`): a second driver on it
    raises OutputBusy naming this one; ``force`` takes over a lock left by a killed driver."""
    from jaxdream.outdir import acquire_prefix

    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    start = time.perf_counter()
    check_writable(config.output_url)  # a missing bucket or no access: one line, first
    with acquire_prefix(config.output_url, "jaxdream run", force=force) as lock:
        if lock.previous is not None:
            say(f"note: took over the lock {redact(lock.url)} of a job that no longer runs "
                f"({describe_holder(lock.previous)})")
        return _run_locked(config, address=address, resume=resume, progress=progress, say=say,
                           on_rows=on_rows, worker_wait_s=worker_wait_s, start=start)


def _run_locked(config: JobConfig, *, address: str | None, resume: bool, progress: bool,
                say: Callable[[str], None],
                on_rows: Callable[[list[dict[str, Any]]], None] | None,
                worker_wait_s: float, start: float) -> JobSummary:
    """:func:`run_remote_job` once the prefix is locked."""
    from jaxdream.planning import plan_stream

    prefix, outdir = config.output_url, config.output
    planned = iter(plan_stream(config))
    first = next(planned, None)  # every entry is opened (or refused) before anything else
    summary = JobSummary(manifest=join(redact(prefix), MANIFEST_NAME))  # type: ignore[arg-type]

    finished: dict[tuple[str, str], int] = {}
    objects: list[str] = []
    if resume:
        names = set(list_prefix(prefix, recursive=True))  # names only, not the listing
        objects = manifest_objects(names)
        finished = remote_finished_keys(prefix, names)
    kept: set[int] = set()  # lines of the rows of finished items that this job planned again

    def planned_again(key: tuple[str, str]) -> None:
        if key in finished:
            kept.add(finished[key])

    def kept_lines() -> Iterator[bytes]:
        return (line for number, line in enumerate(remote_lines(prefix, objects))
                if number in kept)

    writer = PartsWriter(prefix, kept_lines)
    intake = Intake(itertools.chain([first] if first is not None else [], planned),
                    finished.keys(), writer, summary, outdir, say=say, resume=resume,
                    on_item=planned_again)
    schedule(config, intake, writer, summary, address=address, say=say,
             progress=progress, on_rows=on_rows, worker_wait_s=worker_wait_s)
    writer.compact()
    if config.output_shards:  # tar shards: shards/index.json, and no shard left unnamed
        from jaxdream.errors import JaxdreamError
        from jaxdream.jobs.tarout import finish_shards, write_summary

        try:  # and a summary page: a bucket of shards can be served as a static site
            rows = read_remote_manifest(prefix)
            write_summary(prefix, f"jaxdream: {config.source}", rows, finish_shards(prefix, rows))
        except JaxdreamError as error:  # the shards are safe and the manifest names them
            say(f"error: shard index not written: {error}")
            summary.problems += 1
    summary.seconds = time.perf_counter() - start
    return summary
