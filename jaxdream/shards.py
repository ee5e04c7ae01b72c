"""WebDataset tar shards as inputs: ``shards/train-{000000..000999}.tar``, local or in a bucket.

Each image member of each sample (``000123.jpg``, ``000123.seg.png``) is one input, named
``<shard>#<member>`` and identified by the shard's identity (ETag and size for an object, size
and modification time for a file), the member's name, offset and size. Planning walks the tar
headers only; nothing is extracted, no member is written anywhere, and the worker reads exactly
the member's bytes with one ranged read (:func:`read_member`), which then go through the same
decoder and limits as any file. Only plain (uncompressed) tar is read, as WebDataset writes it.
A shard that is not a readable tar fails alone: its members read before the damage are inputs,
and the shard itself is one failed input (``<shard>#``) naming it and the reason.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from typing import IO, Any

from jaxdream import storage
from jaxdream.errors import ConfigError, ImageError, JaxdreamError

#: ``{000000..000999}`` (zero-padded numeric range) or ``{a,b,c}``.
_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_SHARDS = 1_000_000
MEMBER = "#"


def expand_braces(text: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar, a-01.tar, a-02.tar``; ``{x,y}`` -> both; nested
    combinations multiply. Text without braces is returned alone."""
    parts: list[list[str]] = []
    position = 0
    for match in _BRACES.finditer(text):
        parts.append([text[position:match.start()]])
        body = match.group(1)
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numbers:
            low, high = numbers.groups()
            width = len(low) if low.startswith("0") else 0
            if int(high) < int(low) or int(high) - int(low) >= MAX_SHARDS:
                raise ConfigError(f"{storage.redact(text)}: bad range {{{body}}}")
            parts.append([f"{n:0{width}d}" for n in range(int(low), int(high) + 1)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            parts.append([match.group(0)])
        position = match.end()
    parts.append([text[position:]])
    return ["".join(choice) for choice in itertools.product(*parts)]


def is_shard(entry: str) -> bool:
    return entry.split("?", 1)[0].lower().endswith(".tar")


def _shard_identity(shard: str) -> dict[str, Any]:
    if storage.is_url(shard):
        return json.loads(storage.identity(shard))
    stat = os.stat(shard)
    return {"path": shard, "size": stat.st_size, "mtime": stat.st_mtime_ns}


def _open(shard: str) -> IO[bytes]:
    if storage.is_url(shard):
        fs, path = storage.filesystem(shard)
        return fs.open(path, "rb")
    from jaxdream.files import open_regular_file

    return open_regular_file(shard)


def shard_members(shard: str, name: str, extensions: frozenset[str]) -> list[str]:
    """The image members of a shard as ``<shard>#<member>`` inputs, in tar order; their
    identities are registered for planning. Problems are one ConfigError naming ``name``."""
    found: list[str] = []
    try:
        base = _shard_identity(shard)
        with _open(shard) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                suffix = os.path.splitext(info.name)[1].lower()
                if not info.isreg() or info.issparse() or suffix not in extensions:
                    continue
                entry = f"{shard}{MEMBER}{info.name}"
                storage.register_identity(entry, json.dumps(
                    {**base, "member": info.name, "offset": info.offset_data,
                     "size": info.size, "shard": True}, sort_keys=True))
                found.append(entry)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such shard {storage.redact(shard)}") from None
    except (OSError, tarfile.TarError, JaxdreamError) as error:
        # A corrupt shard among a thousand is one bad input, not a bad config: the members
        # read so far are kept, and the rest is one input whose worker reports why.
        why = getattr(error, "strerror", None) or storage.reason(error, shard)
        entry = f"{shard}{MEMBER}"
        storage.register_identity(entry, json.dumps(
            {"shard": True, "path": storage.redact(shard), "member": "",
             "error": f"not a readable tar shard ({why})"}, sort_keys=True))
        found.append(entry)
    if not found:
        raise ConfigError(f"{name}: {storage.redact(shard)} holds no image member")
    return found


def read_member(entry: str, identity: dict[str, Any],
                max_bytes: int = storage.MAX_OBJECT_BYTES) -> bytes:
    """The bytes of a shard member planned as ``identity``: one ranged read."""
    shard = entry.rsplit(MEMBER, 1)[0]
    name = storage.redact(shard) + MEMBER + identity["member"]
    if identity.get("error"):
        raise ImageError(f"{storage.redact(shard)}: {identity['error']}")
    offset, size = int(identity["offset"]), int(identity["size"])
    if size > max_bytes:
        raise ImageError(f"{name}: {size} bytes, larger than {max_bytes} bytes, refused")
    try:
        if storage.is_url(shard):
            fs, path = storage.filesystem(shard)
            data = bytes(fs.cat_file(path, start=offset, end=offset + size)) if size else b""
        else:
            with _open(shard) as handle:
                handle.seek(offset)
                data = handle.read(size)
    except (OSError, JaxdreamError) as error:
        raise ImageError(f"{name}: cannot read: {storage.reason(error, shard)}") from None
    if len(data) != size:
        raise ImageError(f"{name}: the shard ends inside this member (truncated, or changed "
                         f"since the job was planned)")
    return data
