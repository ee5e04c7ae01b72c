"""Inputs and outputs where datasets live: object stores and the web, through fsspec
(``s3://``, ``gs://``, ``http(s)://``, any protocol fsspec has an implementation for).

Credentials and endpoints are never handled here: the protocol's own library finds them where it
always does (``AWS_*`` variables including ``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles;
``GOOGLE_APPLICATION_CREDENTIALS``; fsspec's config files). Nothing here prints or stores the
options of a filesystem, and a URL is shown without user name, password or query string (a
presigned URL carries its signature there).

Listing gives what identifies an object without reading it (:func:`identity`: ETag, size,
modification time), so a job is planned from listings alone; the bytes are read by the worker
that renders them (:func:`read_object`), and an output is written as one whole object
(:func:`put_object`: a PUT is all-or-nothing, so no reader ever sees a partial image).
fsspec is imported on first use: local-only work never pays for it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import posixpath
import re
import secrets
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jaxdream.errors import ConfigError, ImageError, JaxdreamError
from jaxdream.files import display

#: ``scheme://``: two letters at least, so that a Windows drive (``C:\\``) is never a URL.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
#: An image object larger than this is refused without being downloaded (a photo is a few MB).
MAX_OBJECT_BYTES = 256 * 1024 * 1024
#: A list file (``.txt``/``.csv`` of paths or URLs) larger than this is refused.
MAX_LIST_BYTES = 256 * 1024 * 1024
LIST_SUFFIXES = (".txt", ".csv")
#: Header cells that name the column of paths in a ``.csv`` list (else the first column).
_PATH_COLUMNS = ("path", "url", "uri", "image", "file", "filename", "image_path")
#: Identity of each object listed so far, by URL: planning reuses what a listing returned.
_IDENTITIES: dict[str, str] = {}
#: Buckets known to exist (see :func:`_no_bucket`).
_BUCKETS_SEEN: set[str] = set()


class StorageError(JaxdreamError):
    """An object store or URL could not be listed, read or written; one line, no secrets."""


def is_url(text: str) -> bool:
    """True for ``scheme://...`` (an object store or the web), False for a local path."""
    return isinstance(text, str) and bool(_URL.match(text))


#: A URL that :func:`redact` would return unchanged: lower-case scheme and host, no user,
#: port, query or fragment, printable ASCII (checked without parsing: a listing of a
#: million objects redacts each URL three times).
_PLAIN_URL = re.compile(r"[a-z][a-z0-9+.-]+://[a-z0-9._-]+"
                        r"(/[!$%&'()*+,\-./0-9:;=A-Z\[\]^_`a-z{|}~]*)?")


@functools.lru_cache(maxsize=64)  # planning redacts each listed URL three times in a row
def redact(url: str) -> str:
    """``url`` without user name, password, query or fragment, safe to print and record."""
    if _PLAIN_URL.fullmatch(url) and "//" not in url.split("://", 1)[1]:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return display(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return display(urlunsplit((parts.scheme, host, parts.path, "", "")))


def join(prefix: str, name: str) -> str:
    """``prefix/name`` for an object-store prefix (with or without a trailing slash)."""
    return prefix.rstrip("/") + "/" + name


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it."""
    import fsspec

    _quiet_store_logs()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        scheme = url.split("://", 1)[0]
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f"pip install 'jaxdream[{extra}]'" if extra else "install its fsspec package"
        raise StorageError(f"{redact(url)}: {scheme}:// needs a package that is not installed "
                           f"({hint}): {error}") from None
    except ValueError as error:
        raise StorageError(f"{redact(url)}: cannot be opened: {error}") from None


def _quiet_store_logs() -> None:
    """gcsfs (2026) logs a warning on every call it cannot learn a bucket's layout for (no
    layout permission, no such bucket, an emulator), one stderr line each through Python's
    last-resort handler; jaxdream reports store errors itself, in one line. A level the user
    set is kept."""
    logger = logging.getLogger("gcsfs")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def reason(error: BaseException, url: str | None = None) -> str:
    """What went wrong with a store, in words: the kind, then the server's first line.
    ``url`` (what was being reached) lets a missing object be told from a missing bucket where
    the error does not say (gcsfs reports any 404 as the bare path)."""
    text = " ".join(str(error).split())[:200]
    if isinstance(error, FileNotFoundError):
        if not _bucket_missing(text, url):
            return "no such object or prefix"
        return "the bucket does not exist" + ("" if _is_gcs(url) else f" ({text})")
    # gcsfs: a 403 is an OSError "Forbidden: ...", a 401 an HttpError with a code.
    if (isinstance(error, PermissionError) or getattr(error, "code", None) in (401, 403)
            or (isinstance(error, OSError) and text.startswith("Forbidden"))):
        return (f"access denied ({text or 'forbidden'}); check the credentials (AWS_* or "
                f"GOOGLE_APPLICATION_CREDENTIALS) and the bucket's policy")
    if isinstance(error, JaxdreamError):
        return str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _bucket_missing(text: str, url: str | None) -> bool:
    """Whether a not-found error means the bucket: S3 says so in words; for GCS (whose error
    is only the path, which may well contain "bucket") the bucket itself is looked up."""
    if not _is_gcs(url):
        return "bucket" in text.lower()
    return _no_bucket(url)  # type: ignore[arg-type]


def _is_gcs(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme in ("gs", "gcs")


def _no_bucket(url: str) -> bool:
    """True when the bucket of ``url`` (an object-store URL) is known not to exist: looking
    it up says "not found". Forbidden or failing lookups say nothing (a role without
    ``storage.buckets.get`` must not turn every missing object into a missing bucket), and a
    bucket seen once is not looked up again (many missing objects, one bucket)."""
    fs, path = filesystem(url)
    bucket = f"{urlsplit(url).scheme}://{path.split('/', 1)[0]}"
    if bucket in _BUCKETS_SEEN:
        return False
    try:
        fs.info(path.split("/", 1)[0])
    except FileNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - cannot tell: say only what is certain
        return False
    _BUCKETS_SEEN.add(bucket)
    return False


def identity_of(url: str, info: dict[str, Any]) -> str:
    """What identifies an object without reading it: its URL, ETag (or generation/checksum)
    and size; the modification time only where there is no ETag. For GCS the content's MD5
    (or CRC32C: composite objects have no MD5) comes first: its ``etag`` also changes when
    only the metadata does, and ``generation`` when the same bytes are written again."""
    etag = ""
    for key in ("ETag", "md5Hash", "crc32c", "etag", "generation"):
        if info.get(key):
            etag = str(info[key]).strip('"')
            break
    mtime = "" if etag else str(info.get("LastModified") or info.get("mtime")
                                 or info.get("updated") or "")
    return json.dumps({"url": redact(url), "etag": etag, "size": info.get("size"),
                       "mtime": mtime}, sort_keys=True)


def register_identity(entry: str, text: str) -> None:
    """Records what identifies ``entry`` (an object or shard member) for planning."""
    _IDENTITIES[entry] = text


def known_identity(entry: str) -> str | None:
    """The identity a listing recorded for ``entry``, if any."""
    return _IDENTITIES.get(entry)


def take_identity(entry: str) -> str:
    """:func:`known_identity`, forgotten here: a streamed plan carries it with its item, so
    a listing of a million objects is not kept twice ("" if none was recorded)."""
    return _IDENTITIES.pop(entry, "")


def identity(url: str) -> str:
    """:func:`identity_of` an object, from its listing when it was listed, else one HEAD."""
    known = _IDENTITIES.get(url)
    if known is not None:
        return known
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as error:  # noqa: BLE001 - gcsfs raises its own HttpError too
        raise StorageError(f"{redact(url)}: {reason(error, url)}") from None
    if info.get("type") == "directory":
        raise StorageError(f"{redact(url)}: is a prefix (a folder), not an object")
    return identity_of(url, info)


def expand_url(entry: str, name: str, extensions: Iterable[str]) -> list[str]:
    """:func:`iter_url` as a list; each object's identity is recorded for planning
    (:func:`known_identity`)."""
    found = []
    for url, text in iter_url(entry, name, extensions):
        if text:
            _IDENTITIES[url] = text
        found.append(url)
    return found


def iter_url(entry: str, name: str, extensions: Iterable[str]) -> Iterator[tuple[str, str]]:
    """The object URLs an ``inputs`` entry names, each with its identity ("" for a URL on the
    web or a list's line, not listed): a prefix (``s3://b/photos/``: its image objects, by
    extension, sorted, not recursive), a glob on one, a list file, or one object. Listing
    errors (no bucket, no access, nothing there) are ConfigErrors naming ``name``, raised
    before the first URL; the URLs then come one by one, each identity made as it is taken."""
    exts = tuple(extensions)
    fs, path = filesystem(entry)
    web = entry.split("://", 1)[0] in ("http", "https")
    try:
        if not web and any(char in path for char in "*?["):
            infos = fs.glob(path, detail=True)
            empty = "matches no image object"
        elif not web and (entry.endswith("/") or fs.isdir(path)):
            pages = _pages(fs, path)
            if pages is not None:  # a store that lists page by page: stream it
                yield from _paged(fs, pages, name, exts)
                return
            infos = {info["name"]: info for info in fs.ls(path, detail=True)}
            empty = "holds no image object"
        elif posixpath.splitext(urlsplit(entry).path)[1].lower() in LIST_SUFFIXES:
            found = read_list(entry, name)
            if not found:
                raise ConfigError(f"{name} lists no file")
            yield from ((url, "") for url in found)
            return
        else:
            text = "" if web else identity_of(entry, fs.info(path))
            yield entry, text
            return
    except StorageError as error:
        raise ConfigError(str(error)) from None
    except JaxdreamError:
        raise
    except Exception as error:  # noqa: BLE001 - gcsfs raises its own HttpError too
        raise ConfigError(f"{name}: {reason(error, entry)}") from None
    keys = sorted(key for key, info in infos.items()
                  if info.get("type") == "file" and key.lower().endswith(exts))
    if not keys:
        if not infos and _no_bucket(entry):  # a glob on a missing bucket matches nothing
            raise ConfigError(f"{name}: the bucket does not exist")
        raise ConfigError(f"{name} {empty}")
    for key in keys:
        url = fs.unstrip_protocol(key)
        yield url, identity_of(url, infos[key])


#: Objects taken from a store's listing at a time (S3 returns pages of 1000).
LIST_BATCH = 1000


def _pages(fs: Any, path: str) -> Iterator[list[dict[str, Any]]] | None:
    """The objects directly under ``path`` in batches as the store returns them, for a store
    whose filesystem can list page by page (s3fs's ``_iterdir``), else None. S3 lists keys in
    order (UTF-8 bytes, which is the order of Python's ``sorted``), so the batches need no
    sorting; the first comes after one request, not after the whole listing."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    iterdir = getattr(fs, "_iterdir", None)
    if "s3" not in protocols or iterdir is None:  # s3fs's own paged listing, else none
        return None
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    listing = iterdir(bucket, prefix=key.rstrip("/") + "/" if key else "", delimiter="/")

    async def batch() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        try:
            while len(found) < LIST_BATCH:
                found.append(await listing.__anext__())
        except StopAsyncIteration:
            pass
        return found

    def batches() -> Iterator[list[dict[str, Any]]]:
        while found := sync(fs.loop, batch):
            yield found

    return batches()


def _paged(fs: Any, pages: Iterator[list[dict[str, Any]]], name: str,
           exts: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """:func:`iter_url` of a prefix listed page by page; the errors of any page are
    ConfigErrors naming ``name``."""
    any_found = False
    while True:
        try:
            page = next(pages, None)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{name}: {reason(error)}") from None
        if page is None:
            break
        for info in page:
            key = info["name"]
            if info.get("type") == "file" and key.lower().endswith(exts):
                any_found = True
                url = fs.unstrip_protocol(key)
                yield url, identity_of(url, info)
    if not any_found:
        raise ConfigError(f"{name} holds no image object")


def read_list(where: str, name: str) -> list[str]:
    """The entries of a ``.txt`` (one per line, ``#`` comments) or ``.csv`` (the column headed
    path/url/image/file, else the first) list, local or remote; relative entries are taken
    from the list's own folder or prefix. Not checked: the renderer reports a bad one."""
    try:
        if is_url(where):
            data = read_object(where, MAX_LIST_BYTES)
        else:
            if os.path.getsize(where) > MAX_LIST_BYTES:
                raise ConfigError(f"{name}: the list is larger than {MAX_LIST_BYTES} bytes")
            with open(where, "rb") as handle:
                data = handle.read()
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, JaxdreamError) as error:
        why = (getattr(error, "strerror", None) or "not UTF-8 text"
               if not isinstance(error, JaxdreamError) else str(error))
        raise ConfigError(f"{name}: cannot read: {why}") from None
    if where.lower().endswith(".csv"):
        rows = [row for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
        column = 0
        if rows:
            header = [cell.strip().lower() for cell in rows[0]]
            named = [header.index(key) for key in _PATH_COLUMNS if key in header]
            if named:
                column, rows = named[0], rows[1:]
        lines = [row[column].strip() for row in rows if len(row) > column]
    else:
        lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if any("\0" in line for line in lines):
        raise ConfigError(f"{name}: the list holds a NUL character")
    return [relative_to(where, line) for line in lines]


def relative_to(list_file: str, entry: str) -> str:
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(list_file):
        return join(list_file.rsplit("/", 1)[0], entry)
    return os.path.join(os.path.dirname(list_file), entry)


def read_object(url: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """The bytes of an object, at most ``max_bytes`` (one ranged GET: a larger object is
    refused after ``max_bytes + 1`` bytes, whatever its listing claimed). Problems are one
    ImageError line naming the (redacted) URL, so a bad object fails alone."""
    name = redact(url)
    fs, path = filesystem(url)
    try:
        if url.split("://", 1)[0].lower() in ("http", "https"):
            # Streamed, so that a server that ignores Range never sends more than the cap.
            with fs.open(path, "rb", block_size=0) as stream:
                data = stream.read(max_bytes + 1)
        else:
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as error:
        if "not satisfiable" not in str(error):
            raise ImageError(f"{name}: cannot read: {reason(error, url)}") from None
        data = b""  # a range of an empty object: the decoder says "empty file"
    except ValueError as error:
        raise ImageError(f"{name}: cannot read: {reason(error, url)}") from None
    except Exception as error:  # an HTTP or protocol error of the filesystem's own kind
        raise ImageError(f"{name}: cannot read: {reason(error, url)}") from None
    if len(data) > max_bytes:
        raise ImageError(f"{name}: larger than {max_bytes} bytes, refused")
    return bytes(data)


def put_object(url: str, data: bytes) -> None:
    """Writes one whole object (a single PUT for anything an image is): it exists, complete,
    once this returns, and not before. Raises StorageError."""
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except Exception as error:  # noqa: BLE001 - any failure of the store is this one error
        raise StorageError(f"{redact(url)}: cannot write: {reason(error, url)}") from None


def delete_objects(urls: list[str]) -> None:
    """Removes objects (best effort: what cannot be removed is left)."""
    if not urls:
        return
    fs, _ = filesystem(urls[0])
    try:
        fs.rm([filesystem(url)[1] for url in urls])
    except Exception:  # noqa: BLE001 - leftovers are harmless: the manifest supersedes them
        pass


def list_prefix(prefix: str, *, recursive: bool = False) -> dict[str, dict[str, Any]]:
    """Objects under ``prefix`` by name relative to it; {} when there are none."""
    fs, path = filesystem(prefix)
    base = path.rstrip("/") + "/"
    try:
        if recursive:
            infos = fs.find(base, detail=True)
        else:
            infos = {info["name"]: info for info in fs.ls(base, detail=True, refresh=True)}
    except FileNotFoundError as error:
        if _bucket_missing(str(error), prefix):
            raise StorageError(f"{redact(prefix)}: {reason(error, prefix)}") from None
        return {}
    except Exception as error:  # noqa: BLE001 - gcsfs raises its own HttpError too
        raise StorageError(f"{redact(prefix)}: {reason(error, prefix)}") from None
    return {name[len(base):]: info for name, info in infos.items()
            if info.get("type") == "file" and name.startswith(base)}


def check_writable(prefix: str) -> None:
    """Writes and removes a small object under ``prefix``, so that a missing bucket, wrong
    credentials or a forbidden prefix stop a job before anything renders (ConfigError)."""
    probe = join(prefix, f".jaxdream-write-check-{secrets.token_hex(6)}")
    try:
        put_object(probe, b"jaxdream write check\n")
        list_prefix(prefix)
    except StorageError as error:
        raise ConfigError(f"output {error}") from None
    delete_objects([probe])
