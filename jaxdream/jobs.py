"""Dreams whole datasets on a Ray cluster: what ``jaxdream run`` runs.

The only module of jaxdream that imports Ray. A job config is planned into work items
(:func:`jaxdream.render.plan_items`: stable ids, deterministic output paths), the items still to
do are cut into units of work, and the units are streamed to long-lived worker actors, one per
GPU, per TPU host, or per CPU-only node (see :func:`plan_workers`). Each worker loads the model
once and renders
its units through :func:`jaxdream.render.render_items`, which writes every PNG straight to the
output folder atomically (temporary name, then rename).

The driver appends one row per item to ``OUTDIR/manifest.jsonl`` as results arrive (flushed and
fsync-ed per unit), shows progress, and retries the units of a worker or node that died, a
bounded number of times. Re-running with ``resume=True`` skips every item whose row says done
and whose output exists. What this gives:

* a driver killed mid-job loses at most the units in flight (their rows were never written);
* duplicate completions are harmless: names are deterministic, writes atomic, bytes identical;
* the manifest never lists an output that does not exist: a row is written only after the
  driver sees the file, and a resumed job drops rows whose output has gone missing.

Manifest rows (JSON objects, one per line)::

    {"id", "input", "output", "status", "error", "params", "point", "seconds", "worker",
     "node", "attempt", "finished"}

``output`` is relative to the manifest's folder (null for a failed item), ``status`` is
``done`` or ``failed``, ``error`` the one-line reason of a failure, ``params`` the item's full
recipe and ``point`` its grid point, ``seconds`` the item's render time in the worker. An item
is identified by its id *and* output (two copies of one photo share an id, not an output).
Rows are only ever appended; when an item appears more than once its last row wins. The
driver holds the output folder's lock (:mod:`jaxdream.outdir`) for the whole job, so a second
job on the same folder is refused. The manifest is never replaced with less than it held: at
the start and the end of a job it is rebuilt (atomically) from what exists, each item's last
row except done rows whose output is gone (:func:`compact_rows`), so after a run that finishes
every planned item has exactly one row, and rows of earlier jobs in the folder are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import ray
import ray.exceptions
from tqdm import tqdm

from jaxdream.errors import JaxdreamError

if TYPE_CHECKING:
    from jaxdream.config import JobConfig, JobSettings
    from jaxdream.render import Outcome, WorkItem

MANIFEST_NAME = "manifest.jsonl"

#: Units queued on one worker at a time: one rendering, one waiting, so a worker never idles
#: while its next unit crosses the network, and a dead worker takes little work with it.
UNITS_PER_WORKER = 2

#: How long the driver waits for a first worker (or, later, any live worker) before it gives
#: up on the units left. Generous: an autoscaling cluster may take minutes to add a GPU node.
WORKER_WAIT_S = 900.0

#: ``save_png`` writes ``.<name>.<12 hex digits>.tmp`` next to the output, then renames it.
_TEMP_NAME = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.tmp$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DISK_FULL = os.strerror(errno.ENOSPC)


class JobError(JaxdreamError):
    """The job as a whole cannot go on (no cluster, no worker, the manifest cannot be written)."""


# --------------------------------------------------------------------------------------------
# Work units


@dataclasses.dataclass
class Unit:
    """Items sent to one worker in one call; ``attempts`` counts the workers it has lost."""

    index: int
    items: tuple[WorkItem, ...]
    attempts: int = 0


def _static_key(item: WorkItem) -> str:
    """Everything that selects a compiled program, as text that sorts."""
    recipe = item.recipe
    return repr((recipe.model, recipe.static_settings(), recipe.max_side))


def make_units(items: Sequence[WorkItem], unit_size: int) -> list[Unit]:
    """Cuts items into units of at most ``unit_size``, never mixing static settings.

    Items are sorted by their static settings (model, layers, octaves, steps, max side), then
    by input: a worker then renders a unit with one engine, and photos from one folder, which
    tend to share a size and so a shape bucket, travel together.
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
            units.append(Unit(len(units), tuple(members[start:start + unit_size])))
    return units


# --------------------------------------------------------------------------------------------
# Workers


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


def worker_env(platform: str) -> dict[str, str]:
    """The JAX environment of a worker process, set explicitly rather than inherited.

    ``JAX_PLATFORMS`` pins the backend, so a CPU worker on a GPU node never grabs the GPU and
    a GPU worker fails loudly instead of falling back to the CPU. Preallocation is off: JAX
    would otherwise take 75% of the GPU's memory at start, which breaks workers that share a
    GPU (``gpus_per_worker`` below 1) and leaves nothing to anything else on the device.
    """
    return {"JAX_PLATFORMS": platform, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "TF_CPP_MIN_LOG_LEVEL": "1"}


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
                 batch_size: int | None) -> None:
        # Relative paths in a config mean the driver's working directory. On a cluster whose
        # nodes share that folder it exists here too; otherwise (a working_dir runtime
        # environment) the worker's own copy of the project is the right place.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        from jaxdream.engine import default_cache_dir, enable_compilation_cache
        from jaxdream.models import load_model

        try:
            enable_compilation_cache(default_cache_dir())
        except OSError:
            pass  # a read-only home slows a worker down, it does not stop it
        import jax

        self.weights = weights
        self.batch_size = batch_size
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
        # Every item sent here is to be (re)rendered: the driver already skipped the finished
        # ones, and an existing output is the harmless leftover of an earlier attempt.
        report = render_items(items, weights=self.weights, batch_size=self.batch_size,
                              overwrite=True, progress=False, report=lambda line: None)
        return UnitResult(report.outcomes, self.name, self.node, time.perf_counter() - start,
                          report.compile_stats.programs, report.compile_stats.seconds)


# --------------------------------------------------------------------------------------------
# The manifest


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a manifest, in order; [] if there is none.

    A driver killed while appending may leave a torn last line; it (and any other line that is
    not a JSON object with an id) is ignored.
    """
    return _read_manifest(path)[0]


def _read_manifest(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows, and whether the file holds nothing else (no torn or foreign line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], True
    except OSError as error:
        raise JobError(f"{path}: cannot read the manifest: {error.strerror or error}") from None
    rows: list[dict[str, Any]] = []
    lines = data.splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.append(row)
    return rows, len(rows) == len(lines) and (not data or data.endswith(b"\n"))


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """One item per (id, input): a retry or a later run of the item supersedes its row."""
    return row["id"], str(row.get("input"))


def compact_rows(rows: Sequence[Mapping[str, Any]], outdir: Path) -> list[Mapping[str, Any]]:
    """The manifest rebuilt from what exists: each item's last row, in order, except done
    rows whose output file is gone. Nothing else is ever dropped (rows of other jobs or
    configs in the same folder included)."""
    last = {_row_key(row): index for index, row in enumerate(rows)}
    return [row for index, row in enumerate(rows)
            if last[_row_key(row)] == index
            and not (row.get("status") == "done" and not (
                isinstance(row.get("output"), str) and (outdir / row["output"]).is_file()))]


def item_key(item: WorkItem, outdir: Path) -> tuple[str, str]:
    """What identifies an item in the manifest: its id and its output relative to ``outdir``.

    The id alone does not: two copies of one photo in a dataset have the same content, hence
    the same id, but each has its own output.
    """
    return item.id, os.path.relpath(item.output, outdir)


def finished_rows(rows: Iterable[Mapping[str, Any]], outdir: Path
                  ) -> dict[tuple[str, str], Mapping[str, Any]]:
    """Rows of finished items by :func:`item_key`: the item's last row says done and its
    output file is present. (A failed row has no output; it never finishes an item.)"""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("output"), str):
            latest[(row["id"], row["output"])] = row
    return {key: row for key, row in latest.items()
            if row.get("status") == "done" and (outdir / key[1]).is_file()}


class ManifestWriter:
    """Appends rows to the manifest; each batch is one write, flushed and fsync-ed.

    The caller holds the output folder's lock (:mod:`jaxdream.outdir`), so no other jaxdream
    job writes here. Opening compacts the manifest (:func:`compact_rows`) when there is
    anything to drop, through a temporary file and a rename; afterwards rows are only ever
    appended, each batch with a single ``write`` on an ``O_APPEND`` descriptor, so not even a
    writer outside the lock could tear or lose a row.
    """

    def __init__(self, path: Path, outdir: Path) -> None:
        self.path = path
        self._fd: int | None = None
        try:
            compact_manifest(path, outdir)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                               | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise _manifest_error(path, error) from None

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        try:
            self._write("".join(_dumps(row) for row in rows).encode("utf-8"))
        except OSError as error:
            raise _manifest_error(self.path, error) from None

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass  # the append that failed has already raised a readable error
            self._fd = None


def _manifest_error(path: Path, error: OSError) -> JobError:
    return JobError(f"{path}: cannot write the manifest: {error.strerror or error}; "
                    f"outputs finished so far are complete, rerun with --resume once "
                    f"this is fixed")


def compact_manifest(path: Path, outdir: Path) -> list[Mapping[str, Any]]:
    """Rewrites the manifest as :func:`compact_rows` of itself when that drops anything (or
    the file holds a torn line); returns the rows. Only under the output folder's lock."""
    rows, clean = _read_manifest(path)
    kept = compact_rows(rows, outdir)
    if clean and len(kept) == len(rows):
        return kept
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.writelines(_dumps(row) for row in kept)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return kept


def _dumps(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


def recipe_params(item: WorkItem) -> dict[str, Any]:
    """The recipe of an item as a JSON object (layers as ``{endpoint: weight}``)."""
    params = dataclasses.asdict(item.recipe)
    params["layers"] = {name: float(weight) for name, weight in item.recipe.layers or ()}
    params["channels"] = list(item.recipe.channels)
    return params


def unreadable_id(path: str) -> str:
    """An id for an input that could not even be hashed (so it has no item id)."""
    return "unreadable-" + hashlib.sha256(
        path.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so a hostile file name cannot forge lines."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# The driver


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
    manifest: Path = Path(MANIFEST_NAME)
    stopped: str = ""  #: why the job stopped before the end, if it did
    problems: int = 0  #: ``error:`` lines not tied to an item (a sheet, the gallery)

    @property
    def exit_status(self) -> int:
        return 1 if (self.failed or self.not_run or self.stopped or self.problems) else 0

    def describe(self, output: Path) -> str:
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


@dataclasses.dataclass
class _Slot:
    """One worker actor as the driver sees it."""

    handle: Any
    state: str = "starting"  # starting -> ready; restarting after a loss; dead when gone
    inflight: int = 0
    name: str = ""
    probing: bool = False  #: a readiness probe is in flight
    probe_at: float | None = None  #: when to probe a restarting worker again


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


def clean_temporaries(outputs: Iterable[Path]) -> int:
    """Removes the temporary files of interrupted writes of these outputs; returns how many.

    A worker killed while writing leaves ``.<name>.<random>.tmp`` beside the output it was
    writing (hidden, and never renamed into place). Only temporaries of the job's own outputs
    are touched, and only when no worker of the job is running.
    """
    by_folder: dict[Path, set[str]] = {}
    for output in outputs:
        by_folder.setdefault(output.parent, set()).add(output.name[:100])
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match and match.group("base") in names and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


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
    this one. ``force`` allows the filesystem root or the home folder as the output.
    """
    from jaxdream.outdir import claim, refuse_dangerous
    from jaxdream.render import plan_items

    say = say or (lambda line: tqdm.write(line, file=sys.stderr))
    start = time.perf_counter()
    outdir = config.output
    refuse_dangerous(outdir, force=force)
    if outdir.exists() and not outdir.is_dir():
        raise JobError(f"output folder {str(outdir)!r} exists and is not a folder")
    items, unreadable = plan_items(config)
    lock = claim(outdir, "jaxdream run", force=force)
    try:
        return _run_locked(config, items, unreadable, address=address, resume=resume,
                           progress=progress, say=say, on_rows=on_rows,
                           worker_wait_s=worker_wait_s, start=start)
    finally:
        lock.release()


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
        failures = [_row(None, outcome, unreadable_id(outcome.input), outdir)
                    for outcome in unreadable]
        for row in failures:
            say(f"error: {one_line(row['error'])}")
        writer.append(failures)
        summary.failed += len(failures)
        if todo:
            started = connect(address)
            driver: _Driver | None = None
            try:
                driver = _Driver(config, todo, writer, summary, say=say, progress=progress,
                                 on_rows=on_rows, worker_wait_s=worker_wait_s)
                driver.run()
            finally:
                if driver is not None:
                    driver.stop()
                if started:
                    ray.shutdown()
            clean_temporaries(item.output for item in todo)
    finally:
        writer.close()
    try:  # each item's last row is what counts; keep one, so the manifest reads simply
        compact_manifest(summary.manifest, outdir)
    except (OSError, JaxdreamError) as error:
        say(f"error: {summary.manifest}: cannot tidy the manifest: {one_line(str(error))}")
        summary.problems += 1
    summary.problems += _sheets_and_gallery(config, items, summary.manifest, say)
    summary.seconds = time.perf_counter() - start
    return summary


def _sheets_and_gallery(config: JobConfig, items: Sequence[WorkItem], manifest: Path,
                        say: Callable[[str], None]) -> int:
    """Contact sheets (for a grid) and index.html from what the manifest records (failed
    inputs included); returns how many ``error:`` lines a problem here cost. The outputs are
    safe either way, but the exit status must show it."""
    from jaxdream.render import Outcome, sheets_and_gallery

    try:
        rows = read_manifest(manifest)
    except (JaxdreamError, OSError) as error:
        say(f"error: gallery not written: {one_line(str(error))}")
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


def _row(item: WorkItem | None, outcome: Outcome, id_: str, outdir: Path, *, worker: str = "",
         node: str = "", attempt: int = 0) -> dict[str, Any]:
    output = None
    if outcome.status == "done" and outcome.output is not None:
        output = os.path.relpath(outcome.output, outdir)
    return {
        "id": id_, "input": item.input if item else outcome.input, "output": output,
        "status": outcome.status, "error": outcome.reason,
        "params": recipe_params(item) if item else None,
        "point": dict(item.point) if item else None,
        "seconds": round(outcome.seconds, 4), "worker": worker, "node": node,
        "attempt": attempt,
        "finished": _now(),
    }


class _Driver:
    """Streams units to workers, collects results, retries lost units, writes the manifest."""

    def __init__(self, config: JobConfig, todo: Sequence[WorkItem], writer: ManifestWriter,
                 summary: JobSummary, *, say: Callable[[str], None], progress: bool,
                 on_rows: Callable[[list[dict[str, Any]]], None] | None,
                 worker_wait_s: float) -> None:
        self.config = config
        self.settings = config.job
        self.outdir = config.output
        self.todo = list(todo)
        self.queue: collections.deque[Unit] = collections.deque(
            make_units(todo, self.settings.unit_size))
        self.writer = writer
        self.summary = summary
        self.say = say
        self.on_rows = on_rows
        self.worker_wait_s = worker_wait_s
        self.slots: list[_Slot] = []
        #: Object reference -> (slot, unit); unit None for a readiness probe.
        self.pending: dict[Any, tuple[_Slot, Unit | None]] = {}
        self.recorded: set[tuple[str, str]] = set()
        self.last_progress = time.monotonic()
        self.last_death = "every worker died"
        # In a log (ray job logs, CI) every refresh is a line: refresh rarely there.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=len(todo), unit="img", desc="dreaming", disable=not progress,
                        file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if interactive else 15.0)

    # -- workers -----------------------------------------------------------------------------

    def start_workers(self) -> None:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        plan = plan_workers(self.settings, ray.cluster_resources(), nodes, len(self.todo))
        # A job smaller than workers x unit_size is cut finer, so that every worker has a
        # share: three photos on three GPUs are three units, not one.
        size = min(self.settings.unit_size, math.ceil(len(self.todo) / plan.count))
        self.queue = collections.deque(make_units(self.todo, size))
        plan = dataclasses.replace(plan, count=min(plan.count, len(self.queue)))
        self.summary.workers = plan.describe()
        weights = (os.path.abspath(self.config.weights) if self.config.weights
                   and os.path.exists(self.config.weights) else self.config.weights)
        actor = ray.remote(DreamWorker).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=dict(plan.resources),
            # A restart is how a worker lost with its node comes back elsewhere; the units it
            # held are retried by the driver, never re-run by Ray behind its back.
            max_restarts=self.settings.retries, max_task_retries=0,
            # Across nodes where possible: one node's loss then takes few workers with it.
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": worker_env(plan.platform)})
        for _ in range(plan.count):
            slot = _Slot(actor.remote(os.getcwd(), self.config.model, weights,
                                      self.settings.batch_size))
            self.slots.append(slot)
            self._probe(slot)

    def _probe(self, slot: _Slot) -> None:
        """Asks a worker whether it is up; the answer comes once it is (Ray queues the call
        while the actor starts or restarts)."""
        slot.probing, slot.probe_at = True, None
        self.pending[slot.handle.ready.remote()] = (slot, None)

    def _reprobe(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.probe_at is not None and slot.probe_at <= now and not slot.probing:
                self._probe(slot)

    def _dispatch(self) -> None:
        for slot in self.slots:
            while slot.state == "ready" and slot.inflight < UNITS_PER_WORKER and self.queue:
                unit = self.queue.popleft()
                unit_items = list(unit.items)
                self.pending[slot.handle.render.remote(unit_items)] = (slot, unit)
                slot.inflight += 1

    def stop(self) -> None:
        """Ends every worker of the job (they would otherwise live as long as the driver)."""
        self.bar.close()
        for slot in self.slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor already gone is what we want
                pass

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        self.start_workers()
        self.bar.set_postfix_str(self._status())
        while self.queue or any(unit is not None for _, unit in self.pending.values()):
            if self.summary.stopped and not any(u is not None for _, u in self.pending.values()):
                break
            self._reprobe()
            if not self.summary.stopped:
                self._dispatch()
            if not self.pending:  # workers dead, or waiting to be asked again
                self._check_workers()
                time.sleep(0.2)
                continue
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in done:
                slot, unit = self.pending.pop(ref)
                if unit is None:
                    self._on_probe(slot, ref)
                else:
                    slot.inflight -= 1
                    self._on_unit(slot, unit, ref)
            self._check_workers()
            self.bar.set_postfix_str(self._status(), refresh=False)
        left = sum(len(unit.items) for unit in self.queue)
        self.summary.not_run += left

    def _status(self) -> str:
        ready = sum(slot.state == "ready" for slot in self.slots)
        text = f"workers {ready}/{len(self.slots)}"
        if self.summary.failed:
            text += f", {self.summary.failed} failed"
        if self.summary.retried_units:
            text += f", {self.summary.retried_units} retried"
        return text

    def _on_probe(self, slot: _Slot, ref: Any) -> None:
        slot.probing = False
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as error:
            self._bury(slot, error)
            return
        except ray.exceptions.RayActorError:
            # Unavailable for now (restarting after its node died): ask again in a moment.
            slot.state, slot.probe_at = "restarting", time.monotonic() + 1.0
            return
        except ray.exceptions.RayError as error:
            self._bury(slot, error)
            return
        slot.state, slot.name = "ready", info["worker"]
        self.last_progress = time.monotonic()

    def _bury(self, slot: _Slot, error: BaseException) -> None:
        if slot.state != "dead":
            slot.state = "dead"
            slot.name = slot.name or "worker"
            self.last_death = _reason(error)

    def _on_unit(self, slot: _Slot, unit: Unit, ref: Any) -> None:
        try:
            result: UnitResult = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self._lost(slot, unit, error)
            return
        except ray.exceptions.RayTaskError as error:
            # The worker is alive but the unit raised: a bug, or a device error. Retrying on
            # another worker would most likely fail the same way, so the items are recorded.
            reason = f"worker error: {_reason(error)}"
            self._record(unit, [_failed(item, reason) for item in unit.items], slot.name,
                         unit.attempts + 1)
            return
        except ray.exceptions.RayError as error:  # e.g. its result was lost with a node
            self._lost(slot, unit, error)
            return
        self.last_progress = time.monotonic()
        self.summary.programs += result.programs
        self.summary.compile_seconds += result.compile_seconds
        outcomes = list(result.outcomes)  # one per item, in item order
        if len(outcomes) != len(unit.items) or any(
                outcome.id != item.id for outcome, item in zip(outcomes, unit.items)):
            outcomes = [_failed(item, "the worker's outcomes do not match its unit")
                        for item in unit.items]
        self._record(unit, outcomes, result.worker, unit.attempts + 1, node=result.node)

    def _lost(self, slot: _Slot, unit: Unit, error: BaseException) -> None:
        """A worker died (or its node did) with ``unit`` in flight: retry it, within bounds."""
        if isinstance(error, ray.exceptions.ActorDiedError):
            self._bury(slot, error)
        elif slot.state == "ready":
            slot.state = "restarting"  # no more units until a probe says it is back
            if not slot.probing:
                self._probe(slot)
        unit.attempts += 1
        if unit.attempts > self.settings.retries:
            reason = (f"its worker died {unit.attempts} time(s), retries exhausted "
                      f"(last: {_reason(error)})")
            self._record(unit, [_failed(item, reason) for item in unit.items], slot.name,
                         unit.attempts)
            return
        self.summary.retried_units += 1
        self.queue.appendleft(unit)

    def _check_workers(self) -> None:
        """Stops the job when no worker is alive, or none is up for ``worker_wait_s``.

        The units left are not the items' fault: they get no rows, and a later --resume
        renders them.
        """
        if not self.queue or self.summary.stopped:
            return
        if all(slot.state == "dead" for slot in self.slots):
            self.summary.stopped = f"no worker left (last: {self.last_death})"
        elif (not any(slot.state == "ready" for slot in self.slots)
              and time.monotonic() - self.last_progress > self.worker_wait_s):
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
            if outcome.status == "done" and not item.output.is_file():
                outcome = _failed(item, f"{item.output}: the worker wrote it but the driver "
                                        f"cannot see it; the output folder must be on a "
                                        f"filesystem every node shares")
            elif outcome.status == "skipped":  # cannot happen with overwrite; be explicit
                outcome = _failed(item, f"{item.output}: skipped by the worker")
            rows.append(_row(item, outcome, item.id, self.outdir, worker=worker, node=node,
                             attempt=attempt))
        self.writer.append(rows)
        for row in rows:
            if row["status"] == "done":
                self.summary.done += 1
            else:
                self.summary.failed += 1
                self.say(f"error: {one_line(row['error'])}")
                if _DISK_FULL in row["error"] and not self.summary.stopped:
                    # Every later write would fail the same way: stop sending units.
                    self.summary.stopped = (f"the output disk is full ({row['error']}); free "
                                            f"space and rerun with --resume")
        self.bar.update(len(rows))
        if self.on_rows is not None and rows:
            self.on_rows(rows)


def _failed(item: WorkItem, reason: str) -> Outcome:
    from jaxdream.render import Outcome

    if not reason.startswith(item.input):
        reason = f"{item.input}: {reason}"
    return Outcome(item.input, None, "failed", reason, item.id)


def _reason(error: BaseException) -> str:
    """A Ray error as one short line: its cause when it has one, else its first line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(error, ray.exceptions.RayActorError):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(error).__name__}: {error}"
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
