"""The Python API: images in memory in and out, recipes that survive saving, programs kept
between calls, settings named as everywhere else, errors as the library's own."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxdream
from jaxdream import api
from jaxdream.errors import ConfigError, ImageError

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "examples" / "chelsea.jpg"
#: One cheap static setting shared by most tests, so they share one compiled program.
QUICK = {"layers": "block3", "octaves": 1, "steps": 2, "max_side": 64}


@pytest.fixture(scope="module")
def dreamer() -> jaxdream.Dreamer:
    return jaxdream.Dreamer(disk_cache=False)


def test_importing_jaxdream_loads_no_jax() -> None:
    code = "import jaxdream, sys; assert 'jax' not in sys.modules; print(jaxdream.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert "Dreamer" in out.stdout and "dream" in out.stdout


def test_an_array_in_gives_an_array_of_its_dtype_out(dreamer: jaxdream.Dreamer) -> None:
    photo = np.asarray(Image.open(CAT).convert("RGB").resize((64, 43)))
    out = dreamer.dream(photo, **QUICK)
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert np.abs(out.astype(int) - photo).mean() > 1.0  # it dreamed
    floats = dreamer.dream(photo.astype(np.float32), **QUICK)
    assert floats.dtype == np.float32 and floats.shape == photo.shape
    assert np.abs(np.round(floats) - out).max() <= 1


def test_a_saved_dream_renders_again_from_its_recipe_pixel_for_pixel(
        dreamer: jaxdream.Dreamer, tmp_path: Path) -> None:
    from jaxdream.cli import main

    with Image.open(CAT) as photo:
        dreamed = dreamer.dream(photo, **QUICK, seed=7)
    assert isinstance(dreamed, Image.Image) and dreamed.recipe["seed"] == 7
    dreamed.save(tmp_path / "cat.png")
    stored = json.loads(Image.open(tmp_path / "cat.png").text["jaxdream"])
    assert stored["layers"] == {"block3": 1.0} and stored["max_side"] == 64
    assert main(["dream", str(CAT), "--recipe", str(tmp_path / "cat.png"),
                 "-o", str(tmp_path / "again"), "-q"]) == 0
    again = np.asarray(Image.open(tmp_path / "again" / "chelsea_dream.png"))
    assert np.array_equal(again, np.asarray(dreamed))


def test_a_path_dreams_like_the_same_photo_in_memory(dreamer: jaxdream.Dreamer) -> None:
    from_path = dreamer.dream(str(CAT), **QUICK)
    with Image.open(CAT) as photo:
        from_pil = dreamer.dream(photo, **QUICK)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_pil))
    assert len(from_path.recipe["input"]["sha256"]) == 64


def test_the_second_dream_of_a_size_compiles_nothing(dreamer: jaxdream.Dreamer) -> None:
    photo = np.full((40, 56, 3), 90, np.uint8)
    dreamer.dream(photo, **QUICK)
    built = dreamer.stats.programs
    dreamer.dream(photo, **{**QUICK, "seed": 3, "step_size": 2.0, "jitter": 4})
    assert dreamer.stats.programs == built


def test_an_exact_size_dream_is_its_own_engine_and_program(dreamer: jaxdream.Dreamer) -> None:
    photo = np.full((40, 56, 3), 90, np.uint8)
    photo[10:30, 20:40] = 200
    padded = dreamer.dream(photo, **QUICK)  # dreamed in a 64 x 64 buffer
    built = dreamer.stats.programs
    exact = dreamer.dream(photo, **QUICK, shape_bucket=1)  # in a 40 x 56 one
    assert dreamer.stats.programs == built + 1
    assert exact.shape == photo.shape and not np.array_equal(exact, padded)
    assert np.array_equal(dreamer.dream(photo, **QUICK), padded)


def test_a_grid_of_per_image_settings_is_one_program_and_a_sheet(
        dreamer: jaxdream.Dreamer) -> None:
    photo = np.asarray(Image.open(CAT).convert("RGB").resize((48, 32)))
    before = dreamer.stats.programs
    result = dreamer.grid(Image.fromarray(photo), base=QUICK, step_size=[0.5, 2.0],
                          seed=[0, 1, 2])
    assert len(result.images) == 6 and result.points[1] == {"step_size": 0.5, "seed": 1}
    assert dreamer.stats.programs - before <= 1
    changes = [np.abs(np.asarray(im, float) - photo).mean() for im in result.images]
    assert changes[3] > changes[0]  # step size 2 changes more than 0.5
    assert result.sheet.width > 2 * 32 and result.sheet.height > 3 * 32


def test_objectives_compose_into_the_recipe(dreamer: jaxdream.Dreamer) -> None:
    recipe = dreamer.recipe(layers=jaxdream.layer("block8") + 2 * jaxdream.layer("block10"))
    assert recipe.layers == (("block8", 1.0), ("block10", 2.0)) and recipe.objective == "l2"
    chans = dreamer.recipe(objective=jaxdream.channel("block10", 3, 5))
    assert chans.objective == "channel" and chans.channels == (3, 5)
    with pytest.raises(ConfigError, match="one kind of term"):
        dreamer.recipe(layers=jaxdream.layer("block8") + jaxdream.channel("block10", 1))


def test_settings_have_the_recipe_names_and_defaults(dreamer: jaxdream.Dreamer) -> None:
    from jaxdream.recipe import PRESETS

    default = dreamer.recipe()
    assert default.layers == (("block10", 1.0),)
    assert (default.octaves, default.steps, default.step_size) == (
        PRESETS["classic"].octaves, PRESETS["classic"].steps, PRESETS["classic"].step_size)
    assert dreamer.recipe(preset="intense").steps == PRESETS["intense"].steps
    assert dreamer.recipe(preset="intense", steps=3).steps == 3
    with pytest.raises(ConfigError, match="did you mean 'step_size'"):
        dreamer.recipe(stepsize=2)
    with pytest.raises(ConfigError, match="unknown endpoint"):
        dreamer.recipe(layers="block99")
    with pytest.raises(ConfigError, match="steps"):
        dreamer.recipe(steps=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32), np.uint8), "H x W x 3"),
    (np.zeros((32, 32, 4), np.uint8), "H x W x 3"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((32, 32, 3), np.int64), "uint8 or float"),
    (12, "expected a path"),
])
def test_bad_images_are_the_librarys_own_errors(dreamer: jaxdream.Dreamer, bad: object,
                                                message: str) -> None:
    with pytest.raises(ImageError, match=message):
        dreamer.dream(bad, **QUICK)  # type: ignore[arg-type]


def test_a_missing_file_is_an_image_error_naming_it(dreamer: jaxdream.Dreamer,
                                                    tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.jpg"):
        dreamer.dream(str(tmp_path / "nope.jpg"), **QUICK)


def test_nothing_is_printed_unless_asked(dreamer: jaxdream.Dreamer,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    dreamer.dream(np.full((40, 56, 3), 90, np.uint8), **QUICK)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_classify_sees_the_coffee(dreamer: jaxdream.Dreamer) -> None:
    top = dreamer.classify(ROOT / "examples" / "coffee.jpg", top=3)
    assert top[0][1] == "espresso"


def test_the_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert tried >= 3 and failures == 0
