"""Input entries to image paths and URLs: files, folders, globs, ``.txt``/``.csv`` lists, and
object-store prefixes, globs and objects (``s3://``, ``gs://``, ``http(s)://``, see
:mod:`jaxdream.storage`), as a config's ``inputs`` or the INPUTs of ``jaxdream dream`` name
them. Nothing is decoded here; remote entries are listed, never read."""

from __future__ import annotations

import glob
import itertools
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxdream.errors import ConfigError
from jaxdream.files import display
from jaxdream.shards import expand_braces, is_shard, shard_members
from jaxdream.tables import is_table, table_inputs
from jaxdream.storage import (LIST_SUFFIXES, is_url, iter_url, read_list, register_identity,
                              take_identity)

#: Extensions picked up by folders and globs (files named or listed explicitly are all kept).
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .gif .bmp .tif .tiff .webp .ppm".split())


def image_files(folder: str) -> list[str]:
    """The image files directly inside ``folder`` (by extension), sorted by name."""
    return [os.path.join(folder, child.name) for child in sorted(Path(folder).iterdir())
            if child.suffix.lower() in IMAGE_EXTENSIONS and child.is_file()]


def _what_it_is(entry: str) -> str:
    """Why an entry that is neither a folder, a file nor a glob cannot be used."""
    try:
        mode = os.stat(entry).st_mode
    except OSError:
        return "no such file or folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not an image or a list"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not an image or a list"
    if stat.S_ISSOCK(mode):
        return "a socket, not an image or a list"
    return "not a regular file, an image or a list"


def _without_outputs(found: list[str], outdir: Path | None) -> list[str]:
    if outdir is None:
        return found
    from jaxdream.outdir import leave_out_outputs

    return leave_out_outputs(found, outdir)


def _expand_entry(entry: Any, where: str, lenient: bool, outdir: Path | None,
                  column: str | None = None) -> Iterator[tuple[str, str]]:
    """(path, identity) for each input ``entry`` names; identity is what a listing recorded
    ("" for a local file or an unlisted URL). Problems with the entry raise ConfigError before
    the first input comes out."""
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise ConfigError(f"{where}: expected a path, got {entry!r:.60}")
    # Strict (a config file): the key path and the entry; lenient (an INPUT): the entry alone.
    name = display(entry) if lenient else f"{where}: {entry!r}"
    if "{" in entry and not os.path.lexists(entry):
        names = expand_braces(entry)  # shards/train-{000000..000999}.tar
        if len(names) > 1:
            return _each(names, where, lenient, outdir, column)
    if is_shard(entry) and (is_url(entry) or os.path.isfile(entry)):
        return _recorded(shard_members(entry, name, IMAGE_EXTENSIONS))
    if is_table(entry) and (is_url(entry) or os.path.isfile(entry)):
        return _recorded(table_inputs(entry, name, column))  # image rows, or paths and URLs
    if is_url(entry):
        listing = iter_url(entry, name, IMAGE_EXTENSIONS)
        first = next(listing)  # listing errors before anything is planned
        return itertools.chain([first], listing)
    return ((path, "") for path in _expand_local(entry, name, lenient, outdir))


def _each(names: list[str], where: str, lenient: bool, outdir: Path | None,
          column: str | None) -> Iterator[tuple[str, str]]:
    for one in names:
        yield from _expand_entry(one, where, lenient, outdir, column)


def _recorded(paths: list[str]) -> Iterator[tuple[str, str]]:
    """Paths with the identities their listing recorded, taken from the record as they go."""
    return ((path, take_identity(path)) for path in paths)


def _expand_local(entry: str, name: str, lenient: bool, outdir: Path | None) -> list[str]:
    path = Path(entry)
    try:
        if path.is_dir():
            found = _without_outputs(image_files(entry), outdir)
            empty = "holds no image file"
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            found = read_list(entry, name)  # paths or URLs, relative ones from the list's folder
            empty = "lists no file"
        elif path.is_file():
            return [entry]
        elif any(char in entry for char in "*?[") and not os.path.lexists(entry):
            found = _without_outputs(
                [p for p in sorted(glob.glob(entry, recursive=True)) if os.path.isfile(p)
                 and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS], outdir)
            empty = "matches no image file"
        elif lenient:
            return [entry]  # missing, a pipe, a dangling link: the renderer says which
        else:
            raise ConfigError(f"{name}: {_what_it_is(entry)}")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{name}: cannot read: {reason}") from None
    if not found:
        raise ConfigError(f"{name} {empty}")
    return found


def iter_inputs(entries: Sequence[str], *, source: str = "inputs", lenient: bool = False,
                outdir: Path | None = None, image_column: str | None = None
                ) -> Iterator[tuple[str, str, str]]:
    """The inputs config entries name, as they are listed: (path, identity, "") each, without
    repeats (first spelling wins), where identity is what a listing recorded for an object, a
    shard member or a table row ("" for a local file or a URL named on its own).

    Every entry is opened before the first input comes out (a folder or glob listed, a
    bucket's first page, a list file read, the first shard of a brace list), so an entry that
    matches nothing raises ConfigError before anything renders, or (``lenient``) comes out as
    (entry, "", reason). The rest of each listing is then taken as it comes, so the first
    inputs of a bucket come out while the rest is listed. See :func:`expand_inputs` for what
    an entry may be."""
    opened: list[Iterator[tuple[str, str]] | str] = []  # each entry's listing, or its error
    for index, entry in enumerate(entries):
        try:
            found = iter(_expand_entry(entry, f"{source}[{index}]", lenient=lenient,
                                       outdir=outdir, column=image_column))
            first = next(found, None)  # a brace list opens its first member only here
        except ConfigError as error:
            if not lenient:
                raise
            opened.append(str(error))
            continue
        opened.append(itertools.chain([] if first is None else [first], found))
    seen: set[str] = set()
    for entry, found in zip(entries, opened, strict=True):
        if isinstance(found, str):
            yield entry, "", found
            continue
        for path, identity in found:
            key = path if is_url(path) else os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                yield path, identity, ""


def expand_inputs(entries: Sequence[str], *, source: str = "inputs",
                  failures: list[tuple[str, str]] | None = None,
                  outdir: Path | None = None, image_column: str | None = None) -> list[str]:
    """The image paths that config input entries name, deduplicated in first-seen order.

    An entry is a file; a folder (its image files by extension, sorted, not recursive); a glob
    (``photos/**/*.jpg``: the image files it matches, sorted); a ``.txt`` list of paths or
    URLs, one per line (blank lines and ``#`` comments skipped, relative paths from the list's
    folder) or a ``.csv`` one (the column headed path/url/image/file, else the first); or any
    of these in an object store (``s3://bucket/photos/``, ``gs://b/**/*.jpg``) or on the web.
    An entry that matches nothing is a ConfigError naming ``source[index]``; pass
    ``source=f"{config.source}: inputs"``. With a ``failures`` list (inputs named on the
    command line) such an entry is appended to it as (entry, reason) instead, and any other
    path is kept as given. Images are not opened, and the lines of a list are not checked: the
    renderer reports a missing or bad image on its own, as it goes. With ``outdir``, folders
    and globs leave out that job's own outputs (see :func:`jaxdream.outdir.leave_out_outputs`),
    so a job whose input folder is its output folder never dreams its earlier dreams; a file
    named on its own is always kept. ``image_column`` names the column of Parquet files to
    read (see :func:`jaxdream.tables.table_inputs`).
    """
    found: list[str] = []
    for path, identity, failure in iter_inputs(entries, source=source,
                                               lenient=failures is not None, outdir=outdir,
                                               image_column=image_column):
        if failure:
            assert failures is not None
            failures.append((path, failure))
            continue
        if identity:
            register_identity(path, identity)  # for plan() of these paths
        found.append(path)
    return found
