"""The job manifest, ``OUTDIR/manifest.jsonl``: reading, appending, rewriting. No Ray here.

Rows (JSON objects, one per line)::

    {"id", "input", "output", "status", "error", "params", "point", "seconds", "worker",
     "node", "attempt", "input_sha256", "finished"}

``output`` is relative to the manifest's folder (null for a failed item), ``status`` is
``done`` or ``failed``, ``error`` the one-line reason of a failure, ``params`` the item's full
recipe and ``point`` its grid point, ``seconds`` the item's render time in the worker. An item
is identified by its id *and* output (two copies of one photo share an id, not an output).
Rows are only ever appended; when an item appears more than once its last row wins. A run
without ``resume`` starts a fresh manifest; a resumed run first rewrites it (atomically) to
hold exactly the rows of the items it skips, so after a run that finishes every planned item
has exactly one row.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from jaxdream.errors import JobError
from jaxdream.files import atomic_write
from jaxdream.storage import is_url, redact

if TYPE_CHECKING:
    from jaxdream.render import Outcome, WorkItem

MANIFEST_NAME = "manifest.jsonl"

def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a manifest, in order; [] if there is none.

    A driver killed while appending may leave a torn last line; it (and any other line that is
    not a JSON object with an id) is ignored.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise JobError(f"{path}: cannot read the manifest: {error.strerror or error}") from None
    rows: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.append(row)
    return rows


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
    """Appends rows to the manifest; each batch is flushed and fsync-ed before returning."""

    def __init__(self, path: Path, keep: Sequence[Mapping[str, Any]]) -> None:
        self.path = path
        self._file: IO[str] | None = None
        try:
            self._rewrite(keep)
            self._file = open(path, "a", encoding="utf-8")
        except OSError as error:
            raise self._error(error) from None

    def _error(self, error: OSError) -> JobError:
        return JobError(f"{self.path}: cannot write the manifest: {error.strerror or error}; "
                        f"outputs finished so far are complete, rerun with --resume once "
                        f"this is fixed")

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replaces the manifest with ``rows`` through a temporary file and a rename."""
        text = "".join(_dumps(row) for row in rows)
        atomic_write(self.path, lambda out: out.write(text.encode("utf-8")))

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        assert self._file is not None
        try:
            self._file.writelines(_dumps(row) for row in rows)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise self._error(error) from None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the append that failed has already raised a readable error
            self._file = None


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
    }
