"""Outputs as WebDataset tar shards (``output_shards: N``), in a folder or a bucket. No Ray here.

A million loose PNGs are a million objects to list, copy and delete; a dataset tool wants
shards. The design, and why:

* **One shard per unit of work**, units of at most N items (``job.unit_size`` is N). The worker
  renders its unit, keeps the PNGs in memory and writes one tar, whole: one PUT to a bucket
  (all-or-nothing), or a temporary file renamed over the name in a folder. No shard is shared
  by two units, so nothing is appended to, coordinated or rewritten, and a reader never sees a
  partial shard.
* **The name is the shard's content hash** (``shards/<sha256[:32]>.tar``), and the bytes are
  deterministic: members sorted by name, mtime 0, uid/gid 0, no user names, mode 0644. A
  retried unit therefore writes the same name with the same bytes. A name made from the unit's
  item ids would do that too, but when two attempts differ (an input that failed once and not
  the next time, a GPU node and a CPU node) both would PUT one name and the last would win,
  which need not be the attempt whose offsets the manifest kept; with content names each
  manifest row points at the very bytes it describes.
* **Samples** are ``<key>.png`` (the dream, its recipe in the PNG as for a loose output) and
  ``<key>.json`` (id, input, output, grid point); ``<key>`` is the loose output's name without
  ``.png``, dots made ``_`` (WebDataset cuts keys at the first dot). An output shard is thus
  also a jaxdream input (:mod:`jaxdream.shards`).
* **The index**: each manifest row of a sharded item names its ``shard``, ``member`` and the
  PNG's ``offset`` and ``size`` in the tar (one ranged read gets one image). At the end of a run
  ``shards/index.json`` lists every shard and its sample count, in the layout of webdataset's
  ``wids`` shard index. A unit whose shard was written but whose rows were lost with a killed
  driver is rendered again by ``--resume``; if that gives other bytes (another shard), the
  first copy, which no row names and whose every image is in a named shard, is removed at the
  end, so every item is in exactly one shard.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import html
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jaxdream import storage
from jaxdream.errors import JaxdreamError
from jaxdream.files import atomic_write

if TYPE_CHECKING:
    from jaxdream.render import Outcome, WorkItem

SHARDS_FOLDER = "shards"
INDEX_NAME = f"{SHARDS_FOLDER}/index.json"
#: The summary page lists at most this many shards and this many failures.
PAGE_SHARDS = 1000
PAGE_FAILURES = 1000
_BLOCK = 512
#: The name of a shard this module wrote (a content hash); nothing else is ever removed.
_OURS = re.compile(r"[0-9a-f]{32}\.tar")


def sample_key(output_name: str) -> str:
    """The WebDataset key of an output (``cat_dream.png`` -> ``cat_dream``)."""
    stem = output_name[:-4] if output_name.lower().endswith(".png") else output_name
    return stem.replace(".", "_")


def build_tar(members: Iterable[tuple[str, bytes]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A tar of ``members`` (name, bytes) with deterministic bytes, and each member's
    (offset of its data, size) in it."""
    buffer = io.BytesIO()
    where: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
            # The data ends where the archive now stands, less its padding to a block.
            where[name] = (tar.offset - -(-len(data) // _BLOCK) * _BLOCK, len(data))
    return buffer.getvalue(), where


def write_whole(base: str, name: str, data: bytes) -> None:
    """``base/name`` written whole: one PUT under a prefix, an atomic rename in a folder."""
    if storage.is_url(base):
        storage.put_object(storage.join(base, name), data)
        return
    path = os.path.join(base, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda out: out.write(data))


def render_unit(items: Sequence[WorkItem], base: str,
                render: Callable[[Callable[[WorkItem, bytes], None]], list[Outcome]]
                ) -> list[Outcome]:
    """Renders one unit into one shard under ``base`` (a folder or a prefix): ``render(sink)``
    renders the items, handing each PNG to ``sink`` instead of writing it, and returns one
    outcome per item. Done outcomes get their place in the shard; if the shard cannot be
    written, each of them fails with the reason."""
    pngs: dict[str, bytes] = {}
    outcomes = render(lambda item, data: pngs.__setitem__(item.output.name, data))
    done = [item for item, outcome in zip(items, outcomes, strict=True)
            if outcome.status == "done" and item.output.name in pngs]
    if not done:
        return outcomes
    members: list[tuple[str, bytes]] = []
    for item in done:
        key = sample_key(item.output.name)
        shown = storage.redact(item.input) if storage.is_url(item.input) else item.input
        sidecar = {"id": item.id, "input": shown, "output": item.output.name,
                   "point": dict(item.point)}
        members += [(f"{key}.png", pngs[item.output.name]),
                    (f"{key}.json", (json.dumps(sidecar, sort_keys=True) + "\n").encode())]
    data, where = build_tar(members)
    name = f"{SHARDS_FOLDER}/{hashlib.sha256(data).hexdigest()[:32]}.tar"
    failure = ""
    try:
        write_whole(base, name, data)
    except storage.StorageError as error:
        failure = str(error)
    except (JaxdreamError, OSError) as error:
        failure = (f"{os.path.join(base, name)}: cannot write: "
                   f"{getattr(error, 'strerror', None) or error}")
    placed = {item.id for item in done}
    result: list[Outcome] = []
    for item, outcome in zip(items, outcomes, strict=True):
        if item.id in placed and outcome.status == "done":
            member = f"{sample_key(item.output.name)}.png"
            shown = storage.redact(item.input) if storage.is_url(item.input) else item.input
            outcome = (dataclasses.replace(outcome, output=None, status="failed",
                                           reason=f"{shown}: {failure}") if failure else
                       dataclasses.replace(outcome, shard={
                           "shard": name, "member": member, "offset": where[member][0],
                           "size": where[member][1]}))
        result.append(outcome)
    return result


def _latest(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each item's last row (a killed driver's parts may repeat compacted rows)."""
    last: dict[tuple[Any, Any], Mapping[str, Any]] = {}
    for row in rows:
        last[(row.get("id"), row.get("output") or row.get("input"))] = row
    return list(last.values())


def _existing_shards(base: str) -> list[str]:
    """Names (``shards/...``) of the files or objects in the shards folder."""
    if storage.is_url(base):
        listing = storage.list_prefix(storage.join(base, SHARDS_FOLDER))
        return [f"{SHARDS_FOLDER}/{name}" for name in listing if "/" not in name]
    try:
        return [f"{SHARDS_FOLDER}/{entry.name}"
                for entry in os.scandir(os.path.join(base, SHARDS_FOLDER)) if entry.is_file()]
    except FileNotFoundError:
        return []


def _png_members(base: str, name: str) -> set[str] | None:
    """The PNG members of the shard ``base/name`` (headers only), or None if unreadable."""
    try:
        if storage.is_url(base):
            fs, path = storage.filesystem(storage.join(base, name))
            handle = fs.open(path, "rb")
        else:
            handle = open(os.path.join(base, name), "rb")
        with handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            return {info.name for info in tar if info.name.endswith(".png")}
    except (OSError, tarfile.TarError, JaxdreamError):
        return None


def finish_shards(base: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """At the end of a run (under the output's lock, all workers stopped): writes
    ``shards/index.json`` from the manifest's ``rows`` and removes what a killed run left:
    temporaries of torn writes, and shards that no row names whose every image is in a
    shard that one does (a copy; a shard holding anything else is kept, whatever wrote it).
    Returns the sample count of each shard."""
    latest = [row for row in _latest(rows)
              if row.get("status") == "done" and isinstance(row.get("shard"), str)]
    counts = collections.Counter(str(row["shard"]) for row in latest)
    named = {str(row.get("member")) for row in latest}
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "jaxdream outputs",
             "shardlist": [{"url": name.removeprefix(SHARDS_FOLDER + "/"), "nsamples": count}
                           for name, count in sorted(counts.items())]}
    write_whole(base, INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    leftovers = []
    for name in _existing_shards(base):
        file = name.removeprefix(SHARDS_FOLDER + "/")
        if name in counts:
            continue
        if file.startswith(".") and file.endswith(".tmp") and not storage.is_url(base):
            leftovers.append(name)
        elif _OURS.fullmatch(file):
            members = _png_members(base, name)
            if members is not None and members <= named:
                leftovers.append(name)
    if storage.is_url(base):
        storage.delete_objects([storage.join(base, name) for name in leftovers])
    else:
        for name in leftovers:
            try:
                os.unlink(os.path.join(base, name))
            except OSError:
                pass  # a leftover, not a wrong output: the index does not name it
    return dict(counts)


def write_summary(base: str, title: str, rows: Sequence[Mapping[str, Any]],
                  counts: Mapping[str, int]) -> str:
    """``index.html`` under ``base`` (a folder or a prefix) for sharded outputs: counts, the
    shards with their image counts, and the failures with their reasons (thumbnails would
    mean opening every shard). Returns where it is."""
    latest = _latest(rows)
    failed = [row for row in latest if row.get("status") == "failed"]
    shards = sorted(counts.items())
    lines = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{sum(counts.values())} outputs in {len(shards)} WebDataset tar shard(s), "
             f'{len(failed)} failed. <a href="manifest.jsonl">manifest.jsonl</a> names each '
             f'item\'s shard, member and offset; <a href="{INDEX_NAME}">{INDEX_NAME}</a> lists '
             f"the shards.</p>", "<table><tr><th>shard<th>images"]
    lines += [f'<tr><td><a href="{html.escape(name, quote=True)}">{html.escape(name)}</a>'
              f"<td>{count}" for name, count in shards[:PAGE_SHARDS]]
    lines.append("</table>")
    if len(shards) > PAGE_SHARDS:
        lines.append(f"<p>... and {len(shards) - PAGE_SHARDS} more shards.</p>")
    if failed:
        lines.append("<h2>Not rendered</h2><ul>")
        lines += [f"<li>{html.escape(str(row.get('input')))}: "
                  f"{html.escape(str(row.get('error')))}" for row in failed[:PAGE_FAILURES]]
        lines.append("</ul>")
    write_whole(base, "index.html", ("\n".join(lines) + "\n").encode("utf-8"))
    return storage.join(base, "index.html") if storage.is_url(base) else os.path.join(
        base, "index.html")
