"""Compiled dream programs kept on disk, so that a warm run loads them instead of retracing.

JAX's persistent compilation cache saves XLA's compile, but its key is the lowered program, so
every run still traces and lowers the whole dream (1.5-3 s per image size for EfficientNet on
2 cores) before it can look the program up. This store keys the *compiled executable* by
everything that decides it without tracing: the jaxdream source, the jax/jaxlib versions,
the backend and device, ``XLA_FLAGS``, the model's structure, the static settings and every
argument's shape and dtype. A hit is one file read and a deserialise (about 0.5 s).

The files hold native code and are read with JAX's own (pickle-based) executable format:
the cache folder is trusted exactly as JAX's compilation cache folder is (both live under the
user's own cache root; never point either at a folder others can write).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib

_directory: Path | None = None


@dataclasses.dataclass
class CompileStats:
    #: Programs built in this process (lowered and compiled, or loaded from the disk cache).
    programs: int = 0
    #: Of those, how many XLA compiled afresh (not found in the persistent cache).
    compiled: int = 0
    #: Of those, how many were loaded as executables, with no tracing (see this module).
    loaded: int = 0
    #: (start, end) of each build, ``time.perf_counter()`` seconds; builder threads overlap.
    spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Wall seconds during which at least one program was being built (builds that ran
        at once in threads count once; dreaming may have run beside them)."""
        total, reached = 0.0, -math.inf
        for start, end in sorted(self.spans):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total

    def add(self, other: CompileStats) -> None:
        self.programs += other.programs
        self.compiled += other.compiled
        self.loaded += other.loaded
        self.spans += other.spans

    def describe(self) -> str:
        cached = self.programs - self.compiled - self.loaded
        return (f"{self.programs} program(s) in {self.seconds:.1f} s ({self.compiled} compiled, "
                f"{cached} from the compilation cache, {self.loaded} loaded untraced)")


_hits = 0


def _count_hits(event: str, **kwargs: Any) -> None:
    global _hits
    if event == "/jax/compilation_cache/cache_hits":
        _hits += 1


jax.monitoring.register_event_listener(_count_hits)


def cache_hits() -> int:
    """Programs JAX's persistent compilation cache has served in this process so far."""
    return _hits


#: Stored programs kept (least recently used ones are deleted): each is a few MB, and every
#: change to jaxdream's source gives new keys.
MAX_STORED = 128


#: XLA options for every dream program compiled on CPU. XLA's newer fusion emitters cost
#: compile time that the dream does not win back: a cold one-photo Lite0 run built its program
#: in 7.1-7.3 s without them against 8.2-9.3 s with them, warm runs and steps within 2%
#: (2-core AMD EPYC, jax 0.10.2). A jaxlib that no longer knows an option compiles without it.
CPU_COMPILE_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
_options_known = True


#: A debug option at its default value: it changes nothing XLA builds, only the key under
#: which JAX's compilation cache would look the program up (see :func:`_fresh_compile`).
_OWN_KEY: dict[str, Any] = {"xla_embed_ir_in_executable": False}


def compile_lowered(lowered: Any, options: dict[str, Any] | None = None) -> Any:
    """``lowered.compile()``, with :data:`CPU_COMPILE_OPTIONS` when compiling for a CPU (and
    ``options`` on any backend)."""
    global _options_known
    if _options_known and jax.default_backend() == "cpu":
        try:
            return lowered.compile(compiler_options={**CPU_COMPILE_OPTIONS, **(options or {})})
        except Exception as error:  # JaxRuntimeError; its class moved between jax versions
            if "compile option" not in str(error) or options:  # options: the caller's to judge
                raise
            _options_known = False
    return lowered.compile(compiler_options=options) if options else lowered.compile()


@contextlib.contextmanager
def _out_of_jax_cache() -> Iterator[bool]:
    """Yields True while this thread's compiles are never written to JAX's compilation
    cache (False, changing nothing, where this jax has no such switch)."""
    try:  # the threshold is a thread-local setting with no public handle
        from jax._src import config as jax_config
        threshold = jax_config.persistent_cache_min_compile_time_secs
        keeping_out = threshold(float("inf"))
    except Exception:  # noqa: BLE001 - another jax: keep JAX's own behaviour
        yield False
        return
    with keeping_out:
        yield True


def _fresh_compile(lower: Callable[[], Any]) -> tuple[Any, bool]:
    """A compile that JAX's compilation cache neither serves nor keeps, and whether it was.

    An executable JAX loads from its cache serialises into a file that fails at run time
    ("function ... not found") or computes wrong numbers (tested), so a program served from
    there could never be stored here: after an upgrade of jaxdream that left a program's HLO
    as it was, every warm run traced it again. Under :data:`_OWN_KEY`, written nowhere, every
    compile is XLA's own, and the program lives in this store alone instead of in both.
    """
    lowered = lower()  # traced once, whichever compile follows
    with _out_of_jax_cache() as kept_out:
        if kept_out:
            hits = cache_hits()
            try:
                compiled = compile_lowered(lowered, _OWN_KEY)
            except Exception as error:  # JaxRuntimeError: a jaxlib without that option
                if "compile option" not in str(error):
                    raise
            else:  # a hit meanwhile (served after all, or another thread's): not stored
                return compiled, cache_hits() == hits
        return compile_lowered(lowered), False


def set_directory(directory: str | os.PathLike[str] | None) -> None:
    """Where executables are kept (None: nowhere, every program is traced and compiled)."""
    global _directory
    _directory = None if directory is None else Path(directory)


@functools.cache
def _source_digest() -> str:
    """SHA-256 of every module of the package: a changed line anywhere gives new programs
    (the version string alone would keep stale programs during development)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: executables hold native code, and a cache
    folder shared between machines (a network home) must not hand AVX-512 code to a CPU
    without it."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _describe(value: Any) -> str:
    # Static function attributes print with their address; the name is what matters.
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


#: JAXDREAM_* variables that never change a traced program.
_NOT_SWITCHES = ("JAXDREAM_CACHE", "JAXDREAM_COMPILE_AHEAD", "JAXDREAM_TILE_WORKERS",
                 "JAXDREAM_MALLOC")


def program_key(*parts: Any) -> str:
    """A file name for the program selected by ``parts`` in this environment."""
    device = jax.devices()[0]
    # JAXDREAM_DEPTHWISE / JAXDREAM_MAXPOOL pick the form of a layer at trace time.
    switches = sorted((k, v) for k, v in os.environ.items()
                      if k.startswith("JAXDREAM_") and k not in _NOT_SWITCHES)
    identity = [_source_digest(), jax.__version__, jaxlib.__version__, device.platform,
                getattr(device, "device_kind", ""), os.environ.get("XLA_FLAGS", ""),
                repr(switches), _cpu_identity(),
                # Options that change the traced program or its random bits.
                *(str(getattr(jax.config, name)) for name in (
                    "jax_default_matmul_precision", "jax_enable_x64",
                    "jax_threefry_partitionable", "jax_default_prng_impl")),
                *(_describe(part) for part in parts)]
    return hashlib.sha256("\x00".join(identity).encode()).hexdigest()


def load_or_compile(key: str, args: tuple[Any, ...],
                    lower: Callable[[], Any]) -> tuple[Any, bool]:
    """The executable for ``key`` from disk, or ``lower()``'s (a ``jax.stages.Lowered`` for
    ``args``) compiled by XLA and stored for next time. Returns (executable, loaded from this
    store). Any failure to read or write the store falls back to compiling: the store only
    ever saves time.
    """
    from jax.experimental import serialize_executable

    if _directory is None:
        return compile_lowered(lower()), False
    path = _directory / f"{key}.xla"
    in_tree = jax.tree.structure((args, {}))
    out_tree = jax.tree.structure(args[1])  # the dream returns one array like its images
    if path.is_file():
        try:
            program = serialize_executable.deserialize_and_load(path.read_bytes(), in_tree,
                                                                out_tree)
            os.utime(path)  # recently used: kept by the pruning below
            return program, True
        except Exception:  # a stale or damaged file: compile again and replace it
            pass
    compiled, fresh = _fresh_compile(lower)
    if not fresh:  # it may have come from JAX's cache, and would not run from a file
        return compiled, False
    try:
        payload, _, _ = serialize_executable.serialize(compiled)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            f.write(payload)
        os.replace(f.name, path)  # atomic: concurrent workers never read half a file
        _prune(path.parent)
    except Exception:  # unsupported backend, read-only or full disk: just run uncached
        pass
    return compiled, False


def _prune(directory: Path) -> None:
    """Deletes all but the MAX_STORED most recently used programs."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # deleted meanwhile by another process
            return 0.0

    stored = sorted(directory.glob("*.xla"), key=used, reverse=True)
    for path in stored[MAX_STORED:]:
        path.unlink(missing_ok=True)
