"""The DeepDream math for ONE image: gradient step, octaves, tiles. Pure functions; vmap makes
batches. (The design guide calls this layer ``dream``; the module is ``ascent`` so that
``jaxdream.dream`` can be the public function.)

The classic algorithm is google/deepdream's ``dream.ipynb``: pixels on the 0..255 scale, a
random roll (jitter) before each gradient evaluation, the step normalised by the mean absolute
gradient of *this* image, clipping to 0..255, and octaves from the smallest up with the detail
carried over. Everything that changes the compiled program (shapes, objective structure,
octave and step counts, normaliser, update rule, tiling) lives in :class:`StaticSettings`;
everything that may vary per sample (step size, jitter, seed, term weights, channel masks,
guide features, the image's real size inside its bucket) lives in :class:`SampleParams`.

**Buckets.** An image may sit in the top-left corner of a larger buffer (its shape bucket).
The padding is kept equal to the nearest real pixel, features centred on it are left out of
the objective, it gets no update, and the octave pyramid is built from the real part only, so
padding never feeds the objective and never shows in the output.

**Tiles.** Octaves larger than ``tile_above`` compute their gradient tile by tile, a group of
tiles at a time (a loop over groups), after a fresh random roll of the whole image each step,
so tile borders never stay in one place long enough to leave seams and activation memory is
bounded by the group, not the image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdream.objectives import TermParams, evaluate
from jaxdream.recipe import NORMALISERS, UPDATES, Recipe

Forward = Callable[[jax.Array], Mapping[str, jax.Array]]

#: Guards the normalisation of an all-zero gradient (e.g. every unit of a layer is dead)
#: without biasing small ones: gradients of a mean-of-squares objective can be ~1e-6.
_TINY = float(jnp.finfo(jnp.float32).tiny)

#: Bands of the Laplacian-pyramid normaliser (the TensorFlow 2016 notebook's ``lap_n``).
LAPLACIAN_LEVELS = 4

#: The recipe's defaults are the only defaults: a bare ``StaticSettings(layers)`` is classic.
_DEFAULT = Recipe()


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """Settings that select a compiled program."""

    layers: tuple[str, ...]
    octaves: int = _DEFAULT.octaves
    octave_scale: float = _DEFAULT.octave_scale
    steps: int = _DEFAULT.steps
    #: Kind of every term, one per layer (a key of ``recipe.OBJECTIVES``).
    objective: str = _DEFAULT.objective
    normaliser: str = _DEFAULT.normaliser
    update: str = _DEFAULT.update
    tile_size: int = _DEFAULT.tile_size
    #: Octaves whose longer side exceeds this are tiled; 0 never tiles.
    tile_above: int = _DEFAULT.tile_above
    #: Tiles that go through the network together (vmapped); the rest loop. Memory, not pixels.
    tile_group: int = 4

    @property
    def structure(self) -> tuple[tuple[str, str], ...]:
        return tuple((self.objective, name) for name in self.layers)

    def tiled(self, shape: tuple[int, int]) -> bool:
        return self.tile_above > 0 and max(shape) > self.tile_above


class SampleParams(NamedTuple):
    """Per-image parameters; each field gets a leading batch axis under vmap."""

    step_size: jax.Array  # float32 []
    jitter: jax.Array  # int32 [], roll offsets are drawn from [-jitter, jitter]
    seed: jax.Array  # uint32 []
    terms: tuple[TermParams, ...]  # one per layer
    sizes: jax.Array  # int32 [octaves, 2]: the real (h, w) of each octave, largest first


def octave_shapes(height: int, width: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """Sizes of the octaves, largest (the image) first, each the previous one / scale, rounded.

    This is ``scipy.ndimage.zoom``'s output size, as in the original notebook: 1024x575 with 4
    octaves at 1.4 gives 1024x575, 731x411, 522x294, 373x210.
    """
    shapes = [(height, width)]
    for _ in range(octaves - 1):
        h, w = shapes[-1]
        shapes.append((max(1, round(h / scale)), max(1, round(w / scale))))
    return shapes


def sample_params(height: int, width: int, settings: StaticSettings, *, step_size: float = 1.5,
                  jitter: int = 32, seed: int = 0,
                  terms: Sequence[TermParams] | None = None) -> SampleParams:
    """Parameters of one unbatched image of ``height`` x ``width`` real pixels."""
    if terms is None:
        terms = [TermParams(np.float32(1.0), np.zeros((0,), np.float32),
                            np.zeros((0, 0), np.float32)) for _ in settings.layers]
    sizes = np.asarray(octave_shapes(height, width, settings.octaves, settings.octave_scale),
                       np.int32)
    return SampleParams(jnp.float32(step_size), jnp.int32(jitter),
                        jnp.asarray(np.uint32(seed)),
                        tuple(TermParams(*(jnp.asarray(a) for a in t)) for t in terms),
                        jnp.asarray(sizes))


# --------------------------------------------------------------------------------------------
# Buffers with a real part and padding


def pixel_mask(shape: tuple[int, int], size: jax.Array) -> jax.Array:
    """True on the real (top-left ``size``) part of a buffer of ``shape``."""
    rows = jnp.arange(shape[0]) < size[0]
    cols = jnp.arange(shape[1]) < size[1]
    return rows[:, None] & cols[None, :]


def fill_padding(x: jax.Array, size: jax.Array) -> jax.Array:
    """Sets every padding pixel to the nearest real one (edge replication)."""
    rows = jnp.minimum(jnp.arange(x.shape[0]), size[0] - 1)
    cols = jnp.minimum(jnp.arange(x.shape[1]), size[1] - 1)
    return x[rows][:, cols]


def resize_real(x: jax.Array, size: jax.Array, shape: tuple[int, int], new_size: jax.Array
                ) -> jax.Array:
    """Bilinear resize of the real part ``size`` of ``x`` to the real part ``new_size`` of a
    ``shape`` buffer, as the notebook's ``scipy.ndimage.zoom(order=1)``: no antialiasing, and
    the corner pixels of both grids aligned (output pixel i samples input position
    ``i * (size - 1) / (new_size - 1)``), so samples never leave the real part.

    Up to jaxdream 0.1 this sampled at pixel centres (``jax.image.resize``'s convention),
    which differs from the notebook by up to tens of grey levels on fine texture.
    """
    real = size.astype(jnp.float32)
    scale = jnp.maximum((new_size.astype(jnp.float32) - 1.0) / jnp.maximum(real - 1.0, 1.0),
                        1e-6)
    # scale_and_translate samples input (o + 0.5 - t) / s - 0.5 for output o: this t makes it
    # o / s, the aligned-corners position.
    out = jax.image.scale_and_translate(x, (*shape, x.shape[-1]), (0, 1), scale,
                                        0.5 * (1.0 - scale), method="linear", antialias=False)
    return fill_padding(out, new_size)


# --------------------------------------------------------------------------------------------
# Gradients


@jax.custom_vjp
def roll_image(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``jnp.roll`` of an H x W x C image by a traced (rows, cols) ``shift``.

    Its gradient is the inverse roll, a gather, where autodiff would transpose the roll's
    dynamic slice into a scatter-add (under vmap, with per-image shifts): same values, no
    scatter. On CPU, vmapped grad of a roll at 8 x 512 x 512 x 3 took 46 ms against 91 ms.
    """
    return jnp.roll(x, (shift[0], shift[1]), axis=(0, 1))


def _roll_fwd(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    return roll_image(x, shift), shift


def _roll_bwd(shift: jax.Array, grad: jax.Array) -> tuple[jax.Array, None]:
    return jnp.roll(grad, (-shift[0], -shift[1]), axis=(0, 1)), None


roll_image.defvjp(_roll_fwd, _roll_bwd)


def _objective_gradient(forward: Forward, settings: StaticSettings, x: jax.Array,
                        size: jax.Array, shift: jax.Array, terms: tuple[TermParams, ...]
                        ) -> jax.Array:
    """d objective / d x for the whole image at once, evaluated on x rolled by ``shift``."""
    mask = pixel_mask(x.shape[:2], size)
    # Where the real part's centre lands after the roll (for the neuron objective).
    centre = (size // 2 + shift) % jnp.asarray(x.shape[:2], jnp.int32)

    def objective(image: jax.Array) -> jax.Array:
        rolled = roll_image(image, shift)
        rolled_mask = jnp.roll(mask, (shift[0], shift[1]), axis=(0, 1))
        return evaluate(settings.structure, forward(rolled[None]), terms, rolled_mask[None],
                        centre[None])

    return jax.grad(objective)(x)


def tile_starts(length: int, tile: int) -> list[int]:
    """Starts of equal tiles covering ``length``: a grid of ``tile``, the last tile moved back
    to end at the edge (it overlaps its neighbour rather than being smaller)."""
    if length <= tile:
        return [0]
    count = math.ceil(length / tile)
    return [min(i * tile, length - tile) for i in range(count)]


def _tiled_gradient(forward: Forward, settings: StaticSettings, x: jax.Array, mask: jax.Array,
                    shift: jax.Array, terms: tuple[TermParams, ...]) -> jax.Array:
    """The gradient computed tile by tile on x rolled by ``shift``; the tiles of one group go
    through the network together and groups loop, so memory is bounded by the group."""
    height, width = x.shape[:2]
    tile_h, tile_w = min(settings.tile_size, height), min(settings.tile_size, width)
    starts = [(r, c) for r in tile_starts(height, tile_h) for c in tile_starts(width, tile_w)]
    group = min(settings.tile_group, len(starts))
    groups = math.ceil(len(starts) / group)
    # Pad to whole groups with copies of tile 0 that carry no weight.
    weights = np.zeros((groups * group,), np.float32)
    weights[:len(starts)] = 1.0
    table = np.asarray(starts + [starts[0]] * (groups * group - len(starts)), np.int32)
    table = jnp.asarray(table.reshape(groups, group, 2))
    tile_weights = jnp.asarray(weights.reshape(groups, group))

    rolled = jnp.roll(x, (shift[0], shift[1]), axis=(0, 1))
    rolled_mask = jnp.roll(mask, (shift[0], shift[1]), axis=(0, 1))

    def cut(image: jax.Array, start: jax.Array) -> jax.Array:
        size = (tile_h, tile_w, *image.shape[2:])
        return jax.lax.dynamic_slice(image, (start[0], start[1], *([0] * (image.ndim - 2))),
                                     size)

    def body(index: jax.Array, grad: jax.Array) -> jax.Array:
        group_starts = table[index]
        tiles = jax.vmap(lambda s: cut(rolled, s))(group_starts)
        masks = jax.vmap(lambda s: cut(rolled_mask, s))(group_starts)
        # A padding tile's mask is all false: it adds nothing to the objective.
        masks = masks & (tile_weights[index] > 0)[:, None, None]

        def objective(batch: jax.Array) -> jax.Array:
            return evaluate(settings.structure, forward(batch), terms, masks, tiles=True)

        tile_grads = jax.grad(objective)(tiles)
        for slot in range(group):
            start = group_starts[slot]
            current = cut(grad, start)
            grad = jax.lax.dynamic_update_slice(grad, current + tile_grads[slot],
                                                (start[0], start[1], 0))
        return grad

    grad = jax.lax.fori_loop(0, groups, body, jnp.zeros_like(rolled))
    return jnp.roll(grad, (-shift[0], -shift[1]), axis=(0, 1))


# --------------------------------------------------------------------------------------------
# Update rules: optax gradient transformations, so they chain like any optax optimiser. They
# receive the gradient of the *loss* (minus the objective) and return the update to add.


def scale_by_mean_abs(mask: jax.Array) -> optax.GradientTransformation:
    """Divides by the mean |g| over the real pixels: the classic normalisation, which makes
    the step size the mean absolute change of a pixel per step."""
    real = mask[..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(real) * 3.0, 1.0)

    def update(updates: jax.Array, state: optax.EmptyState, params: Any = None
               ) -> tuple[jax.Array, optax.EmptyState]:
        mean = jnp.sum(jnp.abs(updates) * real) / count
        return updates / jnp.maximum(mean, _TINY), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _blur_axis(x: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """Correlates ``x`` with an odd-length kernel along ``axis``, edges replicated; written as
    a sum of shifted slices, which XLA runs far faster on CPU than a grouped convolution."""
    radius = (taps.shape[0] - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="edge")
    length = x.shape[axis]
    out = jnp.zeros_like(x)
    for k in range(taps.shape[0]):
        out = out + taps[k] * jax.lax.slice_in_dim(padded, k, k + length, axis=axis)
    return out


_BINOMIAL = np.asarray([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(x: jax.Array, taps: jax.Array) -> jax.Array:
    return _blur_axis(_blur_axis(x, taps, 0), taps, 1)


def _laplacian_split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(low, high): the image blurred and halved, and what the halving loses."""
    taps = jnp.asarray(_BINOMIAL)
    low = _blur(x, taps)[::2, ::2]
    up = jnp.zeros_like(x).at[::2, ::2].set(low)
    return low, x - _blur(up, 2.0 * taps)


def _laplacian_merge(low: jax.Array, high: jax.Array) -> jax.Array:
    taps = jnp.asarray(_BINOMIAL)
    up = jnp.zeros_like(high).at[::2, ::2].set(low)
    return _blur(up, 2.0 * taps) + high


def laplacian_normalise(levels: int = LAPLACIAN_LEVELS) -> optax.GradientTransformation:
    """Splits the gradient into Laplacian-pyramid bands and scales each to unit RMS (the
    TensorFlow 2016 notebook's ``lap_normalize``): fine detail no longer dominates, so colours
    grow in broad, smooth strokes."""

    def normalise(x: jax.Array) -> jax.Array:
        bands = []
        for _ in range(levels - 1):
            if min(x.shape[:2]) < 4:
                break
            x, high = _laplacian_split(x)
            bands.append(high)
        bands.append(x)
        bands = [b / jnp.maximum(jnp.sqrt(jnp.mean(b * b)), 1e-12) for b in bands]
        x = bands.pop()
        while bands:
            x = _laplacian_merge(x, bands.pop())
        return x

    def update(updates: jax.Array, state: optax.EmptyState, params: Any = None
               ) -> tuple[jax.Array, optax.EmptyState]:
        return normalise(updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class _StepCount(NamedTuple):
    count: jax.Array


def gaussian_smooth(steps: int) -> optax.GradientTransformation:
    """Averages the gradient blurred by Gaussians of sigma s/2, s and 2s, with s growing from
    0.5 to 2.5 over an octave's steps (as pytorch-deepdream's cascade smoothing): early steps
    keep detail, later ones favour larger, smoother shapes."""
    offsets = jnp.arange(-4, 5, dtype=jnp.float32)  # 9 taps

    def update(updates: jax.Array, state: _StepCount, params: Any = None
               ) -> tuple[jax.Array, _StepCount]:
        sigma = 0.5 + 2.0 * (state.count.astype(jnp.float32) + 1.0) / steps
        smoothed = jnp.zeros_like(updates)
        for factor in (0.5, 1.0, 2.0):
            taps = jnp.exp(-0.5 * (offsets / (sigma * factor)) ** 2)
            smoothed = smoothed + _blur(updates, taps / jnp.sum(taps)) / 3.0
        return smoothed, _StepCount(state.count + 1)

    return optax.GradientTransformation(lambda params: _StepCount(jnp.zeros((), jnp.int32)),
                                        update)


def update_rule(settings: StaticSettings, step_size: jax.Array, mask: jax.Array
                ) -> optax.GradientTransformation:
    """The optimiser of one octave: normaliser, then the ascent rule."""
    shaping = _SHAPING[settings.normaliser](settings)
    return optax.chain(shaping, scale_by_mean_abs(mask), _ASCENT[settings.update](step_size))


#: The implementation of each kind that ``recipe.NORMALISERS`` and ``recipe.UPDATES`` name.
_SHAPING: dict[str, Callable[[StaticSettings], optax.GradientTransformation]] = {
    "mean": lambda settings: optax.identity(),
    "laplacian": lambda settings: laplacian_normalise(),
    "gaussian": lambda settings: gaussian_smooth(settings.steps),
}
_ASCENT: dict[str, Callable[[jax.Array], optax.GradientTransformation]] = {
    "ascent": lambda step_size: optax.scale(-step_size),
    # Adam's per-pixel update is about the learning rate in size, so the step size keeps
    # its meaning (mean |change| per pixel per step), as in lucid's optimisation.
    "adam": lambda step_size: optax.adam(step_size),
}
assert set(_SHAPING) == set(NORMALISERS) and set(_ASCENT) == set(UPDATES), \
    "every kind the recipe offers needs an implementation here"


# --------------------------------------------------------------------------------------------
# The dream


def gradient_ascent_step(forward: Forward, settings: StaticSettings, x: jax.Array,
                         size: jax.Array, key: jax.Array, params: SampleParams,
                         optimiser: optax.GradientTransformation, state: Any
                         ) -> tuple[jax.Array, Any]:
    """One jittered gradient step on one H x W x 3 buffer whose real part is ``size``."""
    mask = pixel_mask(x.shape[:2], size)
    shift = jax.random.randint(key, (2,), -params.jitter, params.jitter + 1)
    if settings.tiled(x.shape[:2]):
        if max(x.shape[:2]) > settings.tile_size:
            # A fresh roll of up to a whole tile each step moves every tile border (no seams).
            shift = shift + jax.random.randint(jax.random.fold_in(key, 1), (2,), 0,
                                               settings.tile_size)
        grad = _tiled_gradient(forward, settings, x, mask, shift, params.terms)
    else:
        grad = _objective_gradient(forward, settings, x, size, shift, params.terms)
    real = mask[..., None].astype(jnp.float32)
    # optax's Adam mixes its integer step count with Python floats, which strict dtype
    # promotion (used by the tests to catch accidental float64) refuses.
    with jax.numpy_dtype_promotion("standard"):
        updates, state = optimiser.update(-grad * real, state, x)
    x = jnp.clip(x + updates * real, 0.0, 255.0)
    return fill_padding(x, size), state


def dream(forward: Forward, image: jax.Array, params: SampleParams,
          settings: StaticSettings) -> jax.Array:
    """DeepDream of one H x W x 3 float buffer on the 0..255 scale; returns the same shape.

    The image is the top-left ``params.sizes[0]`` part of the buffer; the rest is padding.
    """
    shapes = octave_shapes(image.shape[0], image.shape[1], settings.octaves,
                           settings.octave_scale)
    sizes = params.sizes
    image = fill_padding(image, sizes[0])
    bases = [image]
    for octave in range(1, settings.octaves):
        bases.append(resize_real(bases[-1], sizes[octave - 1], shapes[octave], sizes[octave]))

    root = jax.random.key(params.seed)
    detail = jnp.zeros_like(bases[-1])
    x = image  # replaced in the first octave; keeps the type checker sure x is bound
    for rank, base in enumerate(reversed(bases)):
        octave = settings.octaves - 1 - rank
        size = sizes[octave]
        if rank > 0:
            detail = resize_real(detail, sizes[octave + 1], shapes[octave], size)
        x = base + detail
        optimiser = update_rule(settings, params.step_size, pixel_mask(shapes[octave], size))

        def body(i: jax.Array, carry: tuple[jax.Array, Any], rank: int = rank,
                 size: jax.Array = size, optimiser: optax.GradientTransformation = optimiser
                 ) -> tuple[jax.Array, Any]:
            key = jax.random.fold_in(root, rank * settings.steps + i)
            return gradient_ascent_step(forward, settings, carry[0], size, key, params,
                                        optimiser, carry[1])

        x, _ = jax.lax.fori_loop(0, settings.steps, body, (x, optimiser.init(x)))
        detail = x - base
    return x
