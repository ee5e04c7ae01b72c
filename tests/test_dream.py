"""The canonical algorithm's invariants, on a tiny random network (milliseconds, not minutes)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.ascent import (SampleParams, StaticSettings, dream, gradient_ascent_step,
                            octave_shapes, pixel_mask, resize_real, sample_params, update_rule)
from jaxdream.engine import Engine, ItemParams
from jaxdream.errors import ConfigError
from jaxdream.models import LoadedModel
from jaxdream.objectives import TermParams


def _image(seed: int, shape: tuple[int, int] = (40, 48), low: float = 0, high: float = 255
           ) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (*shape, 3)).astype(np.float32)


def _params(step_size: float = 1.5, jitter: int = 4, seed: int = 0,
            weights: tuple[float, ...] = (1.0,), shape: tuple[int, int] = (40, 48),
            settings: StaticSettings | None = None) -> SampleParams:
    settings = settings or StaticSettings(tuple(f"l{i}" for i in range(len(weights))))
    terms = [TermParams(np.float32(w), np.zeros((0,), np.float32), np.zeros((0, 0), np.float32))
             for w in weights]
    return sample_params(*shape, settings, step_size=step_size, jitter=jitter, seed=seed,
                         terms=terms)


def _forward(model: LoadedModel, layers: tuple[str, ...]):  # type: ignore[no-untyped-def]
    return lambda x: model.module(x, layers)


def _step(model: LoadedModel, layers: tuple[str, ...],  # type: ignore[no-untyped-def]
          **settings_args):
    """One classic gradient_ascent_step, jitted (op-by-op dispatch of a gradient is slow)."""
    settings = StaticSettings(layers, **settings_args)

    def step(image: jax.Array, key: jax.Array, params: SampleParams) -> jax.Array:
        size = params.sizes[0]
        optimiser = update_rule(settings, params.step_size, pixel_mask(image.shape[:2], size))
        return gradient_ascent_step(_forward(model, layers), settings, image, size, key,
                                    params, optimiser, optimiser.init(image))[0]

    return jax.jit(step)


def _dream(model: LoadedModel, settings: StaticSettings):  # type: ignore[no-untyped-def]
    return jax.jit(lambda image, params: dream(_forward(model, settings.layers), image, params,
                                               settings))


def test_octave_sizes_match_the_notebook() -> None:
    # The guide's figures: 1024x575 at 4 octaves of 1.4 (scipy.ndimage.zoom's rounding).
    assert octave_shapes(575, 1024, 4, 1.4) == [(575, 1024), (411, 731), (294, 522), (210, 373)]
    assert octave_shapes(300, 451, 1, 1.4) == [(300, 451)]


@pytest.mark.parametrize("size, new", [((37, 53), (26, 38)), ((26, 38), (37, 53)),
                                       ((40, 48), (40, 48)), ((300, 451), (214, 322))])
def test_octaves_resize_as_the_notebooks_zoom(size: tuple[int, int], new: tuple[int, int]
                                              ) -> None:
    # The notebook's pyramid and detail upscaling: scipy.ndimage.zoom(order=1), whose grid
    # aligns the corner pixels. Compared inside larger buffers (bucket padding copies the edge).
    from scipy import ndimage

    image = _image(3, size)
    expected = ndimage.zoom(image, (new[0] / size[0], new[1] / size[1], 1), order=1)
    assert expected.shape[:2] == new
    buffer = np.pad(image, ((0, 7), (0, 5), (0, 0)), mode="edge")
    out = resize_real(jnp.asarray(buffer), jnp.asarray(size), (new[0] + 3, new[1] + 9),
                      jnp.asarray(new))
    # float32 sample positions near 300 px are exact to ~3e-5 pixel, which on noise of 0..255
    # is ~0.01 grey levels; the pixel-centre convention differs by tens of grey levels.
    assert np.abs(np.asarray(out)[:new[0], :new[1]] - expected).max() < 2e-2


def test_dream_runs_at_each_octave_size(tiny_model: LoadedModel) -> None:
    seen: list[tuple[int, ...]] = []

    def forward(x: jax.Array) -> dict[str, jax.Array]:
        seen.append(tuple(x.shape))
        return tiny_model.module(x, ("block2",))

    settings = StaticSettings(("block2",), octaves=3, octave_scale=1.5, steps=2)
    jax.eval_shape(lambda img: dream(forward, img, _params(shape=(45, 60), settings=settings),
                                     settings),
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
    base = run(image, _params(weights=(1.0, 2.0), settings=settings))
    scaled = run(image, _params(weights=(7.0, 14.0), settings=settings))
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(base), atol=2e-3)
    reweighted = run(image, _params(weights=(2.0, 1.0), settings=settings))
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
    out = _dream(tiny_model, settings)(image, _params(jitter=0, settings=settings))

    @jax.jit
    def energy(x: jax.Array) -> jax.Array:
        act = tiny_model.module(x[None], ("block2",))["block2"]
        return jnp.mean(act * act)

    assert float(energy(out)) > 1.5 * float(energy(image))


def test_engine_rejects_unknown_layers_and_bad_batches(tiny_model: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="block99"):
        Engine(tiny_model, StaticSettings(("block99",)))
    with pytest.raises(ValueError, match="batch_size"):
        Engine(tiny_model, StaticSettings(("block2",)), batch_size=0)


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


# ------------------------------------------------------------------------------ buckets


def test_padding_never_feeds_the_dream(tiny_model: LoadedModel) -> None:
    # The same 40x48 image in a 64x64 buffer, once with zero padding and once with garbage:
    # the padding is replaced by the image's edge before anything reads it.
    settings = StaticSettings(("block2",), octaves=2, steps=3)
    run = _dream(tiny_model, settings)
    params = _params(jitter=6, settings=settings)
    image = _image(20)
    zeros = np.zeros((64, 64, 3), np.float32)
    zeros[:40, :48] = image
    garbage = np.random.default_rng(1).uniform(0, 255, (64, 64, 3)).astype(np.float32)
    garbage[:40, :48] = image
    a, b = np.asarray(run(zeros, params)), np.asarray(run(garbage, params))
    np.testing.assert_array_equal(a[:40, :48], b[:40, :48])
    # The padding got no update of its own: it is the real part's edge repeated.
    np.testing.assert_array_equal(a[40:, :48], np.broadcast_to(a[39:40, :48], (24, 48, 3)))


def test_mixed_sizes_batch_matches_each_alone_and_compiles_per_bucket(
        tiny_model: LoadedModel) -> None:
    settings = StaticSettings(("block1", "block2"), octaves=2, steps=2)
    shapes = [(40, 48), (37, 45), (50, 30), (64, 64), (33, 61)]  # buckets 64x64 (4), 64x64..
    images = [_image(30 + i, shape) for i, shape in enumerate(shapes)]
    params = [ItemParams(0.5 + 0.3 * i, 3, i, (1.0, 0.5 + i)) for i in range(len(images))]
    engine = Engine(tiny_model, settings, batch_size=2, bucket=32)
    together = engine.render(images, params)
    buckets = {(64, 64), (64, 64), (64, 32), (64, 64), (64, 64)}
    assert engine.stats.programs == len(buckets) == 2
    alone = Engine(tiny_model, settings, batch_size=1, bucket=32)
    for image, p, out in zip(images, params, together, strict=True):
        assert out.shape == image.shape
        np.testing.assert_allclose(out, alone.render([image], [p])[0], atol=0.05)


def test_an_exact_size_bucket_dreams_the_image_itself(tiny_model: LoadedModel) -> None:
    # shape_bucket 1: the buffer is the image, so the jitter roll wraps the image onto itself
    # (the notebook's np.roll) instead of onto edge padding.
    settings = StaticSettings(("block2",), octaves=2, steps=3)
    image, item = _image(21, (37, 45)), ItemParams(1.5, 6, 0, (1.0,))
    exact = Engine(tiny_model, settings, bucket=1).render([image], [item])[0]
    unpadded = np.asarray(_dream(tiny_model, settings)(
        image, _params(jitter=6, shape=(37, 45), settings=settings)))
    np.testing.assert_allclose(exact, unpadded, atol=0.05)
    padded = Engine(tiny_model, settings, bucket=64).render([image], [item])[0]
    assert np.abs(padded - exact).mean() > 0.5, "the wrap at the buffer's edge decides pixels"
    # A size that is already a multiple of 64 has no padding to drop: the same dream.
    square = _image(22, (64, 128))
    np.testing.assert_array_equal(
        Engine(tiny_model, settings, bucket=1).render([square], [item])[0],
        Engine(tiny_model, settings, bucket=64).render([square], [item])[0])


def test_a_grid_over_dynamic_parameters_compiles_once(tiny_model: LoadedModel) -> None:
    settings = StaticSettings(("block1", "block2"), octaves=1, steps=2)
    engine = Engine(tiny_model, settings, batch_size=4)
    grid = [ItemParams(step, 2, 0, (1.0, weight)) for step in (0.5, 1.0, 1.5, 2.0)
            for weight in (0.25, 0.5, 1.0, 2.0)]
    outs = engine.render([_image(40)] * len(grid), grid)
    assert engine.stats.programs == 1
    assert len({float(np.round(o.sum(), 1)) for o in outs}) == len(grid), "all 16 differ"


# ------------------------------------------------------------------------------ tiles


def test_tile_starts_cover_with_equal_tiles() -> None:
    from jaxdream.ascent import tile_starts

    assert tile_starts(100, 128) == [0]
    assert tile_starts(1000, 512) == [0, 488]
    for length, tile in [(1024, 256), (1000, 300), (4096, 512), (513, 512)]:
        starts = tile_starts(length, tile)
        covered = np.zeros(length, bool)
        for s in starts:
            assert 0 <= s and s + tile <= length
            covered[s:s + tile] = True
        assert covered.all()


def test_one_tile_is_the_untiled_gradient(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(50, (40, 48), low=60, high=190))
    params = _params(jitter=3)
    untiled = _step(tiny_model, ("block2",))(image, jax.random.key(2), params)
    # tile_above below the image size tiles it; a tile as large as the image is one tile.
    one_tile = _step(tiny_model, ("block2",), tile_size=64, tile_above=32)(
        image, jax.random.key(2), params)
    np.testing.assert_allclose(np.asarray(one_tile), np.asarray(untiled), atol=1e-3)


def test_tiled_gradient_is_the_sum_of_each_tiles_gradient(tiny_model: LoadedModel) -> None:
    from jaxdream.ascent import _tiled_gradient, pixel_mask, tile_starts
    from jaxdream.objectives import evaluate

    settings = StaticSettings(("block2",), tile_size=32, tile_above=40, tile_group=4)
    forward = _forward(tiny_model, ("block2",))
    x = jnp.asarray(_image(52, (72, 80), low=60, high=190))
    size = jnp.asarray([60, 80], jnp.int32)  # the bottom 12 rows are padding
    mask = pixel_mask((72, 80), size)
    shift = jnp.asarray([13, -7], jnp.int32)
    terms = _params().terms
    tiled = jax.jit(lambda x: _tiled_gradient(forward, settings, x, mask, shift, terms))(x)

    rolled, rolled_mask = jnp.roll(x, (13, -7), (0, 1)), jnp.roll(mask, (13, -7), (0, 1))
    expected = jnp.zeros_like(x)
    for r in tile_starts(72, 32):  # 3 x 3 tiles, the last row and column overlapping
        for c in tile_starts(80, 32):
            grad = jax.grad(lambda t: evaluate(settings.structure, forward(t[None]), terms,
                                               rolled_mask[None, r:r + 32, c:c + 32],
                                               tiles=True))(
                rolled[r:r + 32, c:c + 32])
            expected = expected.at[r:r + 32, c:c + 32].add(grad)
    expected = jnp.roll(expected, (-13, 7), (0, 1))
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(np.asarray(tiled) / scale, np.asarray(expected) / scale,
                               atol=1e-5)


def test_tiled_step_keeps_the_step_size(tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(51, (96, 80), low=60, high=190))
    step = _step(tiny_model, ("block2",), tile_size=32, tile_above=64, tile_group=3)
    for key in range(2):  # 3x3 tiles in 3 groups of 3, at two random rolls
        out = step(image, jax.random.key(key), _params(step_size=1.0, jitter=4, shape=(96, 80)))
        np.testing.assert_allclose(float(jnp.mean(jnp.abs(out - image))), 1.0, rtol=1e-4)


# ------------------------------------------------------------------------------ normalisers


def test_laplacian_split_and_merge_are_exact_inverses() -> None:
    from jaxdream.ascent import _laplacian_merge, _laplacian_split

    x = jnp.asarray(_image(60, (37, 50)))
    low, high = _laplacian_split(x)
    assert low.shape == (19, 25, 3)
    np.testing.assert_allclose(np.asarray(_laplacian_merge(low, high)), np.asarray(x),
                               atol=1e-3)


@pytest.mark.parametrize("normaliser,update", [("laplacian", "ascent"), ("gaussian", "ascent"),
                                               ("mean", "adam")])
def test_other_update_rules_keep_the_step_size_meaning(
        tiny_model: LoadedModel, normaliser: str, update: str) -> None:
    image = jnp.asarray(_image(61, low=80, high=170))
    step = _step(tiny_model, ("block2",), normaliser=normaliser, update=update)
    out = step(image, jax.random.key(1), _params(step_size=0.5))
    # The first Adam step is +-lr per pixel (up to its epsilon); the others are normalised.
    np.testing.assert_allclose(float(jnp.mean(jnp.abs(out - image))), 0.5, rtol=1e-3)
    classic = _step(tiny_model, ("block2",))(image, jax.random.key(1), _params(step_size=0.5))
    assert float(jnp.max(jnp.abs(out - classic))) > 0.1, "the rule must change the step"


def test_smoothing_normalisers_shift_the_update_to_low_frequencies(
        tiny_model: LoadedModel) -> None:
    image = jnp.asarray(_image(62, (48, 48), low=80, high=170))

    def roughness(x: jax.Array) -> float:  # mean |difference| of neighbouring pixels
        d = x - image
        return float(jnp.mean(jnp.abs(d[1:] - d[:-1])) / jnp.mean(jnp.abs(d)))

    rough = {name: roughness(_step(tiny_model, ("block2",), normaliser=name)(
        image, jax.random.key(0), _params(jitter=0, shape=(48, 48))))
             for name in ("mean", "laplacian", "gaussian")}
    assert rough["gaussian"] < rough["mean"]
    assert rough["laplacian"] < rough["mean"]


# ------------------------------------------------------------------------------ objectives


def test_objectives_compose_like_values() -> None:
    from jaxdream.objectives import channel, layer, neuron

    objective = layer("block8") + 2 * channel("block10", 3, 7) + neuron("block10", 1) * 0.5
    assert objective.structure == (("l2", "block8"), ("channel", "block10"),
                                   ("neuron", "block10"))
    assert [t.weight for t in objective.terms] == [1.0, 2.0, 0.5]
    assert objective.layers == ("block8", "block10")
    assert (3 * objective).terms[1].weight == 6.0


@pytest.mark.parametrize("kind", ["channel", "neuron"])
def test_channel_objectives_grow_their_channel(tiny_model: LoadedModel, kind: str) -> None:
    settings = StaticSettings(("block2",), octaves=1, steps=6, objective=kind)
    engine = Engine(tiny_model, settings)
    image = _image(70, (40, 40), low=60, high=190)

    @jax.jit
    def activation(x: jax.Array) -> jax.Array:
        return tiny_model.module(x[None], ("block2",))["block2"][0]  # h x w x 16

    before = np.asarray(activation(image))
    gains = {}
    for ch in (2, 9):
        after = np.asarray(activation(engine.render([image], [
            ItemParams(1.5, 0, 0, (1.0,), channels=(ch,))])[0]))
        if kind == "channel":
            gains[ch] = after[..., ch].mean() - before[..., ch].mean()
        else:
            centre = (after.shape[0] // 2, after.shape[1] // 2)
            gains[ch] = after[centre][ch] - before[centre][ch]
    assert gains[2] > 0.5 and gains[9] > 0.5
    assert engine.stats.programs == 1, "the channel is a per-sample mask"
    with pytest.raises(ConfigError, match="out of range"):
        engine.render([image], [ItemParams(1.5, 0, 0, (1.0,), channels=(16,))])


def test_guide_objective_pulls_features_towards_the_guide(tiny_model: LoadedModel,
                                                         tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    guide = tmp_path / "guide.png"
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::4] = (255, 40, 0)
    Image.fromarray(stripes).save(guide)
    settings = StaticSettings(("block2",), octaves=1, steps=6, objective="guide")
    engine = Engine(tiny_model, settings)
    image = _image(71, (40, 40), low=60, high=190)
    out = engine.render([image], [ItemParams(1.5, 0, 0, (1.0,), guide=str(guide))])[0]
    features = engine._guide_features(str(guide))["block2"]

    @jax.jit
    def match(x: jax.Array) -> jax.Array:  # mean best dot product with a guide feature
        act = tiny_model.module(x[None], ("block2",))["block2"].reshape(-1, 16)
        return jnp.mean(jnp.max(act @ jnp.asarray(features).T, axis=1))

    assert float(match(out)) > float(match(image)) + 0.1
