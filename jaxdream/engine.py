"""Runs many dreams through few compiled programs.

Images are placed in shape buckets (each side rounded up to a multiple of ``bucket``; the image
sits in the top-left corner and the padding is masked out of the dream, see
:mod:`jaxdream.ascent`), stacked into batches of a fixed size (the last one padded with a copy
that is thrown away), and per-image parameters ride along as vmapped arrays. One compiled
program serves every batch of a bucket; programs are kept for reuse and counted, so a caller
can report what compiling cost, and the programs of a render's later buckets are built in
background threads while the first is dreamed. With several devices the batch axis is sharded
across them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdream import program_cache
from jaxdream.program_cache import CompileStats
from jaxdream.ascent import SampleParams, StaticSettings, dream, octave_shapes
from jaxdream.errors import ConfigError
from jaxdream.models import LoadedModel
from jaxdream.models.layers import compute_dtype as compute_dtype_of_networks
from jaxdream.models.weights import cache_root
from jaxdream.objectives import Term, TermParams, term_params
from jaxdream.recipe import DEFAULT_SHAPE_BUCKET, Recipe

#: Guide images are squeezed to this square before their features are taken, so every guide
#: gives features of one shape (the original notebook used a 224 x 224 crop).
GUIDE_SIDE = 224

#: Default bucket granularity in pixels (a recipe's ``shape_bucket``): at most 63 pixels of
#: padding per side.
DEFAULT_BUCKET = DEFAULT_SHAPE_BUCKET

#: Compiled programs kept per process (least recently used ones are dropped).
MAX_PROGRAMS = 64

#: Environment variable: how many programs a render builds ahead, in background threads,
#: while it dreams (0: none, each is built when its first batch comes up).
COMPILE_AHEAD_ENV = "JAXDREAM_COMPILE_AHEAD"


def builders_for(cores: float) -> int:
    """Background program builders for a process with ``cores`` cores: one per core, at most
    4 (an XLA compile takes 1-3 GB). On 2 cores two builders let one trace (Python, holding
    the GIL) while the other's XLA compile and the dreaming use the cores."""
    return max(1, min(4, int(cores)))


def process_cores() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def env_count(name: str, default: int) -> int:
    """A whole number of threads from ``$name`` (0 or more), else ``default``; a bad value is
    a :class:`ConfigError` naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number of threads, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: must be 0 or more, got {value}")
    return value


def default_compile_ahead() -> int:
    """``$JAXDREAM_COMPILE_AHEAD`` if set (0 turns building ahead off), else
    :func:`builders_for` the cores this process may use."""
    return env_count(COMPILE_AHEAD_ENV, builders_for(process_cores()))


@dataclasses.dataclass(frozen=True)
class ItemParams:
    """The dynamic parameters of one image's dream."""

    step_size: float
    jitter: int
    seed: int
    layer_weights: tuple[float, ...]
    channels: tuple[int, ...] = ()
    guide: str | None = None  # path of the guide image, for the guide objective


def static_settings(recipe: Recipe) -> StaticSettings:
    """The settings of ``recipe`` that select a compiled program."""
    assert recipe.layers is not None, "resolve the default layer first"
    return StaticSettings(layers=tuple(name for name, _ in recipe.layers),
                          octaves=recipe.octaves, octave_scale=float(recipe.octave_scale),
                          steps=recipe.steps, objective=recipe.objective,
                          normaliser=recipe.normaliser, update=recipe.update,
                          tile_size=recipe.tile_size, tile_above=recipe.tile_above)


def item_params(recipe: Recipe) -> ItemParams:
    """The per-image values of ``recipe`` (vmapped: images with different ones share a
    program)."""
    assert recipe.layers is not None, "resolve the default layer first"
    return ItemParams(step_size=float(recipe.step_size), jitter=recipe.jitter, seed=recipe.seed,
                      layer_weights=tuple(float(w) for _, w in recipe.layers),
                      channels=recipe.channels, guide=recipe.guide)


def bucket_shape(height: int, width: int, bucket: int) -> tuple[int, int]:
    """The buffer an image of ``height`` x ``width`` is dreamed in (``bucket`` <= 1: exact)."""
    if bucket <= 1:
        return height, width
    return math.ceil(height / bucket) * bucket, math.ceil(width / bucket) * bucket


def _render_batch(graphdef: Any, settings: StaticSettings, compute_dtype: Any, state: Any,
                  images: jax.Array, params: SampleParams) -> jax.Array:
    if compute_dtype is not None:
        state = jax.tree.map(lambda leaf: leaf.astype(compute_dtype)
                             if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, state)
    model = nnx.merge(graphdef, state)

    def forward(x: jax.Array) -> dict[str, jax.Array]:
        # The image (the accumulator of the ascent) stays float32; only the network runs in
        # the compute dtype, from after its input scaling on.
        with compute_dtype_of_networks(compute_dtype):
            return model(x, settings.layers)

    if images.shape[0] == 1:
        # A batch of one skips vmap: XLA on CPU runs some batched convolution gradients up to
        # 2x slower than the same program written for one image (VGG16 at conv4_3: 2.9 s
        # against 1.6 s a step), and batch 1 is the CPU default.
        one = jax.tree.map(lambda leaf: leaf[0], params)
        return dream(forward, images[0], one, settings)[None]
    return jax.vmap(lambda image, p: dream(forward, image, p, settings))(images, params)


@functools.lru_cache(maxsize=32)
def _jitted(graphdef: Any, settings: StaticSettings, compute_dtype: Any) -> Any:
    return jax.jit(partial(_render_batch, graphdef, settings, compute_dtype))


@functools.lru_cache(maxsize=8)
def _jitted_features(graphdef: Any, layers: tuple[str, ...]) -> Any:
    def features(state: Any, image: jax.Array) -> dict[str, jax.Array]:
        return nnx.merge(graphdef, state)(image[None], layers)

    return jax.jit(features)


#: Compiled programs shared by every Engine in the process, keyed by everything that selects
#: one: the model's structure, the static settings, the dtype and the batch's shapes.
_PROGRAMS: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
#: Programs being built (by any thread), so that each is built once; guarded by _LOCK.
_BUILDING: dict[tuple[Any, ...], concurrent.futures.Future[Any]] = {}
_LOCK = threading.Lock()


def enable_compilation_cache(directory: str | os.PathLike[str]) -> None:
    """Keeps compiled programs on disk so that a second run of the same job compiles nothing.

    Compiling the dream for one image size costs seconds on CPU (XLA optimises the whole
    forward and backward pass); the cache turns that into a file read.
    """
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Whole dream programs are kept as executables beside it: a warm run skips tracing too.
    program_cache.set_directory(Path(directory) / "jaxdream-programs")


def use_disk_cache(warn: Callable[[str], None] | None = None) -> bool:
    """Turns on the disk cache of compiled programs at :func:`default_cache_dir`; returns
    whether it is on. Every entry point calls this one function (CLI, workers, the Python
    API). A cache folder that cannot be made (a read-only home) costs compile time, never
    the dream: ``warn`` hears why, if given, and the run goes on without the cache."""
    try:
        enable_compilation_cache(default_cache_dir())
    except OSError as error:
        if warn is not None:
            warn(f"warning: compilation cache disabled: {error}")
        return False
    return True


def default_cache_dir() -> Path:
    """Where compiled programs are kept: ``<cache root>/xla``."""
    return cache_root() / "xla"


def default_batch_size() -> int:
    """Images per compiled call when the user does not say.

    On CPU batches buy little: on 2 cores (benchmarks/cpu_dream_step.py, Lite0 at 512x384)
    batch 4 and 8 were within 15% of batch 1 per image, ahead in one run and behind in another,
    while batch 1 finishes the first image soonest and needs the least memory. Accelerators
    need batches to fill their cores.
    """
    return 1 if jax.default_backend() == "cpu" else 8


class Engine:
    """Dreams images of any sizes with one model and one set of static settings."""

    def __init__(self, model: LoadedModel, settings: StaticSettings, batch_size: int = 1, *,
                 bucket: int = DEFAULT_BUCKET, compute_dtype: str | None = None,
                 devices: Sequence[jax.Device] | None = None,
                 compile_ahead: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        unknown = [name for name in settings.layers if name not in model.spec.endpoints]
        if unknown:
            raise ConfigError(f"model {model.spec.name} has no endpoint(s) {unknown}")
        if settings.objective == "neuron" and settings.tile_above:
            # A neuron sits at one place in the image, not once per tile.
            settings = dataclasses.replace(settings, tile_above=0)
        self.model = model
        self._graphdef, self._state = nnx.split(model.module)
        self.settings = settings
        self.bucket = bucket
        self.compute_dtype = None if compute_dtype in (None, "float32") else jnp.dtype(
            compute_dtype)
        self.devices = list(devices) if devices is not None else jax.devices()
        # Each device gets an equal share of every batch.
        self.batch_size = math.ceil(batch_size / len(self.devices)) * len(self.devices)
        self.stats = CompileStats()
        #: Background builders for the programs of a render's later buckets (0: none).
        self.compile_ahead = default_compile_ahead() if compile_ahead is None else compile_ahead
        self._guides: dict[str, np.ndarray] = {}
        if len(self.devices) > 1:
            mesh = Mesh(np.asarray(self.devices), ("batch",))
            self._batch_sharding: NamedSharding | None = NamedSharding(mesh, PartitionSpec(
                "batch"))
            self._state = jax.device_put(self._state, NamedSharding(mesh, PartitionSpec()))
        else:
            self._batch_sharding = None

    # ----------------------------------------------------------------------- per-item arrays
    def _guide_features(self, path: str) -> np.ndarray:
        """Features of a guide image at the objective's layer(s), cached per path."""
        from jaxdream.images import load_rgb

        if path not in self._guides:
            image = load_rgb(path)
            squeezed = jax.image.resize(jnp.asarray(image, jnp.float32),
                                        (GUIDE_SIDE, GUIDE_SIDE, 3), method="linear")
            ends = _jitted_features(self._graphdef, self.settings.layers)(self._state, squeezed)
            self._guides[path] = {name: np.asarray(a[0]).reshape(-1, a.shape[-1])
                                  for name, a in ends.items()}  # type: ignore[assignment]
        return self._guides[path]

    def term_params(self, item: ItemParams) -> tuple[TermParams, ...]:
        settings = self.settings
        if len(item.layer_weights) != len(settings.layers):
            raise ValueError("one layer weight per layer is needed")
        guides = self._guide_features(item.guide) if settings.objective == "guide" else None
        terms = []
        for name, weight in zip(settings.layers, item.layer_weights, strict=True):
            term = Term(settings.objective, name, weight, item.channels)
            channels = self.model.spec.endpoints[name][0]
            terms.append(term_params(term, channels, None if guides is None else
                                     guides[name]))  # type: ignore[index]
        return tuple(terms)

    def _stack(self, images: Sequence[np.ndarray], params: Sequence[ItemParams],
               shape: tuple[int, int]) -> tuple[np.ndarray, SampleParams]:
        settings = self.settings
        buffer = np.zeros((len(images), *shape, 3), np.float32)
        sizes = np.zeros((len(images), settings.octaves, 2), np.int32)
        for slot, image in enumerate(images):
            height, width = image.shape[:2]
            buffer[slot, :height, :width] = image
            sizes[slot] = octave_shapes(height, width, settings.octaves, settings.octave_scale)
        terms = [self.term_params(p) for p in params]
        stacked_terms = tuple(
            TermParams(*(np.stack([np.asarray(t[layer][field]) for t in terms])
                         for field in range(3)))
            for layer in range(len(settings.layers)))
        sample = SampleParams(
            step_size=np.asarray([p.step_size for p in params], np.float32),
            jitter=np.asarray([p.jitter for p in params], np.int32),
            seed=np.asarray([p.seed for p in params], np.uint32),
            terms=stacked_terms, sizes=sizes)
        return buffer, sample

    # ----------------------------------------------------------------------------- programs
    def _program(self, images: Any, params: Any) -> Any:
        """The compiled program for a batch shaped like ``images`` and ``params`` (arrays or
        ``jax.ShapeDtypeStruct``s): from this process, from another thread that is building
        it, from the disk store, or built here."""
        shapes = jax.tree.map(lambda leaf: (leaf.shape, str(leaf.dtype)), params)
        key = (self._graphdef, self.settings, self.compute_dtype, tuple(images.shape),
               str(jax.tree.structure(params)), str(shapes), len(self.devices))
        with _LOCK:
            program = _PROGRAMS.get(key)
            if program is not None:
                _PROGRAMS.move_to_end(key)
                return program
            building = _BUILDING.get(key)
            if building is None:
                building = _BUILDING[key] = concurrent.futures.Future()
                builder = True
            else:
                builder = False
        if not builder:
            return building.result()  # the other thread's error, if it failed
        try:
            program = self._build(key, images, params)
        except BaseException as error:
            with _LOCK:
                _BUILDING.pop(key, None)
            building.set_exception(error)
            raise
        with _LOCK:  # kept and no longer being built, at once: no thread builds it again
            _PROGRAMS[key] = program
            while len(_PROGRAMS) > MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
            _BUILDING.pop(key, None)
        building.set_result(program)
        return program

    def _build(self, key: tuple[Any, ...], images: Any, params: Any) -> Any:
        start = time.perf_counter()
        hits = program_cache.cache_hits()

        def lower() -> Any:
            return _jitted(self._graphdef, self.settings, self.compute_dtype).lower(
                self._state, images, params)

        if len(self.devices) == 1:
            state_shapes = jax.tree.map(lambda leaf: (leaf.shape, str(leaf.dtype)),
                                        self._state)
            program, loaded = program_cache.load_or_compile(
                program_cache.program_key(*key, str(images.dtype), state_shapes,
                                          str(jax.tree.structure(self._state))),
                (self._state, images, params), lower)
        else:
            program, loaded = program_cache.compile_lowered(lower()), False
        with _LOCK:
            self.stats.programs += 1
            self.stats.loaded += loaded
            # Compilation-cache hits are counted process-wide: with builders running at
            # once, one may see another's hit (only this count can be off, never a program).
            self.stats.compiled += 0 if loaded else max(
                0, 1 - (program_cache.cache_hits() - hits))
            self.stats.spans.append((start, time.perf_counter()))
        return program

    def _place(self, tree: Any) -> Any:
        if self._batch_sharding is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, self._batch_sharding)

    # ----------------------------------------------------------------------------- render
    def render(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]
               ) -> list[np.ndarray]:
        """Dreams H x W x 3 images (any sizes, any dtype, 0..255) with per-image parameters.

        Returns float32 arrays on the 0..255 scale, each the shape of its input, in order.
        """
        results: list[np.ndarray | None] = [None] * len(images)
        for index, out in self.render_iter(images, params):
            results[index] = out
        return results  # type: ignore[return-value]

    def buckets(self, shapes: Sequence[tuple[int, ...]]) -> dict[tuple[int, int], list[int]]:
        """Indices of images grouped by bucket, in first-seen order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, shape in enumerate(shapes):
            groups.setdefault(bucket_shape(shape[0], shape[1], self.bucket), []).append(index)
        return groups

    def render_iter(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Like :meth:`render` but yields (index, result) as each batch finishes, bucket by
        bucket. The programs of later buckets are built in the background meanwhile (see
        ``compile_ahead``)."""
        if len(images) != len(params):
            raise ValueError("images and params differ in length")
        batch = self.batch_size
        work: list[tuple[tuple[int, int], list[int], list[int]]] = []
        for shape, members in self.buckets([image.shape for image in images]).items():
            for start in range(0, len(members), batch):
                chunk = members[start:start + batch]
                # Pad the last batch with copies of its first image so it reuses the program.
                work.append((shape, chunk, chunk + [chunk[0]] * (batch - len(chunk))))
        ahead = self._build_ahead(images, params, work)
        try:
            for shape, chunk, padded in work:
                buffer, sample = self._stack([images[i] for i in padded],
                                             [params[i] for i in padded], shape)
                placed_images, placed_params = self._place((buffer, sample))
                out = np.asarray(self._program(placed_images, placed_params)(
                    self._state, placed_images, placed_params))
                for slot, index in enumerate(chunk):
                    height, width = images[index].shape[:2]
                    yield index, out[slot, :height, :width]
        finally:
            if ahead is not None:
                # Builds already running finish (their programs are kept for the next
                # render); the others are dropped.
                ahead.shutdown(wait=False, cancel_futures=True)

    def _build_ahead(self, images: Sequence[np.ndarray], params: Sequence[ItemParams],
                     work: Sequence[tuple[tuple[int, int], list[int], list[int]]]
                     ) -> concurrent.futures.ThreadPoolExecutor | None:
        """Starts building, in ``compile_ahead`` threads, the programs of every bucket after
        the first, in the order they will be needed; the first is built in the caller's
        thread. Programs are the same whichever thread builds them (so are the dreams); this
        only moves tracing and compiling next to the dreaming, on cores it leaves idle.

        On CPU, building a bucket's program (trace 1-3 s, holding the GIL; XLA compile
        5-12 s using about 1.5 cores) costs more than dreaming a few photos, so a cold
        folder of mixed sizes is mostly compiling."""
        if self.compile_ahead < 1 or len(self.devices) > 1:
            return None
        first: dict[tuple[int, int], list[int]] = {}
        for shape, _, padded in work:
            first.setdefault(shape, padded)
        if len(first) < 2:
            return None
        abstract = []
        for shape, padded in list(first.items())[1:]:
            placed = self._place(self._stack([images[i] for i in padded],
                                             [params[i] for i in padded], shape))
            abstract.append(jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), placed))
        pool = concurrent.futures.ThreadPoolExecutor(self.compile_ahead,
                                                     thread_name_prefix="jaxdream-compile")
        for images_spec, params_spec in abstract:
            # Errors surface where the program is needed (the render's own _program call).
            pool.submit(self._program, images_spec, params_spec)
        return pool


def describe_devices() -> str:
    """One line naming the devices JAX will dream on, so a user can see the GPU is used."""
    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    line = f"devices: {len(devices)} x {', '.join(kinds)} ({jax.default_backend()}, jax " \
           f"{jax.__version__})"
    if jax.default_backend() == "cpu":
        line += "; no GPU or TPU found (pip install 'jaxdream[cuda]' or '[tpu]' for one)"
    return line
