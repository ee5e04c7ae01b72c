"""The job manifest, ``OUTDIR/manifest.jsonl``: reading, appending, rewriting. No Ray here.

Rows (JSON objects, one per line)::

    {"id", "input", "output", "status", "error", "params", "point", "seconds", "worker",
     "node", "attempt", "input_sha256", "finished"}

``output`` is relative to the manifest's folder (null for a failed item), ``status`` is
``done`` or ``failed``, ``error`` the one-line reason of a failure, ``params`` the item's full
recipe and ``point`` its grid point, ``seconds`` the item's render time in the worker; an output
written into a tar shard (``output_shards``) adds ``shard``, ``member``, ``offset`` and ``size``
(where its PNG lies in the shard), and ``output`` is then the name it would have had. An item
is identified by its id *and* output (two copies of one photo share an id, not an output).
Rows are only ever appended; when an item appears more than once its last row wins. The
driver holds the output folder's lock (:mod:`jaxdream.outdir`) for the whole job, so a second
job on the same folder is refused. The manifest is never replaced with less than it held: at
the start and the end of a job it is rebuilt (atomically) from what exists, each item's last
row except done rows whose output is gone (:func:`compact_rows`), so after a run that finishes
every planned item has exactly one row, and rows of earlier jobs in the folder are kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxdream.errors import JobError
from jaxdream.storage import is_url, redact

if TYPE_CHECKING:
    from jaxdream.render import Outcome, WorkItem

MANIFEST_NAME = "manifest.jsonl"

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
    rows = parse_rows(data)
    return rows, len(rows) == len(data.splitlines()) and (not data or data.endswith(b"\n"))


def parse_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of manifest text (a file or a part object): every line that is a JSON object
    with an id; a torn or foreign line is skipped."""
    return [row for row in map(parse_row, data.splitlines()) if row is not None]


def parse_row(line: bytes) -> dict[str, Any] | None:
    """One manifest line's row, or None for a torn or foreign line."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("id"), str) else None


def done_keys(lines: Iterable[bytes], exists: Callable[[str], bool]) -> set[tuple[str, str]]:
    """:func:`finished_rows`, keys only, from manifest lines read as they come (a resumed job
    of a million items keeps no row): (id, output) of each item whose last row with an output
    says done and whose output (or the tar shard holding it, :func:`stored_as`) ``exists``."""
    latest: dict[tuple[str, str], str | None] = {}  # item -> where it is stored, if done
    for row in map(parse_row, lines):
        if row is not None and isinstance(row.get("output"), str):
            latest[(row["id"], row["output"])] = (
                stored_as(row) if row.get("status") == "done" else None)
    return {key for key, stored in latest.items() if stored is not None and exists(stored)}


def finished_keys(path: Path, outdir: Path) -> set[tuple[str, str]]:
    """:func:`done_keys` of the manifest file at ``path``; an empty set when there is none."""
    try:
        with open(path, "rb") as lines:
            return done_keys(lines, lambda output: (outdir / output).is_file())
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise JobError(f"{path}: cannot read the manifest: {error.strerror or error}") from None


def stored_as(row: Mapping[str, Any]) -> str | None:
    """The file (or object) a row's output lives in, relative to the output: its tar shard
    for a sharded output (:mod:`.tarout`), else the output itself."""
    shard = row.get("shard")
    if isinstance(shard, str):
        return shard
    return row["output"] if isinstance(row.get("output"), str) else None


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
                stored_as(row) is not None and (outdir / str(stored_as(row))).is_file()))]


def item_key(item: WorkItem, outdir: Path) -> tuple[str, str]:
    """What identifies an item in the manifest: its id and its output relative to ``outdir``.

    The id alone does not: two copies of one photo in a dataset have the same content, hence
    the same id, but each has its own output.
    """
    output = item.output
    if output.parent == outdir:  # the usual case, without relpath's two getcwd calls
        return item.id, output.name
    return item.id, os.path.relpath(output, outdir)


def finished_rows(rows: Iterable[Mapping[str, Any]], outdir: Path
                  ) -> dict[tuple[str, str], Mapping[str, Any]]:
    """Rows of finished items by :func:`item_key`: the item's last row says done and its
    output file is present. (A failed row has no output; it never finishes an item.)"""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("output"), str):
            latest[(row["id"], row["output"])] = row
    return {key: row for key, row in latest.items()
            if row.get("status") == "done" and (outdir / str(stored_as(row))).is_file()}


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


def compact_manifest(path: Path, outdir: Path) -> None:
    """Rewrites the manifest as :func:`compact_rows` of itself when that drops anything (or
    the file holds a torn line). Only under the output folder's lock. The file is read twice,
    line by line, and no row is kept in memory (a manifest of a million rows is a gigabyte of
    dictionaries): once to find each item's last line, once to copy the lines kept."""
    last: dict[tuple[str, str], tuple[int, bool]] = {}  # item -> (its last line, kept?)
    lines = 0
    clean = True
    try:
        with open(path, "rb") as file:
            for lines, line in enumerate(file, 1):
                row = parse_row(line)
                if row is None or not line.endswith(b"\n"):
                    clean = False
                if row is not None:
                    stored = stored_as(row)  # the output, or the tar shard holding it
                    gone = row.get("status") == "done" and not (
                        stored is not None and (outdir / stored).is_file())
                    last[_row_key(row)] = (lines, not gone)
    except FileNotFoundError:
        return
    kept = {number for number, keep in last.values() if keep}
    if clean and len(kept) == lines:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(path, "rb") as source, open(tmp, "wb") as file:
            for number, line in enumerate(source, 1):
                if number in kept:
                    file.write(line if line.endswith(b"\n") else line + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def make_row(item: WorkItem | None, outcome: Outcome, id_: str, outdir: Path, *, worker: str = "",
         node: str = "", attempt: int = 0) -> dict[str, Any]:
    """The manifest row of an item's outcome (``item`` None: an input that was not read)."""
    output = None
    if outcome.status == "done" and outcome.output is not None:
        output = os.path.relpath(outcome.output, outdir)
    source = item.input if item else outcome.input
    return {
        "id": id_, "input": redact(source) if is_url(source) else source, "output": output,
        "status": outcome.status, "error": outcome.reason,
        "params": recipe_params(item) if item else None,
        "point": dict(item.point) if item else None,
        "seconds": round(outcome.seconds, 4), "worker": worker, "node": node,
        "attempt": attempt,
        # What the worker read (an object's bytes are hashed only there); "" if it read none.
        "input_sha256": outcome.input_sha256 or (item.input_sha256 if item else ""),
        "finished": _now(),
        **(outcome.shard or {}),  # shard, member, offset, size of an output in a tar shard
    }
