"""Runs many dreams through few compiled programs.

Images of the same size are stacked into batches of a fixed size (the last one padded with a
copy that is thrown away), per-image parameters ride along as vmapped arrays, and each compiled
program is kept for reuse and counted, so a caller can report what compiling cost.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.dream import SampleParams, StaticSettings, dream
from jaxdream.models import LoadedModel
from jaxdream.models.weights import cache_root


@dataclasses.dataclass(frozen=True)
class ItemParams:
    """The dynamic parameters of one image's dream."""

    step_size: float
    jitter: int
    seed: int
    layer_weights: tuple[float, ...]


def _render_batch(graphdef: Any, settings: StaticSettings, state: Any, images: jax.Array,
                  params: SampleParams) -> jax.Array:
    model = nnx.merge(graphdef, state)

    def forward(x: jax.Array) -> dict[str, jax.Array]:
        return model(x, settings.layers)

    if images.shape[0] == 1:
        # A batch of one skips vmap: XLA on CPU runs some batched convolution gradients up to
        # 2x slower than the same program written for one image (VGG16 at conv4_3: 2.9 s
        # against 1.6 s a step), and batch 1 is the CPU default.
        one = jax.tree.map(lambda leaf: leaf[0], params)
        return dream(forward, images[0], one, settings)[None]
    return jax.vmap(lambda image, p: dream(forward, image, p, settings))(images, params)


def stack_params(items: Sequence[ItemParams]) -> SampleParams:
    return SampleParams(
        step_size=jnp.asarray([p.step_size for p in items], jnp.float32),
        jitter=jnp.asarray([p.jitter for p in items], jnp.int32),
        seed=jnp.asarray(np.asarray([p.seed for p in items], np.uint32)),
        layer_weights=jnp.asarray([p.layer_weights for p in items], jnp.float32),
    )


@dataclasses.dataclass
class CompileStats:
    programs: int = 0
    seconds: float = 0.0


#: Compiled programs shared by every Engine in the process, keyed by everything that selects
#: one: the model's structure, the static settings, and the batch's shapes.
_PROGRAMS: dict[tuple[Any, ...], Any] = {}


@functools.lru_cache(maxsize=32)
def _jitted(graphdef: Any, settings: StaticSettings) -> Any:
    return jax.jit(partial(_render_batch, graphdef, settings))


def enable_compilation_cache(directory: str | os.PathLike[str]) -> None:
    """Keeps compiled programs on disk so that a second run of the same job compiles nothing.

    Compiling the dream for one image size costs seconds on CPU (XLA optimises the whole
    forward and backward pass); the cache turns that into a file read.
    """
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def default_cache_dir() -> Path:
    """Where compiled programs are kept: ``<cache root>/xla``."""
    return cache_root() / "xla"


class Engine:
    """Dreams batches of same-sized images with one model and one set of static settings."""

    def __init__(self, model: LoadedModel, settings: StaticSettings, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        unknown = [name for name in settings.layers if name not in model.spec.endpoints]
        if unknown:
            raise KeyError(f"model {model.spec.name} has no endpoint(s) {unknown}")
        self._graphdef, self._state = nnx.split(model.module)
        self.settings = settings
        self.batch_size = batch_size
        self.stats = CompileStats()

    def _program(self, images: jax.Array, params: SampleParams) -> Any:
        key = (self._graphdef, self.settings, tuple(images.shape),
               tuple(params.layer_weights.shape))
        program = _PROGRAMS.get(key)
        if program is None:
            start = time.perf_counter()
            program = _jitted(self._graphdef, self.settings).lower(
                self._state, images, params).compile()
            self.stats.programs += 1
            self.stats.seconds += time.perf_counter() - start
            _PROGRAMS[key] = program
        return program

    def render(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]) -> list[np.ndarray]:
        """Dreams same-sized H x W x 3 images (any dtype, 0..255) in fixed-size batches.

        Returns float32 arrays on the 0..255 scale, one per input, in order.
        """
        return [out for _, out in self.render_iter(images, params)]

    def render_iter(self, images: Sequence[np.ndarray], params: Sequence[ItemParams]
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Like :meth:`render` but yields (index, result) as each batch finishes."""
        if len(images) != len(params):
            raise ValueError("images and params differ in length")
        if not images:
            return
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise ValueError(f"render needs images of one shape, got {sorted(shapes)}")
        batch = min(self.batch_size, len(images))
        for start in range(0, len(images), batch):
            chunk = list(range(start, min(start + batch, len(images))))
            # Pad the last batch with copies of its first image so it reuses the program.
            padded = chunk + [chunk[0]] * (batch - len(chunk))
            stacked = jnp.asarray(np.stack([images[i] for i in padded]).astype(np.float32))
            stacked_params = stack_params([params[i] for i in padded])
            out = np.asarray(self._program(stacked, stacked_params)(
                self._state, stacked, stacked_params))
            for slot, index in enumerate(chunk):
                yield index, out[slot]


def default_batch_size() -> int:
    """Images per compiled call when the user does not say.

    On CPU batches buy little: on 2 cores (benchmarks/cpu_dream_step.py, Lite0 at 512x384)
    batch 4 and 8 were within 15% of batch 1 per image, ahead in one run and behind in another,
    while batch 1 finishes the first image soonest and needs the least memory. Accelerators
    need batches to fill their cores.
    """
    return 1 if jax.default_backend() == "cpu" else 8


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Indices of items grouped by image shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return groups

