"""The DeepDream math for ONE image: gradient step, octaves. Pure functions; vmap makes batches.

This is the canonical algorithm of google/deepdream's ``dream.ipynb``: pixels on the 0..255
scale, a random roll (jitter) before each gradient evaluation, the step normalised by the mean
absolute gradient of *this* image, clipping to 0..255, and octaves from the smallest up with the
detail carried over. Everything that changes the compiled program (shapes, layer set, octave and
step counts) lives in :class:`StaticSettings`; everything that may vary per sample
(step size, jitter, seed, layer weights) lives in :class:`SampleParams` and is vmapped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdream.objectives import weighted_l2

Forward = Callable[[jax.Array], Mapping[str, jax.Array]]

#: Guards the normalisation of an all-zero gradient (e.g. every unit of a layer is dead)
#: without biasing small ones: gradients of a mean-of-squares objective can be ~1e-6.
_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """Settings that select a compiled program."""

    layers: tuple[str, ...]
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10


class SampleParams(NamedTuple):
    """Per-image parameters; each field gets a leading batch axis under vmap."""

    step_size: jax.Array  # float32 []
    jitter: jax.Array  # int32 [], roll offsets are drawn from [-jitter, jitter]
    seed: jax.Array  # uint32 []
    layer_weights: jax.Array  # float32 [len(layers)]


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


def _resize(image: jax.Array, shape: tuple[int, int]) -> jax.Array:
    # Bilinear without antialiasing, as the notebook's order-1 zoom.
    return jax.image.resize(image, (*shape, image.shape[-1]), method="linear", antialias=False)


def gradient_ascent_step(forward: Forward, layers: tuple[str, ...], image: jax.Array,
                         key: jax.Array, params: SampleParams) -> jax.Array:
    """One jittered, normalised gradient-ascent step on one H x W x 3 image."""
    shift = jax.random.randint(key, (2,), -params.jitter, params.jitter + 1)
    rolled = jnp.roll(image, (shift[0], shift[1]), axis=(0, 1))

    def objective(x: jax.Array) -> jax.Array:
        return weighted_l2(forward(x[None]), layers, params.layer_weights)

    grad = jax.grad(objective)(rolled)
    grad = grad * (params.step_size / jnp.maximum(jnp.mean(jnp.abs(grad)), _TINY))
    # Rolling the update back is the same as rolling the image back after the update.
    return jnp.clip(image + jnp.roll(grad, (-shift[0], -shift[1]), axis=(0, 1)), 0.0, 255.0)


def dream(forward: Forward, image: jax.Array, params: SampleParams,
          settings: StaticSettings) -> jax.Array:
    """DeepDream of one H x W x 3 float image on the 0..255 scale; returns the same shape."""
    height, width = image.shape[0], image.shape[1]
    shapes = octave_shapes(height, width, settings.octaves, settings.octave_scale)
    bases = [image]
    for shape in shapes[1:]:
        bases.append(_resize(bases[-1], shape))

    root = jax.random.key(params.seed)
    detail = jnp.zeros_like(bases[-1])
    x = image  # replaced in the first octave; keeps the type checker sure x is bound
    for octave, base in enumerate(reversed(bases)):
        if octave > 0:
            detail = _resize(detail, base.shape[:2])
        x = base + detail

        def body(i: jax.Array, x: jax.Array, octave: int = octave) -> jax.Array:
            key = jax.random.fold_in(root, octave * settings.steps + i)
            return gradient_ascent_step(forward, settings.layers, x, key, params)

        x = jax.lax.fori_loop(0, settings.steps, body, x)
        detail = x - base
    return x
