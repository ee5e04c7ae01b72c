"""Scheduling a job's work: units, the queue, dispatch to the workers, retries, and the rows
each finished unit adds to the manifest.

The items still to do come in as an iterable (a plan that is still being listed, see
:func:`jaxdream.planning.plan_stream`): the scheduler takes :data:`INTAKE` of them at a time,
cuts them into units (:func:`make_units`) and takes more only when its queue runs short, so the
first unit goes out while a bucket of a million objects is still being listed and the driver
never holds the whole plan. It keeps up to :data:`UNITS_PER_WORKER` units on each ready
worker, and a unit lost with its worker goes back to the front of the queue, at most
``retries`` times. A unit's rows are written once its outcomes
are back and its outputs visible, each item once however many times it was rendered.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions
from tqdm import tqdm

from jaxdream.files import display
from jaxdream.jobs.manifest import MANIFEST_NAME, ManifestWriter, item_key, make_row
from jaxdream.jobs.pool import UnitResult, Worker, WorkerPool, plan_workers, reason

if TYPE_CHECKING:
    from jaxdream.config import JobConfig
    from jaxdream.render import Outcome, WorkItem

#: Units queued on one worker at a time: one rendering, one waiting, so a worker never idles
#: while its next unit crosses the network, and a dead worker takes little work with it.
UNITS_PER_WORKER = 2

#: How long the driver waits for a first worker (or, later, any live worker) before it gives
#: up on the units left. Generous: an autoscaling cluster may take minutes to add a GPU node.
WORKER_WAIT_S = 900.0

#: Items taken from the plan at a time. A job with at most this many items is cut into units
#: all at once (sorted, sized to the workers); a larger one a chunk at a time, as the queue
#: runs short: planning cost ahead of the workers stays small, and so does the driver.
INTAKE = 4096

_DISK_FULL = os.strerror(errno.ENOSPC)


@dataclasses.dataclass
class Unit:
    """Items sent to one worker in one call; ``attempts`` counts the workers it has lost."""

    index: int
    items: tuple[WorkItem, ...]
    attempts: int = 0


def _static_key(item: WorkItem) -> str:
    """Everything that selects a compiled program, as text that sorts."""
    from jaxdream.engine import static_settings

    recipe = item.recipe
    return repr((recipe.model, static_settings(recipe), recipe.max_side))


def make_units(items: Sequence[WorkItem], unit_size: int, first: int = 0) -> list[Unit]:
    """Cuts items into units of at most ``unit_size``, never mixing static settings.

    Items are sorted by their static settings (model, layers, octaves, steps, max side), then
    by input: a worker then renders a unit with one engine, and photos from one folder, which
    tend to share a size and so a shape bucket, travel together. Units are numbered from
    ``first``.
    """
    if unit_size < 1:
        raise ValueError(f"unit_size must be at least 1, got {unit_size}")
    groups: dict[str, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(_static_key(item), []).append(item)
    units: list[Unit] = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda item: (item.input, str(item.output)))
        for start in range(0, len(members), unit_size):
            units.append(Unit(first + len(units), tuple(members[start:start + unit_size])))
    return units


@dataclasses.dataclass
class JobSummary:
    """What a job did; ``exit_status`` is what ``jaxdream run`` returns."""

    planned: int = 0  #: items in the plan, plus inputs that could not be read
    already_done: int = 0  #: skipped by --resume
    done: int = 0
    failed: int = 0
    not_run: int = 0  #: left for a later --resume (the job stopped early)
    retried_units: int = 0
    workers: str = ""
    programs: int = 0  #: compiled programs built by the workers (compiled or loaded from disk)
    compile_seconds: float = 0.0
    seconds: float = 0.0
    manifest: Path | str = Path(MANIFEST_NAME)  #: a URL when the outputs are in a bucket
    stopped: str = ""  #: why the job stopped before the end, if it did
    problems: int = 0  #: ``error:`` lines not tied to an item (a sheet, the gallery)

    @property
    def exit_status(self) -> int:
        return 1 if (self.failed or self.not_run or self.stopped or self.problems) else 0

    def describe(self, output: Path | str) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.failed} failed"]
        if self.already_done:
            parts.append(f"{self.already_done} already done")
        if self.not_run:
            parts.append(f"{self.not_run} not run")
        if self.retried_units:
            parts.append(f"{self.retried_units} unit(s) retried")
        text = (f"dreamed {self.done} of {self.planned} item(s) into {output} "
                f"({', '.join(parts)}) in {self.seconds:.1f} s, {rate:.2f} img/s")
        if self.workers:
            text += f"; {self.workers}"
        if self.programs:
            text += f", {self.programs} program(s) built in {self.compile_seconds:.1f} s"
        return text + f"; manifest {self.manifest}"


class Scheduler:
    """Streams units to the pool's workers, collects results, retries lost units, and writes
    the manifest rows."""

    def __init__(self, config: JobConfig, todo: Iterable[WorkItem], writer: ManifestWriter,
                 summary: JobSummary, *, say: Callable[[str], None], progress: bool,
                 on_rows: Callable[[list[dict[str, Any]]], None] | None,
                 worker_wait_s: float) -> None:
        self.config = config
        self.settings = config.job
        self.outdir = config.output
        self.source = iter(todo)
        self.exhausted = False  #: the plan has no more items
        self.taken = 0  #: items taken from the plan so far
        self.unit_size = self.settings.unit_size
        self.todo = self._take()  # the whole job when it is small (self.exhausted)
        self.queue: collections.deque[Unit] = collections.deque(
            make_units(self.todo, self.unit_size))
        self.writer = writer
        self.summary = summary
        self.say = say
        self.on_rows = on_rows
        self.worker_wait_s = worker_wait_s
        self.pool = WorkerPool()
        #: Object reference of a unit in flight -> (its worker, the unit).
        self.pending: dict[Any, tuple[Worker, Unit]] = {}
        self.recorded: set[tuple[str, str]] = set()
        # In a log (ray job logs, CI) every refresh is a line: refresh rarely there.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=self.taken if self.exhausted else None, unit="img",
                        desc="dreaming", disable=not progress or not self.todo,
                        file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if interactive else 15.0)

    def _take(self) -> list[WorkItem]:
        """The next :data:`INTAKE` items of the plan (fewer at its end)."""
        chunk = list(itertools.islice(self.source, INTAKE))
        self.taken += len(chunk)
        if len(chunk) < INTAKE:
            self.exhausted = True
            if hasattr(self, "bar"):
                self.bar.total = self.taken
                self.bar.refresh()
        return chunk

    def _top_up(self) -> None:
        """Plans more units when the queue runs short of what the workers can take."""
        if not self.exhausted and len(self.queue) <= 2 * UNITS_PER_WORKER * max(
                1, len(self.pool.workers)):
            numbered = self.queue[-1].index + 1 if self.queue else self.taken
            self.queue.extend(make_units(self._take(), self.unit_size, numbered))

    def start_workers(self) -> None:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        known = len(self.todo) if self.exhausted else sys.maxsize
        plan = plan_workers(self.settings, ray.cluster_resources(), nodes, known)
        if self.exhausted:
            # A job smaller than workers x unit_size is cut finer, so that every worker has a
            # share: three photos on three GPUs are three units, not one.
            size = min(self.unit_size, math.ceil(len(self.todo) / plan.count))
            self.queue = collections.deque(make_units(self.todo, size))
            plan = dataclasses.replace(plan, count=min(plan.count, len(self.queue)))
        self.todo = []  # the units hold the items now
        self.summary.workers = plan.describe()
        self.pool.start(plan, self.config, self.settings.retries)

    def _dispatch(self) -> None:
        for worker in self.pool.ready():
            while worker.inflight < UNITS_PER_WORKER and self.queue:
                unit = self.queue.popleft()
                self.pending[worker.handle.render.remote(list(unit.items))] = (worker, unit)
                worker.inflight += 1

    def stop(self) -> None:
        self.bar.close()
        self.pool.stop()

    def run(self) -> None:
        self.start_workers()
        self.bar.set_postfix_str(self._status())
        while self.queue or self.pending or not self.exhausted:
            if self.summary.stopped and not self.pending:
                break
            self.pool.reprobe()
            if not self.summary.stopped:
                self._top_up()
                self._dispatch()
            if not self.pending and not self.pool.probes:  # dead, or waiting to ask again
                self._check_workers()
                time.sleep(0.2)
                continue
            done, _ = ray.wait([*self.pending, *self.pool.probes], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.pool.probes:
                    self.pool.answered(ref)
                else:
                    worker, unit = self.pending.pop(ref)
                    worker.inflight -= 1
                    self._on_unit(worker, unit, ref)
            self._check_workers()
            self.bar.set_postfix_str(self._status(), refresh=False)
        left = sum(len(unit.items) for unit in self.queue)
        if not self.exhausted:  # stopped early: what was never planned is not run either
            left += sum(1 for _ in self.source)
            self.exhausted = True
        self.summary.not_run += left

    def _status(self) -> str:
        text = f"workers {len(self.pool.ready())}/{len(self.pool.workers)}"
        if self.summary.failed:
            text += f", {self.summary.failed} failed"
        if self.summary.retried_units:
            text += f", {self.summary.retried_units} retried"
        return text

    def _on_unit(self, worker: Worker, unit: Unit, ref: Any) -> None:
        try:
            result: UnitResult = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self._lost(worker, unit, error)
            return
        except ray.exceptions.RayTaskError as error:
            # The worker is alive but the unit raised: a bug, or a device error. Retrying on
            # another worker would most likely fail the same way, so the items are recorded.
            why = f"worker error: {reason(error)}"
            self._record(unit, [_failed(item, why) for item in unit.items], worker.name,
                         unit.attempts + 1)
            return
        except ray.exceptions.RayError as error:  # e.g. its result was lost with a node
            self._lost(worker, unit, error)
            return
        self.pool.last_ready = time.monotonic()
        self.summary.programs += result.programs
        self.summary.compile_seconds += result.compile_seconds
        outcomes = list(result.outcomes)  # one per item, in item order
        if len(outcomes) != len(unit.items) or any(
                outcome.id != item.id for outcome, item in zip(outcomes, unit.items)):
            outcomes = [_failed(item, "the worker's outcomes do not match its unit")
                        for item in unit.items]
        self._record(unit, outcomes, result.worker, unit.attempts + 1, node=result.node)

    def _lost(self, worker: Worker, unit: Unit, error: BaseException) -> None:
        """A worker died (or its node did) with ``unit`` in flight: retry it, within bounds."""
        self.pool.lost(worker, error)
        unit.attempts += 1
        if unit.attempts > self.settings.retries:
            why = (f"its worker died {unit.attempts} time(s), retries exhausted "
                   f"(last: {reason(error)})")
            self._record(unit, [_failed(item, why) for item in unit.items], worker.name,
                         unit.attempts)
            return
        self.summary.retried_units += 1
        self.queue.appendleft(unit)

    def _check_workers(self) -> None:
        """Stops the job when no worker is alive, or none is up for ``worker_wait_s``.

        The units left are not the items' fault: they get no rows, and a later --resume
        renders them.
        """
        if (not self.queue and self.exhausted) or self.summary.stopped:
            return
        if self.pool.all_dead():
            self.summary.stopped = f"no worker left (last: {self.pool.last_death})"
        elif (not self.pool.ready()
              and time.monotonic() - self.pool.last_ready > self.worker_wait_s):
            self.summary.stopped = (
                f"no worker was up for {self.worker_wait_s:.0f} s; does the cluster have the "
                f"resources asked for ({self.summary.workers})?")

    def _record(self, unit: Unit, outcomes: Sequence[Outcome], worker: str,
                attempt: int, node: str = "") -> None:
        """Writes the rows of a finished unit: only new items, only outputs that exist."""
        rows: list[dict[str, Any]] = []
        for item, outcome in zip(unit.items, outcomes, strict=True):
            key = item_key(item, self.outdir)
            if key in self.recorded:
                continue  # a duplicate completion (a retried unit that had in fact finished)
            self.recorded.add(key)
            # An uploaded object exists once the worker's PUT returned (item.dest).
            stored = self.outdir / outcome.shard["shard"] if outcome.shard else item.output
            if outcome.status == "done" and not item.dest and not stored.is_file():
                outcome = _failed(item, f"{stored}: the worker wrote it but the driver "
                                        f"cannot see it; the output folder must be on a "
                                        f"filesystem every node shares")
            elif outcome.status == "skipped":  # cannot happen with overwrite; be explicit
                outcome = _failed(item, f"{item.output}: skipped by the worker")
            rows.append(make_row(item, outcome, item.id, self.outdir, worker=worker, node=node,
                             attempt=attempt))
        self.writer.append(rows)
        for row in rows:
            if row["status"] == "done":
                self.summary.done += 1
            else:
                self.summary.failed += 1
                self.say(f"error: {display(row['error'])}")
                if _DISK_FULL in row["error"] and not self.summary.stopped:
                    # Every later write would fail the same way: stop sending units.
                    self.summary.stopped = (f"the output disk is full ({row['error']}); free "
                                            f"space and rerun with --resume")
        self.bar.update(len(rows))
        if self.on_rows is not None and rows:
            self.on_rows(rows)


def _failed(item: WorkItem, why: str) -> Outcome:
    from jaxdream.render import Outcome

    from jaxdream.storage import is_url, redact

    shown = redact(item.input) if is_url(item.input) else item.input  # no presigned signature
    if not why.startswith(shown):
        why = f"{shown}: {why}"
    return Outcome(item.input, None, "failed", why, item.id)


