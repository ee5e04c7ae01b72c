"""The canonical algorithm's invariants, on a tiny random network (milliseconds, not minutes)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.dream import SampleParams, StaticSettings, dream, gradient_ascent_step, octave_shapes
from jaxdream.engine import Engine, ItemParams
from jaxdream.models import LoadedModel


def _image(seed: int, shape: tuple[int, int] = (40, 48), low: float = 0, high: float = 255
           ) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (*shape, 3)).astype(np.float32)


def _params(step_size: float = 1.5, jitter: int = 4, seed: int = 0,
            weights: tuple[float, ...] = (1.0,)) -> SampleParams:
    return SampleParams(jnp.float32(step_size), jnp.int32(jitter), jnp.uint32(seed),
                        jnp.asarray(weights, jnp.float32))


def _forward(model: LoadedModel, layers: tuple[str, ...]):  # type: ignore[no-untyped-def]
    return lambda x: model.module(x, layers)


def _step(model: LoadedModel, layers: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """gradient_ascent_step, jitted (op-by-op dispatch of a gradient is slow)."""
    return jax.jit(lambda image, key, params: gradient_ascent_step(
        _forward(model, layers), layers, image, key, params))


def _dream(model: LoadedModel, settings: StaticSettings):  # type: ignore[no-untyped-def]
    return jax.jit(lambda image, params: dream(_forward(model, settings.layers), image, params,
                                               settings))


def test_octave_sizes_match_the_notebook() -> None:
    # The guide's figures: 1024x575 at 4 octaves of 1.4 (scipy.ndimage.zoom's rounding).
    assert octave_shapes(575, 1024, 4, 1.4) == [(575, 1024), (411, 731), (294, 522), (210, 373)]
    assert octave_shapes(300, 451, 1, 1.4) == [(300, 451)]


def test_dream_runs_at_each_octave_size(tiny_model: LoadedModel) -> None:
    seen: list[tuple[int, ...]] = []

    def forward(x: jax.Array) -> dict[str, jax.Array]:
        seen.append(tuple(x.shape))
        return tiny_model.module(x, ("block2",))

    settings = StaticSettings(("block2",), octaves=3, octave_scale=1.5, steps=2)
    jax.eval_shape(lambda img: dream(forward, img, _params(), settings),
                   jnp.zeros((45, 60, 3)))
    assert seen == [(1, 20, 27, 3), (1, 30, 40, 3), (1, 45, 60, 3)]


def test_step_changes_pixels_by_step_size_on_average(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(0, low=80, high=170))
    step = _step(tiny_model, ("block2",))
    for step_size in (0.25, 1.5):
        out = step(image, jax.random.key(3), _params(step_size=step_size, jitter=5))
        assert float(out.min()) > 0 and float(out.max()) < 255, "clipping would bias the mean"
        np.testing.assert_allclose(float(jnp.mean(jnp.abs(out - image))), step_size, rtol=1e-4)


def test_step_clips_to_pixel_range(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(1))
    out = _step(tiny_model, ("block2",))(image, jax.random.key(0), _params(step_size=200.0))
    assert float(out.min()) == 0.0 and float(out.max()) == 255.0


def test_jitter_rolls_the_image_before_the_gradient(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(2, low=80, high=170))
    step = _step(tiny_model, ("block2",))
    still = [step(image, jax.random.key(k), _params(jitter=0)) for k in range(2)]
    moved = [step(image, jax.random.key(k), _params(jitter=8)) for k in range(2)]
    np.testing.assert_array_equal(still[0], still[1])  # no jitter: the key does not matter
    assert float(jnp.max(jnp.abs(moved[0] - moved[1]))) > 0.1


def test_objective_scale_does_not_matter(tiny_model: LoadedModel) -> None:
    settings = StaticSettings(("block1", "block2"), octaves=2, steps=3)
    run = _dream(tiny_model, settings)
    image = jnp.asarray(_image(3))
    base = run(image, _params(weights=(1.0, 2.0)))
    scaled = run(image, _params(weights=(7.0, 14.0)))
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(base), atol=2e-3)
    reweighted = run(image, _params(weights=(2.0, 1.0)))
    assert float(jnp.max(jnp.abs(reweighted - base))) > 1.0, "weights must matter"


def test_batch_matches_each_image_alone(tiny_model: LoadedModel) -> None:
    settings = StaticSettings(("block2",), octaves=2, steps=3)
    images = [_image(10), _image(11), _image(12)]
    params = [ItemParams(1.5, 4, 0, (1.0,)), ItemParams(0.7, 2, 5, (1.0,)),
              ItemParams(2.0, 0, 9, (1.0,))]
    batched = Engine(tiny_model, settings, batch_size=2)  # 3 images: 2 batches, last padded
    together = batched.render(images, params)
    assert batched.stats.programs == 1
    alone = Engine(tiny_model, settings, batch_size=1)
    for image, p, out in zip(images, params, together, strict=True):
        single = alone.render([image], [p])[0]
        # Float rounding in batched convolutions only: far below one grey level.
        np.testing.assert_allclose(out, single, atol=0.05)
    # Per-sample parameters really are per sample: the three results differ.
    assert np.abs(together[0] - together[1]).max() > 1.0


def test_same_seed_same_dream_other_seed_other_dream(tiny_model: LoadedModel) -> None:
    engine = Engine(tiny_model, StaticSettings(("block2",), octaves=2, steps=2), batch_size=1)
    image = _image(4)
    first = engine.render([image], [ItemParams(1.5, 8, 1, (1.0,))])[0]
    again = engine.render([image], [ItemParams(1.5, 8, 1, (1.0,))])[0]
    other = engine.render([image], [ItemParams(1.5, 8, 2, (1.0,))])[0]
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.5


def test_dream_increases_the_objective(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(5, low=60, high=190))
    settings = StaticSettings(("block2",), octaves=1, steps=5)
    out = _dream(tiny_model, settings)(image, _params(jitter=0))

    @jax.jit
    def energy(x: jax.Array) -> jax.Array:
        act = tiny_model.module(x[None], ("block2",))["block2"]
        return jnp.mean(act * act)

    assert float(energy(out)) > 1.5 * float(energy(image))


def test_engine_rejects_unknown_layers_and_bad_batches(tiny_model: LoadedModel) -> None:
    with pytest.raises(KeyError, match="block99"):
        Engine(tiny_model, StaticSettings(("block99",)))
    with pytest.raises(ValueError, match="batch_size"):
        Engine(tiny_model, StaticSettings(("block2",)), batch_size=0)
    engine = Engine(tiny_model, StaticSettings(("block2",), octaves=1, steps=1))
    with pytest.raises(ValueError, match="one shape"):
        engine.render([_image(0), _image(0, (32, 32))], [ItemParams(1.5, 0, 0, (1.0,))] * 2)


def test_dream_of_an_abstract_copy_matches(tiny_model: LoadedModel) -> None:
    # Engine programs are keyed by model structure, not identity: a second model object with
    # the same weights must reuse the compiled program and give the same pixels.
    graphdef, state = nnx.split(tiny_model.module)
    twin = dataclasses.replace(tiny_model, module=nnx.merge(graphdef, state))
    settings = StaticSettings(("block2",), octaves=1, steps=2)
    image, p = _image(6), ItemParams(1.0, 3, 0, (1.0,))
    first = Engine(tiny_model, settings, batch_size=1)
    a = first.render([image], [p])[0]
    second = Engine(twin, settings, batch_size=1)
    b = second.render([image], [p])[0]
    assert second.stats.programs == 0
    np.testing.assert_array_equal(a, b)
