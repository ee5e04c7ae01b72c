"""The tile engine (``tiles: T``): its gradient, its independence of other images, one program
for every size, the recipe round trip, its refusals, and that ``tiles: 0`` changes nothing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdream import tiles
from jaxdream.ascent import StaticSettings, _objective_gradient
from jaxdream.engine import ItemParams
from jaxdream.errors import ConfigError
from jaxdream.models import LoadedModel
from jaxdream.recipe import Recipe

from conftest import EXAMPLES

FAST = ["--max-side", "64", "--octaves", "2", "--steps", "2", "-q"]


@pytest.fixture(autouse=True)
def _private_compile_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(40, 210, (*shape, 3)).astype(np.float32)


@pytest.mark.parametrize(("objective", "channels", "shift"),
                         [("l2", (), (0, 0)), ("l2", (), (5, -7)), ("channel", (1, 3), (0, 0))])
def test_a_t_by_t_image_has_the_whole_image_gradient(
        tiny_model: LoadedModel, objective: str, channels: tuple[int, ...],
        shift: tuple[int, int]) -> None:
    settings = StaticSettings(("block1", "block2"), objective=objective)
    engine = tiles.TileEngine(tiny_model, settings, 64)
    item = ItemParams(1.5, 0, 0, (1.0, 0.5), channels)
    x = _image(1, (64, 64))
    tiled = tiles.image_gradient(engine.gradient_function(item), x, shift, 64)
    whole = _objective_gradient(lambda batch: tiny_model.module(batch, settings.layers),
                                settings, jnp.asarray(x), jnp.asarray([64, 64], jnp.int32),
                                jnp.asarray(shift, jnp.int32), engine.term_params(item))
    assert np.abs(tiled).mean() > 0
    np.testing.assert_allclose(tiled, np.asarray(whole), rtol=1e-4,
                               atol=1e-5 * float(np.abs(tiled).max()))


@pytest.mark.parametrize("workers", [1, 3])
def test_an_image_among_others_is_the_image_alone_and_one_program_serves_all_sizes(
        tiny_model: LoadedModel, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiles, "_PROGRAMS", {})
    settings = StaticSettings(("block2",), octaves=2, steps=2)
    shapes = [(40, 48), (70, 90), (64, 64)]
    images = [_image(10 + i, shape) for i, shape in enumerate(shapes)]
    params = [ItemParams(1.5, 4, seed, (1.0,)) for seed in (0, 1, 2)]
    engine = tiles.TileEngine(tiny_model, settings, 64, workers=workers)
    together = engine.render(images, params)
    assert engine.stats.programs == 1, "three sizes, one tile program"
    assert sorted(index for index, _ in engine.render_iter(images, params)) == [0, 1, 2]
    alone = tiles.TileEngine(tiny_model, settings, 64, workers=2)  # its tiles on 2 threads
    for image, item, out in zip(images, params, together, strict=True):
        assert out.shape == image.shape and np.abs(out - image).mean() > 0.5
        np.testing.assert_array_equal(out, alone.render([image], [item])[0])
    # Nor does the input's memory layout change a bit (NumPy sums in memory order).
    np.testing.assert_array_equal(together[1], alone.render([np.asfortranarray(images[1])],
                                                            [params[1]])[0])
    assert alone.stats.programs == 0, "the process keeps the program"


def test_images_in_flight_finish_and_none_starts_after_a_failure(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def dream(grad, image, item, settings, tile, *rest):  # image i is filled with i
        index = int(image[0, 0, 0])
        started.append(index)
        if index == 1:
            raise RuntimeError("image 1 broke")
        time.sleep(0.3)  # image 0 is still running when image 1 fails
        return image + 1

    monkeypatch.setattr(tiles, "dream_image", dream)
    engine = tiles.TileEngine(tiny_model, StaticSettings(("block2",)), 64, workers=2)
    images = [np.full((8, 8, 3), i, np.float32) for i in range(5)]
    yielded = []
    with pytest.raises(RuntimeError, match="image 1 broke"):
        for index, out in engine.render_iter(images, [ItemParams(1.5, 0, 0, (1.0,))] * 5):
            yielded.append(index)
            np.testing.assert_array_equal(out, images[index] + 1)
    assert sorted(started) == [0, 1] and yielded == [0]


def test_images_in_flight_stop_at_their_next_step_when_the_caller_stops(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {8: 0, 16: 0}

    def gradient(grad, x, shift, tile, pool=None):  # the 16-px image is the slow one
        calls[x.shape[0]] += 1
        time.sleep(0.02 if x.shape[0] == 16 else 0)
        return np.zeros_like(x)

    monkeypatch.setattr(tiles, "image_gradient", gradient)
    settings = StaticSettings(("block2",), octaves=1, steps=500)
    engine = tiles.TileEngine(tiny_model, settings, 64, workers=2)
    images = [np.ones((16, 16, 3), np.float32), np.ones((8, 8, 3), np.float32)]
    dreams = engine.render_iter(images, [ItemParams(1.5, 0, 0, (1.0,))] * 2)
    assert next(dreams)[0] == 1, "the fast image finishes first"
    start = time.perf_counter()
    dreams.close()  # as a Ctrl-C or a failed write would
    assert time.perf_counter() - start < 2.0, "close waited for the slow image's 500 steps"
    assert calls[8] == 500 and 0 < calls[16] < 500


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_tiles_recipe_png_renders_again_identically(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from jaxdream.cli import main
    from jaxdream.images import read_recipe

    photo = str(EXAMPLES / "chelsea.jpg")
    assert main(["dream", photo, "-o", str(tmp_path / "a"), "--tiles", "64", *FAST]) == 0
    first = tmp_path / "a" / "chelsea_dream.png"
    assert read_recipe(first)["tiles"] == 64
    assert main(["dream", photo, "-o", str(tmp_path / "b"), "--recipe", str(first), "-q"]) == 0
    again = tmp_path / "b" / "chelsea_dream.png"
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    assert read_recipe(again) == read_recipe(first)
    # The whole-image engine dreams it otherwise, and its recipe has no tiles key.
    assert main(["dream", photo, "-o", str(tmp_path / "c"), *FAST]) == 0
    whole = tmp_path / "c" / "chelsea_dream.png"
    assert "tiles" not in read_recipe(whole)
    assert not np.array_equal(_pixels(whole), _pixels(first))
    capsys.readouterr()


@pytest.mark.parametrize(("changes", "words"), [
    (dict(objective="neuron", channels=(1,)), "objective 'neuron'"),
    (dict(objective="guide", guide="g.png"), "objective 'guide'"),
    (dict(normaliser="laplacian"), "normaliser 'laplacian'"),
    (dict(normaliser="gaussian"), "normaliser 'gaussian'"),
    (dict(update="adam"), "update 'adam'"),
    (dict(tiles=100), "multiple of 32"),
    (dict(tiles=32), "64..512"),
    (dict(tiles=True), "64..512"),
])
def test_what_the_tile_engine_cannot_dream_is_refused(changes: dict[str, object],
                                                      words: str) -> None:
    recipe = dataclasses.replace(Recipe(tiles=128), **changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"recipe: tiles: .*" + words):
        recipe.validate()


def test_the_cli_and_the_api_refuse_it_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from jaxdream.api import resolve_recipe
    from jaxdream.cli import main

    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "a"),
                 "--tiles", "128", "--preset", "lapnorm", *FAST])
    err = capsys.readouterr().err
    assert code != 0 and "tiles" in err and "laplacian" in err, err
    assert not (tmp_path / "a" / "chelsea_dream.png").exists()
    with pytest.raises(ConfigError, match="tiles: .*update 'adam'"):
        resolve_recipe("efficientnet_lite0", {"tiles": 128, "update": "adam"})
    assert resolve_recipe("efficientnet_lite0", {"tiles": 128}).tiles == 128


def test_tiles_zero_keeps_old_recipes_json_and_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxdream import planning, recipe as recipe_module
    from jaxdream.planning import item_id

    recipe = Recipe(layers=(("block10", 1.0),))
    assert recipe.tiles == 0 and "tiles" not in recipe.to_json(weights_sha256="ab" * 32)
    # Pinned from the code before the tiles field existed (version 0.2.0, which ids include;
    # 0.3.0 changed pixels, so ids, on purpose): the same id, so the same outputs and resumes
    # (the pixels themselves: test_cli's byte-identical re-render test).
    for module in (planning, recipe_module):
        monkeypatch.setattr(module, "__version__", "0.2.0")
    assert item_id('{"path":"/x.jpg"}', recipe, "ab" * 32) == "bdee29e8f6ce4b1ff7f0cceb6b101584"
    assert "tiles" in dataclasses.replace(recipe, tiles=128).to_json(weights_sha256="ab" * 32)


def test_the_python_api_dreams_with_the_tile_engine_too(tmp_path: Path) -> None:
    from jaxdream.api import Dreamer
    from jaxdream.cli import main
    from jaxdream.images import read_recipe

    settings = dict(max_side=64, octaves=2, steps=2, tiles=64)
    dreamer = Dreamer(disk_cache=False)
    out = dreamer.dream(str(EXAMPLES / "chelsea.jpg"), **settings)
    assert out.recipe["tiles"] == 64 and dreamer.stats.programs <= 1
    # The same pixels as `jaxdream dream --tiles 64`: one engine behind both.
    assert main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path), "--tiles", "64",
                 *FAST]) == 0
    cli = _pixels(tmp_path / "chelsea_dream.png")
    np.testing.assert_array_equal(np.asarray(out), cli)
    assert read_recipe(tmp_path / "chelsea_dream.png")["tiles"] == 64
    with pytest.raises(ConfigError, match="tiles: .*float32"):
        Dreamer(compute_dtype="bfloat16", disk_cache=False).dream(
            str(EXAMPLES / "chelsea.jpg"), **settings)
