"""The tile engine (``tiles: T`` in a recipe): one fixed-shape compiled program for every photo.

The whole-image engine (:mod:`jaxdream.engine`) compiles a dream program per shape bucket; on
CPU, for a folder of mixed sizes, compiling costs more than dreaming (README, Speed). Here the
only compiled program is the gradient of the objective over one ``[1, T, T, 3]`` tile, the
padding of a short side masked out (``objectives.evaluate(tiles=True)``, as
``ascent._tiled_gradient`` counts). Everything else (the octave pyramid, the random roll,
cutting and pasting tiles, the classic mean-|g| normalisation, the update and the clip) is
NumPy, so no image size ever compiles anything. The program is kept on disk with
:mod:`jaxdream.program_cache`, so a warm run loads it untraced.

It is not the 2015 notebook's whole-image gradient: every tile sees its own borders, and the
jitter comes from NumPy's generator seeded by the recipe's seed. Each image is dreamed on its
own (batch 1, its own generator), so its pixels do not depend on the images around it.
Supported: objective ``l2`` or ``channel``, normaliser ``mean``, update ``ascent``
(``Recipe.validate`` refuses the rest).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream import engine as engine_module
from jaxdream import program_cache
from jaxdream.ascent import StaticSettings, octave_shapes, tile_starts
from jaxdream.engine import ItemParams
from jaxdream.program_cache import CompileStats
from jaxdream.errors import ConfigError
from jaxdream.models import LoadedModel
from jaxdream.objectives import Term, TermParams, evaluate, term_params
from jaxdream.recipe import Recipe

#: Objectives whose value is a sum over feature positions, so tiles can add up to the image's.
TILE_OBJECTIVES = ("l2", "channel")

#: Gradient function of one tile: (tiles [1,T,T,3], masks [1,T,T]) -> gradient [1,T,T,3].
TileGrad = Callable[[np.ndarray, np.ndarray], Any]

#: Images the tile engine dreams at once (each on its own thread); unset, one per core, at most 4.
TILE_WORKERS_ENV = "JAXDREAM_TILE_WORKERS"

_TINY = float(np.finfo(np.float32).tiny)

#: Tile programs of this process, by (model structure, objective structure, T).
_PROGRAMS: dict[tuple[Any, ...], Any] = {}


def default_tile_workers() -> int:
    """``$JAXDREAM_TILE_WORKERS`` if set (0 and 1 both dream one image at a time), else one
    image per core this process may use, at most 4."""
    return engine_module.env_count(
        TILE_WORKERS_ENV, engine_module.builders_for(engine_module.process_cores()))


def resize_aligned(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with corner pixels aligned and no antialiasing (the sampling of
    ``ascent.resize_real`` and of the notebook's ``scipy.ndimage.zoom(order=1)``)."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / max(n_out - 1, 1))
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, fr = axis(x.shape[0], shape[0])
    c0, c1, fc = axis(x.shape[1], shape[1])
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    # Row-major, always: indexing the columns gives a transposed memory layout, which every
    # later NumPy op keeps, and the step's mean |g| would be summed in another order (last
    # bits) than for the same pixels laid out by rows.
    return np.ascontiguousarray(rows[:, c0] * (1 - fc)[None, :, None]
                                + rows[:, c1] * fc[None, :, None], dtype=np.float32)


def draw_shift(rng: np.random.Generator, shape: tuple[int, int], jitter: int, tile: int
               ) -> tuple[int, int]:
    """The step's roll: jitter in [-jitter, jitter], plus a fresh 0..T on every side longer
    than T (as the engine's tiled mode), so tile borders never stay in one place."""
    shift = rng.integers(-jitter, jitter + 1, 2)
    for dim, length in enumerate(shape):
        if length > tile:
            shift[dim] += rng.integers(0, tile)
    return int(shift[0]), int(shift[1])


def _tile_gradient(grad: TileGrad, tiles: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.asarray(grad(tiles, masks))


def image_gradient(grad: TileGrad, x: np.ndarray, shift: tuple[int, int], tile: int,
                   pool: concurrent.futures.Executor | None = None) -> np.ndarray:
    """d objective / d x of an H x W x 3 image evaluated on x rolled by ``shift``, tile by
    tile: equal T x T tiles (``ascent.tile_starts``; overlaps summed), a side shorter than T
    edge-padded at its end with the padding masked out and its gradient dropped. With a
    ``pool`` the tiles are computed on its threads; they are added up in the same order."""
    height, width = x.shape[:2]
    rolled = np.roll(x, shift, axis=(0, 1))
    th, tw = min(tile, height), min(tile, width)
    starts = [(r, c) for r in tile_starts(height, th) for c in tile_starts(width, tw)]
    mask = np.zeros((1, tile, tile), bool)
    mask[:, :th, :tw] = True
    pending = []
    for r, c in starts:  # every tile dispatched before any is read back
        piece = rolled[r:r + th, c:c + tw]
        if th < tile or tw < tile:
            piece = np.pad(piece, ((0, tile - th), (0, tile - tw), (0, 0)), mode="edge")
        pending.append(grad(piece[None], mask) if pool is None
                       else pool.submit(_tile_gradient, grad, piece[None], mask))
    out = np.zeros_like(rolled)
    for (r, c), tile_grad in zip(starts, pending, strict=True):
        if pool is not None:
            tile_grad = tile_grad.result()
        out[r:r + th, c:c + tw] += np.asarray(tile_grad)[0, :th, :tw]
    return np.roll(out, (-shift[0], -shift[1]), axis=(0, 1))


def ascent_update(x: np.ndarray, grad: np.ndarray, step_size: float) -> np.ndarray:
    """The classic step: the gradient divided by its mean |g|, times the step size, clipped
    to 0..255 (``ascent.scale_by_mean_abs`` then the clip)."""
    mean = float(np.mean(np.abs(grad)))
    scale = np.float32(step_size / max(mean, _TINY))
    return np.clip(x + scale * grad, 0.0, 255.0).astype(np.float32)


class Stopped(Exception):
    """A dream given up between two steps because its ``stop`` event was set."""


def dream_image(grad: TileGrad, image: np.ndarray, params: ItemParams,
                settings: StaticSettings, tile: int,
                pool: concurrent.futures.Executor | None = None,
                stop: threading.Event | None = None) -> np.ndarray:
    """The dream of one H x W x 3 image (0..255), octave by octave, with its own generator
    (a ``pool`` computes its tiles on threads, see :func:`image_gradient`); raises
    :class:`Stopped` at the next step once ``stop`` is set."""
    rng = np.random.default_rng(params.seed)
    shapes = octave_shapes(image.shape[0], image.shape[1], settings.octaves,
                           settings.octave_scale)
    bases = [np.ascontiguousarray(image, np.float32)]
    for shape in shapes[1:]:
        bases.append(resize_aligned(bases[-1], shape))
    x = bases[0]
    detail: np.ndarray | None = None
    for base in reversed(bases):
        x = base if detail is None else base + resize_aligned(detail, base.shape[:2])
        for _ in range(settings.steps):
            if stop is not None and stop.is_set():
                raise Stopped("stopped")
            shift = draw_shift(rng, x.shape[:2], params.jitter, tile)
            x = ascent_update(x, image_gradient(grad, x, shift, tile, pool),
                              params.step_size)
        detail = x - base
    return x


def tile_program(graphdef: Any, state_tree: Any, structure: tuple[tuple[str, str], ...]) -> Any:
    """jit(grad of the objective over a batch of tiles): (weights, tiles, masks, terms) ->
    gradient, ``weights`` being the model state's leaves (``state_tree`` its structure). Term
    values are inputs, so weights and channels never recompile.

    The weights go in as a flat list because the program runs once per tile, and an nnx
    state's Variables flatten in Python at every call: with the tiles' own conversions, the
    dispatch of a call took 1.3 ms under cProfile (0.4 ms now), beside about 5 ms of gradient
    for a 128-px tile.
    """
    layers = tuple(dict.fromkeys(name for _, name in structure))

    def grads(weights: list[jax.Array], tiles: jax.Array, masks: jax.Array,
              terms: tuple[TermParams, ...]) -> jax.Array:
        model = nnx.merge(graphdef, jax.tree.unflatten(state_tree, weights))

        def objective(batch: jax.Array) -> jax.Array:
            # tiles=True: each tile's sum over its full feature map, so every real feature
            # of an image weighs the same whichever tile it falls in.
            return evaluate(structure, model(batch, layers), terms, masks, tiles=True)

        return jax.grad(objective)(tiles)

    return jax.jit(grads)


class TileEngine:
    """Dreams images of any sizes with one compiled tile program (the interface of
    :class:`jaxdream.engine.Engine` that the renderer uses: ``render_iter``, ``render``,
    ``stats``)."""

    def __init__(self, model: LoadedModel, settings: StaticSettings, tile: int,
                 batch_size: int = 1, workers: int | None = None) -> None:
        unknown = [name for name in settings.layers if name not in model.spec.endpoints]
        if unknown:
            raise ConfigError(f"model {model.spec.name} has no endpoint(s) {unknown}")
        if (settings.objective not in TILE_OBJECTIVES or settings.normaliser != "mean"
                or settings.update != "ascent"):
            raise ConfigError(f"tiles: the tile engine dreams objective l2 or channel with "
                              f"normaliser mean and update ascent, not {settings.objective}/"
                              f"{settings.normaliser}/{settings.update}")
        del batch_size  # one tile per call: each image stays independent of the others
        self.model, self.settings, self.tile = model, settings, tile
        self.workers = default_tile_workers() if workers is None else workers
        self._graphdef, state = nnx.split(model.module)
        self._weights, self._state_tree = jax.tree.flatten(state)
        self.stats = CompileStats()

    def term_params(self, item: ItemParams) -> tuple[TermParams, ...]:
        """The per-image term values, as program inputs."""
        if len(item.layer_weights) != len(self.settings.layers):
            raise ValueError("one layer weight per layer is needed")
        return tuple(
            TermParams(*(jnp.asarray(a) for a in term_params(
                Term(self.settings.objective, name, weight, item.channels),
                self.model.spec.endpoints[name][0])))
            for name, weight in zip(self.settings.layers, item.layer_weights, strict=True))

    def _program(self, terms: tuple[TermParams, ...]) -> Any:
        tiles = jnp.zeros((1, self.tile, self.tile, 3), jnp.float32)
        masks = jnp.zeros((1, self.tile, self.tile), bool)
        shapes = jax.tree.map(lambda leaf: (leaf.shape, str(leaf.dtype)),
                              (self._weights, terms))
        key = (self._graphdef, self._state_tree, self.settings.structure, self.tile,
               str(shapes))
        if key not in _PROGRAMS:
            start = time.perf_counter()
            args = (self._weights, tiles, masks, terms)
            jitted = tile_program(self._graphdef, self._state_tree, self.settings.structure)
            hits = program_cache.cache_hits()
            program, loaded = program_cache.load_or_compile(
                program_cache.program_key("tiles", *key), args, lambda: jitted.lower(*args))
            _PROGRAMS[key] = program
            self.stats.programs += 1
            self.stats.loaded += loaded
            # Hits are counted process-wide, as in the engine: never below zero here.
            self.stats.compiled += 0 if loaded else max(
                0, 1 - (program_cache.cache_hits() - hits))
            self.stats.spans.append((start, time.perf_counter()))
        return _PROGRAMS[key]

    def gradient_function(self, item: ItemParams) -> TileGrad:
        """The tile gradient with ``item``'s term values bound."""
        terms = self.term_params(item)
        program, weights = self._program(terms), self._weights
        # NumPy tiles go straight in: jnp.asarray first cost a dispatch of its own per array.
        return lambda tiles, masks: program(weights, tiles, masks, terms)

    def render_iter(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (index, dream) for each H x W x 3 image (0..255), in the order they finish.

        ``workers`` images are dreamed at once, each on its own thread with its own generator,
        so its pixels are the ones it gets alone. A 128-px tile is too small a call to keep
        both of XLA's threads busy, and the NumPy work between a step's tiles leaves the cores
        idle; a second image in flight fills both gaps (README, Speed). One image alone has its
        tiles computed on the workers instead. If an image fails, no image after it is
        started, the others in flight are handed out, then its error is raised.
        """
        if len(images) != len(params):
            raise ValueError("images and params differ in length")
        if self.workers <= 1:
            for index, (image, item) in enumerate(zip(images, params, strict=True)):
                yield index, dream_image(self.gradient_function(item), image, item,
                                         self.settings, self.tile)
            return
        if len(images) == 1:  # one image: its tiles share the workers instead
            with concurrent.futures.ThreadPoolExecutor(self.workers, "jaxdream-tiles") as pool:
                yield 0, dream_image(self.gradient_function(params[0]), images[0], params[0],
                                     self.settings, self.tile, pool)
            return
        waiting = iter(range(len(images)))
        running: dict[concurrent.futures.Future[np.ndarray], int] = {}
        failure: list[BaseException] = []
        stop = threading.Event()  # set when the caller stops asking (an error, Ctrl-C)
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, "jaxdream-tiles")

        def start_next() -> None:
            index = next(waiting, None)
            if index is None or failure:
                return
            try:  # the program is built here, in the caller's thread: once, counted once
                grad = self.gradient_function(params[index])
            except Exception as error:  # noqa: BLE001 - raised after the images in flight
                failure.append(error)
                return
            running[pool.submit(dream_image, grad, images[index], params[index],
                                self.settings, self.tile, None, stop)] = index

        try:
            for _ in range(self.workers):
                start_next()
            while running:
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    index = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        failure.append(error)
                        continue
                    start_next()
                    yield index, future.result()
            if failure:
                raise failure[0]
        finally:  # dreams still running stop at their next step; none is left behind
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def render(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]
               ) -> list[np.ndarray]:
        """The dreams of ``images``, in their order."""
        out: list[np.ndarray | None] = [None] * len(images)
        for index, dream in self.render_iter(images, params):
            out[index] = dream
        return out  # type: ignore[return-value]


#: What selects an engine for a recipe: (program settings, tile side, shape bucket).
EngineKey = tuple[StaticSettings, int, int]


def engine_key(recipe: Recipe) -> EngineKey:
    """The engine ``recipe`` needs; recipes with equal keys share one (and its programs). The
    tile engine works at each image's exact size, so its key's bucket is 0."""
    return (engine_module.static_settings(recipe), recipe.tiles,
            0 if recipe.tiles else recipe.shape_bucket)


def make_engine(model: LoadedModel, key: EngineKey, batch_size: int,
                **engine_options: Any) -> Any:
    """The engine of ``key`` (:func:`engine_key`): the tile engine for ``tiles > 0``, else the
    whole-image :class:`jaxdream.engine.Engine` with the key's shape bucket and
    ``engine_options``."""
    settings, tiles, bucket = key
    if tiles:
        dtype = engine_options.get("compute_dtype")
        if dtype not in (None, "float32"):
            raise ConfigError(f"tiles: the tile engine computes in float32; compute_dtype "
                              f"{dtype!r} needs tiles 0")
        return TileEngine(model, settings, tiles, batch_size)
    from jaxdream.engine import Engine

    return Engine(model, settings, batch_size=batch_size, bucket=bucket, **engine_options)
