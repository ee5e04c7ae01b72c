"""Pooling for the model files, on NHWC: PyTorch's ``max_pool2d`` (``ceil_mode`` included) with
a written gradient, and ``adaptive_avg_pool2d``.

XLA's gradient of a max pool (select-and-scatter) measured 2x PyTorch's on CPU and GoogLeNet
has 13 pools, so the max pool's gradient is written as shifted slices (README, Speed);
``JAXDREAM_MAXPOOL=xla`` restores XLA's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp

from jaxdream.models.layers import Pads


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
    """PyTorch's ``max_pool2d`` on NHWC, including ``ceil_mode`` (GoogLeNet uses it)."""
    pads = []
    for size in (x.shape[1], x.shape[2]):
        span = size + 2 * padding - window
        out = (-(-span // stride) if ceil_mode else span // stride) + 1
        # PyTorch drops a last window that would start in the right padding.
        if ceil_mode and (out - 1) * stride >= size + padding:
            out -= 1
        extra = max((out - 1) * stride + window - (size + 2 * padding), 0)
        pads.append((padding, padding + extra))
    if os.environ.get("JAXDREAM_MAXPOOL") == "xla":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                     (1, stride, stride, 1), ((0, 0), pads[0], pads[1], (0, 0)))
    return _max_pool(x, window, stride, (pads[0], pads[1]))


def _window_slices(xp: jax.Array, window: int, stride: int, out_shape: tuple[int, ...]
                   ) -> Iterator[jax.Array]:
    """The window's elements for every output position, offset by offset in row-major order."""
    rows, cols = (out_shape[1] - 1) * stride + 1, (out_shape[2] - 1) * stride + 1
    for i in range(window):
        for j in range(window):
            yield jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + rows, j + cols, xp.shape[3]),
                                (1, stride, stride, 1))


def _computed_apart(x: jax.Array) -> jax.Array:
    """``x`` in a buffer of its own: XLA on CPU fused GoogLeNet's sum of branch gradients into
    the max pool's gradient, 9 times over (README, Speed). No fusion crosses a conditional; its
    branches are identities (-0.0 may become +0.0) written apart, as XLA folds equal ones."""
    return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: v * 1.0, lambda v: v + 0.0, x)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: int, stride: int, pads: Pads) -> jax.Array:
    # XLA's reduce_window. The maximum of the window's shifted slices (the same values) ran
    # 1.3-2.4x faster alone on GoogLeNet's pool shapes but made its whole step 15% slower.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), ((0, 0), pads[0], pads[1], (0, 0)))


def _max_pool_fwd(x: jax.Array, window: int, stride: int, pads: Pads
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _max_pool(x, window, stride, pads)
    return y, (x, y)


def _max_pool_bwd(window: int, stride: int, pads: Pads, residuals: tuple[jax.Array, jax.Array],
                  dy: jax.Array) -> tuple[jax.Array]:
    # XLA's gradient (select-and-scatter) measured 2x PyTorch's on CPU; this form made a
    # GoogLeNet step at 512x384 1.5-2x faster (851 -> 441, 598 -> 366 ms, same run). Shifted
    # slices: each window offset, in row-major order, takes the gradient of the outputs whose
    # maximum it holds and that no earlier offset claimed (XLA's tie rule: the first maximum),
    # and adds it back through a strided pad (the transpose of the strided slice).
    x, y = residuals
    if jax.default_backend() == "cpu":
        dy = _computed_apart(dy)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros_like(xp)
    for index, piece in enumerate(_window_slices(xp, window, stride, y.shape)):
        i, j = divmod(index, window)
        wins = (piece == y) & ~taken
        taken = taken | wins
        contribution = jnp.where(wins, dy, 0.0).astype(xp.dtype)
        dxp = dxp + jax.lax.pad(contribution, jnp.zeros((), xp.dtype), (
            (0, 0, 0), (i, xp.shape[1] - i - (y.shape[1] - 1) * stride - 1, stride - 1),
            (j, xp.shape[2] - j - (y.shape[2] - 1) * stride - 1, stride - 1), (0, 0, 0)))
    height, width = x.shape[1], x.shape[2]
    return (dxp[:, pads[0][0]:pads[0][0] + height, pads[1][0]:pads[1][0] + width],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``adaptive_avg_pool2d`` on NHWC: bin i covers [floor(i*H/n), ceil((i+1)*H/n))."""
    h, w = x.shape[1], x.shape[2]
    rows = []
    for i in range(size[0]):
        r0, r1 = (i * h) // size[0], -(-((i + 1) * h) // size[0])
        cols = []
        for j in range(size[1]):
            c0, c1 = (j * w) // size[1], -(-((j + 1) * w) // size[1])
            cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)
