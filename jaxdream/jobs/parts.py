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
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from jaxdream.errors import JobError
from jaxdream.jobs.manifest import MANIFEST_NAME, _dumps, parse_row, parse_rows, stored_as
from jaxdream.storage import (StorageError, delete_objects, filesystem, join, list_prefix,
                              put_object, read_object, redact)
from jaxdream.storage import reason as storage_reason

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


def manifest_objects(names: Iterable[str]) -> list[str]:
    """The manifest objects among ``names`` (relative to the prefix), in the order their rows
    were written: ``manifest.jsonl``, then the parts."""
    names = list(names)
    return ([MANIFEST_NAME] if MANIFEST_NAME in names else []) + sorted(
        name for name in names if name.startswith(PARTS_FOLDER + "/") and name.endswith(".jsonl"))


def remote_lines(prefix: str, objects: Iterable[str]) -> Iterator[bytes]:
    """The lines of manifest objects under ``prefix``, read as a stream (a manifest of a million
    rows is never one string in memory)."""
    for name in objects:
        url = join(prefix, name)
        try:
            fs, path = filesystem(url)
            with fs.open(path, "rb") as stream:
                yield from stream
        except Exception as error:  # noqa: BLE001 - one line, whatever the store says
            raise JobError(f"{redact(url)}: cannot read the manifest: {error}") from None


def remote_finished_keys(prefix: str, names: Collection[str]) -> dict[tuple[str, str], int]:
    """:func:`remote_finished` from the manifest under ``prefix`` read as a stream, keys only:
    (id, output) of each finished item, with the number of its last row among the lines of
    :func:`manifest_objects` (to copy that row alone at compaction). ``names``: the objects
    under the prefix, relative to it."""
    # The number of each item's last row, as ~number when that row does not say done: one
    # int per item, as a resumed job of a million items holds all of them at once.
    latest: dict[tuple[str, str], int] = {}
    for number, line in enumerate(remote_lines(prefix, manifest_objects(names))):
        row = parse_row(line)
        if row is not None and isinstance(row.get("output"), str):
            # Done, and its output (or the tar shard holding it) is still there.
            latest[(row["id"], row["output"])] = (
                number if row.get("status") == "done" and stored_as(row) in names else ~number)
    for key in [key for key, number in latest.items() if number < 0]:
        del latest[key]
    return latest


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
    """Writes each batch of rows as one part object; :meth:`compact` at the end of a run.

    ``keep``: the lines of earlier runs that :meth:`compact` keeps, given when it runs (a
    resumed job of a million items reads them again rather than hold them)."""

    def __init__(self, prefix: str, keep: Callable[[], Iterable[bytes]] = lambda: ()) -> None:
        self.prefix = prefix
        self.keep = keep
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
        """``manifest.jsonl`` := the kept rows and this run's rows, one upload (a whole
        object, or nothing); then the parts go (all of them: the kept rows already hold what
        earlier runs finished). The new manifest is spooled in a local temporary file."""
        with tempfile.NamedTemporaryFile(prefix="jaxdream-manifest-") as spool:
            for line in self.keep():
                spool.write(line if line.endswith(b"\n") else line + b"\n")
            for name in self.written:
                for row in parse_rows(read_object(name, 1 << 34)):
                    spool.write(_dumps(row).encode("utf-8"))
            spool.flush()
            url = join(self.prefix, MANIFEST_NAME)
            fs, path = filesystem(url)
            try:
                fs.put_file(spool.name, path)
            except Exception as error:  # noqa: BLE001 - any failure of the store
                raise JobError(f"{redact(url)}: cannot write the manifest: "
                               f"{storage_reason(error)}") from None
        parts = [join(self.prefix, name) for name in list_prefix(self.prefix, recursive=True)
                 if name.startswith(PARTS_FOLDER + "/")]
        delete_objects(parts)
