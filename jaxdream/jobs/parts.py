"""The manifest of a job whose outputs are in an object store, kept beside them. No Ray here.

Object stores cannot append or rename, so the rows of each finished unit are one object of
their own, ``OUT/manifest.parts/<run>/<sequence>.jsonl``, written with one whole PUT after the
unit's outputs exist. A resumed job, on any machine that can read the prefix, reads
``OUT/manifest.jsonl`` and every part (the rows are the same as a folder's manifest, see
:mod:`.manifest`; the last row of an item wins). At the end of a run the manifest is compacted:
``manifest.jsonl`` is rewritten, in one PUT, with the rows kept from before and those of this
run, and then the parts are removed. A driver killed between the two leaves parts that repeat
rows of the compacted manifest, which readers deduplicate.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxdream.errors import JobError
from jaxdream.jobs.manifest import MANIFEST_NAME, _dumps, parse_rows, stored_as
from jaxdream.storage import (StorageError, delete_objects, join, list_prefix, put_object,
                              read_object, redact)

PARTS_FOLDER = "manifest.parts"


def read_remote_manifest(prefix: str, listing: Mapping[str, Any] | None = None
                         ) -> list[dict[str, Any]]:
    """Every row of the manifest under ``prefix``: ``manifest.jsonl``, then the parts in the
    order they were written; [] when there is none. ``listing`` (names under the prefix, as
    :func:`jaxdream.storage.list_prefix` with ``recursive`` gives them) saves a listing."""
    names = listing if listing is not None else list_prefix(prefix, recursive=True)
    parts = sorted(name for name in names if name.startswith(PARTS_FOLDER + "/")
                   and name.endswith(".jsonl"))
    rows: list[dict[str, Any]] = []
    for name in ([MANIFEST_NAME] if MANIFEST_NAME in names else []) + parts:
        try:
            rows += parse_rows(read_object(join(prefix, name), 1 << 34))
        except Exception as error:  # noqa: BLE001 - one line, whatever the store says
            raise JobError(f"{redact(join(prefix, name))}: cannot read the manifest: "
                           f"{error}") from None
    return rows


def remote_finished(rows: Iterable[Mapping[str, Any]], names: Mapping[str, Any]
                    ) -> dict[tuple[str, str], Mapping[str, Any]]:
    """:func:`.manifest.finished_rows` for a prefix: the last row of each (id, output) says
    done and the output object is among ``names``."""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("output"), str):
            latest[(row["id"], row["output"])] = row
    return {key: row for key, row in latest.items()
            if row.get("status") == "done" and stored_as(row) in names}


class PartsWriter:
    """Writes each batch of rows as one part object; :meth:`compact` at the end of a run."""

    def __init__(self, prefix: str, keep: Sequence[Mapping[str, Any]]) -> None:
        self.prefix = prefix
        self.keep = list(keep)
        # Time first, so that parts of later runs sort after those of earlier ones.
        self.run = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        self.sequence = 0
        self.written: list[str] = []

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        self.sequence += 1
        name = join(self.prefix, f"{PARTS_FOLDER}/{self.run}/{self.sequence:08d}.jsonl")
        try:
            put_object(name, "".join(_dumps(row) for row in rows).encode("utf-8"))
        except StorageError as error:
            raise JobError(f"{error}; outputs finished so far are complete, rerun with "
                           f"--resume once this is fixed") from None
        self.written.append(name)

    def close(self) -> None:
        """Nothing to flush: every part is complete once :meth:`append` returns."""

    def compact(self) -> None:
        """``manifest.jsonl`` := the kept rows and this run's rows, one PUT; then the parts
        go (all of them: the kept rows already hold what earlier runs finished)."""
        rows = list(self.keep)
        for name in self.written:
            rows += parse_rows(read_object(name, 1 << 34))
        put_object(join(self.prefix, MANIFEST_NAME),
                   "".join(_dumps(row) for row in rows).encode("utf-8"))
        parts = [join(self.prefix, name) for name in list_prefix(self.prefix, recursive=True)
                 if name.startswith(PARTS_FOLDER + "/")]
        delete_objects(parts)
