"""Safe file handling, written once: opening what must be a regular file, writing a file
atomically, preparing an output folder, removing what interrupted writes left, and showing a
name on one line. Standard library only, so every module can use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from jaxdream.errors import JaxdreamError

#: What :func:`atomic_write` writes before the rename: ``.<name>.<12 hex digits>.tmp``.
TEMP_NAME = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.tmp$")
#: Longest stem of a temporary's name (names are limited to 255 bytes).
_TEMP_STEM = 100


class Refused(JaxdreamError):
    """A path that is not a regular file to read; the message is the reason alone, for the
    caller to prefix with the name as its user knows it."""


def display(text: str | os.PathLike[str] | os.PathLike[bytes] | bytes) -> str:
    """A name or text made safe to print on one line.

    File names may legally contain newlines, escape sequences or bytes that are not valid
    UTF-8; printing those raw would break the "one readable line" promise (or the terminal), so
    every non-printable character is shown as a Python escape (``\\n``, ``\\x1b``, ``\\udcff``).
    """
    try:
        text = os.fsdecode(text)
    except TypeError:
        text = repr(text)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def open_regular_file(path: str | os.PathLike[str], *, allow_empty: bool = False
                      ) -> IO[bytes]:
    """Opens ``path`` for binary reading, refusing anything but a regular file (and an empty
    one unless ``allow_empty``) with :class:`Refused`; OSError from ``open`` passes through.

    The file is opened *first* and then inspected with ``fstat`` on the open descriptor, so the
    checks apply to exactly what is read (no race between a ``stat`` and the ``open``).
    ``O_NONBLOCK`` keeps a named pipe called ``photo.jpg`` from hanging the program in ``open``;
    it has no effect on regular files.
    """
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "named pipe" if stat.S_ISFIFO(mode)
                    else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "socket" if stat.S_ISSOCK(mode) else "special file")
            raise Refused(f"is not a regular file ({kind})")
        if not allow_empty and os.fstat(fd).st_size == 0:
            raise Refused("empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` so that readers (and a crash) see the old file or the whole new one.

    ``write`` fills a hidden temporary beside ``path`` (``.<name>.<random>.tmp``, mode 0666
    less the umask, like any new file), which is flushed, fsync-ed and renamed over ``path``;
    the folder is then fsync-ed too. If anything fails, ``write`` raising included, the
    temporary is removed and ``path`` is left as it was.
    """
    dest = os.fspath(path)
    directory = os.path.dirname(dest) or "."
    fd, tmp = _create_temp_file(directory, os.path.basename(dest))
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        tmp = None
        _fsync_directory(directory)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """:func:`atomic_write` for writers that need a path rather than a file (a video encoder):
    yields a temporary path beside ``path``, renamed over it when the block succeeds, removed
    when it fails."""
    dest = os.fspath(path)
    directory = os.path.dirname(dest) or "."
    fd, tmp = _create_temp_file(directory, os.path.basename(dest))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
        tmp = ""
        _fsync_directory(directory)
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _create_temp_file(directory: str, base: str) -> tuple[int, str]:
    """Creates ``.<base>.<random>.tmp`` in ``directory``; returns (fd, path). Unlike
    :func:`tempfile.mkstemp` (always mode 0600) the result gets ordinary permissions."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0))
    for _ in range(100):
        candidate = os.path.join(directory, f".{base[:_TEMP_STEM]}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync_directory(directory: str) -> None:
    """Persists a rename (best effort: not every OS or filesystem allows it)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def clean_temporaries(outputs: Iterable[Path]) -> int:
    """Removes the temporaries of interrupted writes of these outputs; returns how many.

    A process killed while writing leaves ``.<name>.<random>.tmp`` beside the output it was
    writing (hidden, and never renamed into place). Only temporaries of these outputs are
    touched; call it only when nothing else is writing them.
    """
    by_folder: dict[Path, set[str]] = {}
    for output in outputs:
        by_folder.setdefault(output.parent, set()).add(output.name[:_TEMP_STEM])
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = TEMP_NAME.match(entry.name)
            if match and match.group("base") in names and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


def output_folder(path: str | os.PathLike[str],
                  error: type[JaxdreamError] = JaxdreamError) -> Path:
    """Creates the output folder ``path`` (and its parents) if needed; ``error`` when it is
    something else, or cannot be created."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise error(f"output folder '{display(folder)}' exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as problem:
        raise error(f"{display(folder)}: cannot create the output folder: "
                    f"{problem.strerror or problem}") from None
    return folder
