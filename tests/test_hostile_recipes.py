"""Recipe and layer errors name their source, say what is wrong, and stay short (issue 17, 8).

No model is loaded: every case is refused while the options are read, before any rendering.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from jaxdream.cli import main
from jaxdream.errors import ConfigError
from jaxdream.objectives import channel, term_params
from jaxdream.recipe import Recipe, parse_layers

from conftest import EXAMPLES

#: Every message must stay readable on a terminal, whatever the input holds.
MAX_LINE = 400


def recipe_png(path: Path, text: str) -> Path:
    """A PNG whose jaxdream chunk holds ``text`` verbatim (save_png would refuse to write it)."""
    info = PngInfo()
    info.add_text("jaxdream", text, zip=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, pnginfo=info)
    return path


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert len(lines[0]) < MAX_LINE, lines[0][:1000]
    return lines[0]


def dream_with(recipe: Path, tmp_path: Path) -> list[str]:
    return ["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "out"),
            "--recipe", str(recipe), "-q"]


def test_infinite_layer_weight_names_the_recipe_and_the_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = recipe_png(tmp_path / "r.png", '{"model": "efficientnet_lite0", '
                                         '"layers": {"block8": 1e400}}')
    line = error_line(capsys, dream_with(png, tmp_path))
    assert f"recipe {png}: layers.block8: weight is too large" in line, line
    assert "infinity" in line and "block8:inf" not in line


def test_unknown_layer_in_a_recipe_names_the_recipe(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = recipe_png(tmp_path / "r.png", '{"model": "efficientnet_lite0", '
                                         '"layers": {"nolayer": 1}}')
    line = error_line(capsys, dream_with(png, tmp_path))
    assert f"recipe {png}: layers: unknown endpoint 'nolayer'" in line, line


def test_100000_bad_channels_give_one_short_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = list(range(-1, -100_001, -1))
    png = recipe_png(tmp_path / "r.png", json.dumps(
        {"model": "efficientnet_lite0", "objective": "channel", "channels": bad}))
    line = error_line(capsys, dream_with(png, tmp_path))
    assert f"recipe {png}: channels:" in line
    assert "100000 of 100000 are not: -1, -2, -3, -4, -5 and 99995 more" in line, line


def test_50000_unknown_recipe_keys_give_one_short_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = recipe_png(tmp_path / "r.png", json.dumps({f"k{i:05d}": 0 for i in range(50_000)}))
    line = error_line(capsys, dream_with(png, tmp_path))
    assert f"recipe {png}: 50000 unknown recipe key(s): 'k00000'" in line, line
    assert "and 49995 more" in line


def test_long_garbage_in_options_is_quoted_briefly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "out"), "-q"]
    line = error_line(capsys, [*base, "--objective", "channel", "--channels", "x" * 100_000])
    assert "--channels: expected integers" in line
    line = error_line(capsys, [*base, "--layers", "block8:" + "9" * 100_000])
    assert "layers:" in line
    line = error_line(capsys, [*base, "--layers", "a" * 100_000])
    assert "unknown endpoint 'aaaa" in line


def test_channel_range_errors_are_capped() -> None:
    term = channel("block8", *range(1000, 101_000))
    with pytest.raises(ConfigError) as caught:
        term_params(term, 112)
    message = str(caught.value)
    assert len(message) < MAX_LINE
    assert "100000 out of range for layer block8, which has 112 channels" in message
    assert "1000, 1001, 1002, 1003, 1004 and 99995 more" in message


def test_layer_weights_are_checked_by_validate_too() -> None:
    with pytest.raises(ConfigError, match=r"^job: layers: the weight of 'block8' must be a finite number"):
        Recipe(layers=(("block8", float("inf")),)).validate("job")
    with pytest.raises(ConfigError, match="must be finite"):
        parse_layers("block8:1e400")
