"""Claiming an output folder: refuse dangerous ones, create it, lock it, know its own files.

:func:`claim` is what ``jaxdream dream`` and ``jaxdream run`` call before writing anything: the
filesystem root and the home folder itself are refused unless forced (a job writes hundreds of
files and a gallery there), a folder that cannot be created is one line naming it, and the
folder is locked for the job. :func:`leave_out_outputs` keeps a job whose inputs include its
own output folder from dreaming its previous outputs.

The lock: one job per output folder, and a lock file that names its holder.

Two jobs writing into one folder lose work: one replaces the manifest the other is appending to,
both render everything, each rewrites the gallery under the other. So ``jaxdream run`` and
``jaxdream dream`` hold ``OUTDIR/.jaxdream.lock`` while they write there, and a second job on
the same folder is refused at once with one line that names the holder (command, pid, host,
start time).

How the lock is taken: the file is opened (never through a symbolic link) and locked with
``flock``, which the kernel releases when the holder dies however it dies, so a lock left by a
killed job is simply taken over. The holder's host and pid are written into the file for the
message. Where ``flock`` is not supported (some network and FUSE mounts), the file is created
with ``O_EXCL`` instead, and a lock whose holder pid no longer runs on this host is taken over;
a lock held from another host is never broken (its pid means nothing here).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxdream.errors import JaxdreamError

__all__ = ["LOCK_NAME", "OutputBusy", "OutputLock", "PrefixLock", "acquire", "acquire_prefix",
           "claim", "describe_holder", "leave_out_outputs", "output_lock", "refuse_dangerous"]

LOCK_NAME = ".jaxdream.lock"
# flock is missing or refused on these (network/FUSE file systems): use O_EXCL instead.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)
_MAX_LOCK_BYTES = 4096

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the O_EXCL protocol is available
    fcntl = None  # type: ignore[assignment]


class OutputBusy(JaxdreamError):
    """Another job holds the output folder, or its lock file cannot be used."""


class OutputLock:
    """A held lock; :meth:`release` (or leaving :func:`output_lock`) gives it back."""

    def __init__(self, path: Path, fd: int, *, flocked: bool, previous: dict[str, Any] | None
                 ) -> None:
        self.path = path
        self._fd: int | None = fd
        self.flocked = flocked
        #: The holder recorded in a stale lock this one took over (a killed job), else None.
        self.previous = previous

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Removes the lock file, then unlocks; waiters that opened the old file notice it is
        gone and start again, so two holders can never coexist."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # a lock file we cannot remove is stale once we exit; the next job takes it
        finally:
            os.close(self._fd)
            self._fd = None


def _holder_info(command: str) -> dict[str, Any]:
    return {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _text(value: object, limit: int = 60) -> str:
    """A field of a lock file (written by anyone) made safe for one line of a message."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_holder(info: dict[str, Any] | None) -> str:
    """Who holds (or held) a lock, from its recorded info, as one safe line."""
    return _describe(info)


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another jaxdream job (it has not written its name yet)"
    return (f"{_text(info.get('command'))} (pid {_text(info.get('pid'))} on "
            f"{_text(info.get('host'))}, since {_text(info.get('started'))})")


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _read_fd(fd: int) -> dict[str, Any] | None:
    try:
        return _parse(os.pread(fd, _MAX_LOCK_BYTES, 0))
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, current = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _open_lock_file(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or path.is_symlink():
            raise OutputBusy(f"{path}: the lock file is a symbolic link; remove it (jaxdream "
                             f"never writes through one)") from None
        if error.errno == errno.EEXIST:
            raise
        raise OutputBusy(f"{path}: cannot create the lock file: "
                         f"{error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputBusy(f"{path}: the lock file is not a regular file; remove it")
    return fd


def _write_info(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8") + b"\n", 0)


def _busy(folder: Path, info: dict[str, Any] | None, path: Path) -> OutputBusy:
    return OutputBusy(f"{folder}: in use by {_describe(info)}; wait for it to finish or choose "
                      f"another output folder (if no such job runs, delete {path})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or nonsense): do not take it over
    return True


def _acquire_exclusive(folder: Path, path: Path, info: dict[str, Any]) -> OutputLock:
    """The O_EXCL protocol, for file systems without flock."""
    previous = None
    for _ in range(5):
        try:
            fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            try:
                with open(path, "rb") as file:
                    raw = file.read(_MAX_LOCK_BYTES)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError:
                raw = b""
            holder = _parse(raw)
            stale = (holder is not None and holder.get("host") == info["host"]
                     and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))
            if not stale:
                raise _busy(folder, holder, path) from None
            try:  # take it over only if it is still the stale lock we judged
                with open(path, "rb") as file:
                    if file.read(_MAX_LOCK_BYTES) == raw:
                        path.unlink()
            except OSError:
                pass
            previous = holder
            continue
        _write_info(fd, info)
        return OutputLock(path, fd, flocked=False, previous=previous)
    raise OutputBusy(f"{path}: the lock keeps changing hands; try again")


def acquire(folder: Path, command: str) -> OutputLock:
    """Takes the lock of ``folder`` (which must exist) for ``command``, or raises OutputBusy."""
    path = folder / LOCK_NAME
    info = _holder_info(command)
    if fcntl is None:  # pragma: no cover
        return _acquire_exclusive(folder, path, info)
    for _ in range(5):
        fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise _busy(folder, holder, path) from None
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_FLOCK:
                return _acquire_exclusive(folder, path, info)
            raise OutputBusy(f"{path}: cannot lock: {error.strerror or error}") from None
        if not _same_file(fd, path):  # its holder removed it while we waited: start again
            os.close(fd)
            continue
        previous = _read_fd(fd)  # a holder that died without releasing: taken over
        _write_info(fd, info)
        return OutputLock(path, fd, flocked=True, previous=previous)
    raise OutputBusy(f"{path}: the lock keeps changing hands; try again")


@contextlib.contextmanager
def output_lock(folder: Path, command: str) -> Iterator[OutputLock]:
    """Holds ``folder``'s lock for the block; raises OutputBusy naming the holder if taken."""
    lock = acquire(folder, command)
    try:
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# Locking an object-store prefix
#
# A bucket has no flock and no O_EXCL, but it has a create-only PUT: S3's ``If-None-Match: *``
# and GCS's ``ifGenerationMatch=0`` (fsspec's ``pipe_file(..., mode="create")`` for both), which
# the store refuses when the object exists. ``PREFIX/.jaxdream.lock`` is created that way, with
# the holder's command, pid, host, start time and a random token, and removed at the end (only
# while it still holds that token). Nothing releases it when a driver is killed, so, as the
# O_EXCL protocol above: a lock whose holder pid no longer runs on this host is taken over; one
# held from another host is never broken unless forced (``jaxdream run --force``), and the
# refusal names the lock object to delete. A take-over overwrites the lock only if it is still
# the one judged stale (S3 ``If-Match`` on its ETag), so two drivers never both take it over.


class PrefixLock:
    """A held lock on an object-store prefix; :meth:`release` gives it back."""

    def __init__(self, url: str, token: str, previous: dict[str, Any] | None) -> None:
        self.url = url
        self.token = token
        #: The holder recorded in a lock that was taken over (a killed job), else None.
        self.previous = previous

    def __enter__(self) -> PrefixLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Removes the lock object if it is still this one (a forced take-over is not undone)."""
        if not self.token:
            return
        from jaxdream import storage

        try:
            holder = _parse(storage.read_object(self.url, _MAX_LOCK_BYTES))
            if holder is not None and holder.get("token") == self.token:
                storage.delete_objects([self.url])
        except JaxdreamError:
            pass  # gone already, or unreadable: the next job says so and how to clear it
        self.token = ""


def _busy_prefix(prefix: str, info: dict[str, Any] | None, url: str) -> OutputBusy:
    from jaxdream.storage import redact

    return OutputBusy(f"{redact(prefix)}: in use by {_describe(info)}; wait for it to finish or "
                      f"choose another output prefix (if no such job runs, delete "
                      f"{redact(url)} or rerun with --force)")


def _create_only(fs: Any, path: str, data: bytes, url: str, etag: str | None = None) -> bool:
    """Writes the lock object only if it does not exist (``etag`` None) or is still the object
    with ``etag``; False when the store refused because another writer came first."""
    from jaxdream.storage import reason, redact

    try:
        if etag is None:
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data, IfMatch=etag)
    except FileExistsError:  # the store's refusal: the lock exists (or is no longer etag)
        return False
    except FileNotFoundError:
        if etag is not None:  # removed since it was read: start again
            return False
        raise OutputBusy(f"{redact(url)}: cannot write the lock: no such bucket") from None
    except Exception as error:  # noqa: BLE001 - any failure of the store is one line
        if "precondition" in str(error).lower():
            return False
        raise OutputBusy(f"{redact(url)}: cannot write the lock: {reason(error)}") from None
    return True


def acquire_prefix(prefix: str, command: str, *, force: bool = False) -> PrefixLock:
    """Takes the lock of the object-store ``prefix`` for ``command``, or raises OutputBusy
    naming its holder and the lock object. ``force`` takes over a lock held from anywhere."""
    from jaxdream import storage

    url = storage.join(prefix, LOCK_NAME)
    info = {**_holder_info(command), "token": secrets.token_hex(12)}
    data = json.dumps(info).encode("utf-8") + b"\n"
    fs, path = storage.filesystem(url)
    previous = None
    for _ in range(5):
        if _create_only(fs, path, data, url):
            return PrefixLock(url, info["token"], previous)
        try:
            fs.invalidate_cache(path)
            etag = str(fs.info(path).get("ETag") or "") or None
            holder = _parse(storage.read_object(url, _MAX_LOCK_BYTES))
        except (OSError, JaxdreamError):
            continue  # released meanwhile: try again
        stale = (holder is not None and holder.get("host") == info["host"]
                 and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))
        if not (stale or force):
            raise _busy_prefix(prefix, holder, url)
        previous = holder or {}
        if etag is not None and url.startswith("s3://"):
            if _create_only(fs, path, data, url, etag):
                return PrefixLock(url, info["token"], previous)
        else:  # no conditional overwrite here: remove it, then create it as anyone would
            storage.delete_objects([url])
    raise OutputBusy(f"{storage.redact(url)}: the lock keeps changing hands; try again")


# --------------------------------------------------------------------------------------------
# Claiming a folder


def refuse_dangerous(folder: Path, *, force: bool = False) -> None:
    """Refuses the filesystem root and the home folder itself as an output folder (a job
    scatters outputs, thumbnails and a gallery there), unless ``force``."""
    if force:
        return
    real = os.path.realpath(folder)
    home = os.path.realpath(os.path.expanduser("~"))
    what = ("the filesystem root" if os.path.dirname(real) == real
            else "your home folder" if real == home else None)
    if what is not None:
        raise OutputBusy(f"{folder}: refusing to write into {what}; choose a folder for the "
                         f"outputs (or pass --force)")


def claim(folder: Path, command: str, *, force: bool = False) -> OutputLock:
    """Checks, creates and locks ``folder`` for ``command``; every problem is one OutputBusy
    line naming the folder (a read-only parent, a file in the way, another job)."""
    from jaxdream.files import output_folder

    refuse_dangerous(folder, force=force)
    return acquire(output_folder(folder, OutputBusy), command)


def _is_jaxdream_png(path: str) -> bool:
    from jaxdream.images import read_recipe

    try:
        read_recipe(path)
    except JaxdreamError:
        return False
    return True


def leave_out_outputs(paths: list[str], outdir: Path) -> list[str]:
    """``paths`` (found by expanding a folder or glob) without this job's own output files:
    inside ``outdir``, its thumbnails and every PNG carrying a jaxdream recipe (dreams and
    contact sheets). Otherwise a rerun into the input folder dreams the previous dreams."""
    out = os.path.realpath(outdir)
    prefix = os.path.join(out, "")
    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if not real.startswith(prefix):
            kept.append(path)
            continue
        inside = os.path.relpath(real, out).split(os.sep)
        if inside[0] == "thumbs" and len(inside) > 1:
            continue
        if real.lower().endswith(".png") and _is_jaxdream_png(real):
            continue
        kept.append(path)
    return kept
