"""The YAML job-config loader: the valid forms, every class of error, and fuzzing that only
ConfigError ever escapes. Fast: no weights are loaded and nothing is compiled."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdream.config import (DREAM_KEYS, GRID_KEYS, JOB_KEYS, MAX_VARIANTS, TOP_KEYS, JobConfig,
                             JobSettings, load_config)
from jaxdream.errors import ConfigError
from jaxdream.inputs import expand_inputs
from jaxdream.models import MODELS
from jaxdream.recipe import Recipe

from conftest import ROOT

BASE = "inputs: in.jpg\noutput: out\n"


def write(folder: Path, text: str, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(folder: Path, text: str, **overrides: Any) -> JobConfig:
    return load_config(write(folder, text), overrides or None)


def error_of(folder: Path, text: str, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(folder, text, **overrides)
    message = str(caught.value)
    assert message.startswith(str(folder / "job.yaml") + ": "), message
    assert "\n" not in message
    return message


# --- the examples in configs/ ----------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_says_how_to_run_it(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "jaxdream " in first, first
    monkeypatch.chdir(ROOT)
    config = load_config(path.relative_to(ROOT))
    assert expand_inputs(config.inputs, source=f"{config.source}: inputs")
    assert all(v.recipe.layers for v in config.variants)


def test_example_configs_are_the_ones_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    classic = load_config("configs/classic.yaml")
    assert classic.variants[0].recipe == Recipe(layers=(("block10", 1.0),), preset="classic")
    assert classic.output == Path("out/classic")
    grid = load_config("configs/grid.yaml")
    assert [len(values) for _, values in grid.grid] == [4, 4]
    assert {tuple(n for n, _ in v.recipe.layers or ()) for v in grid.variants} == \
        {("block8", "block10")}, "one layer set, so the grid compiles once"
    assert {v.recipe.max_side for v in grid.variants} == {512}
    folder = load_config("configs/folder.yaml")
    assert folder.job == JobSettings()
    assert "examples/chelsea.jpg" in expand_inputs(folder.inputs)


# --- valid forms -----------------------------------------------------------------------------

def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.inputs == ("in.jpg",) and config.output == Path("out")
    assert config.model == "efficientnet_lite0" and config.weights is None
    (variant,) = config.variants
    spec = MODELS["efficientnet_lite0"]
    assert variant.recipe.layers == ((spec.default_layers, 1.0),)
    assert variant.recipe.max_side == 1024 and variant.point == {}
    assert config.grid == () and config.job == JobSettings()


@pytest.mark.parametrize("value, expected", [(0, None), ("null", None), (512, 512)])
def test_max_side(tmp_path: Path, value: Any, expected: int | None) -> None:
    assert load(tmp_path, BASE + f"max_side: {value}\n").variants[0].recipe.max_side == expected


def test_layers_as_string_and_mapping_agree(tmp_path: Path) -> None:
    text = load(tmp_path, BASE + "dream: {layers: 'block8:1,block10:2'}\n")
    mapping = load(tmp_path, BASE + "dream:\n  layers: {block8: 1, block10: 2}\n")
    assert text.variants[0].recipe.layers == mapping.variants[0].recipe.layers == (
        ("block8", 1.0), ("block10", 2.0))


def test_dream_values_and_types(tmp_path: Path) -> None:
    recipe = load(tmp_path, BASE + "weights: w.pth\ndream:\n  steps: 3\n  step_size: 2\n"
                  "  objective: channel\n  channels: [1, 5]\n  layers: block3\n"
                  ).variants[0].recipe
    assert (recipe.steps, recipe.step_size, recipe.channels) == (3, 2.0, (1, 5))
    assert isinstance(recipe.step_size, float)


def test_grid_expands_row_major_with_labels(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "grid:\n  step_size: [0.5, 1]\n  layers: ["
                  "'block8:1,block10:0.5', {block8: 1, block10: 2}]\n  seed: [0, 1, 2]\n")
    assert len(config.variants) == 12
    assert [name for name, _ in config.grid] == ["step_size", "layers", "seed"]
    layers = ("block8:1.0,block10:0.5", "block8:1.0,block10:2.0")
    assert config.grid[1] == ("layers", layers)
    assert config.variants[0].point == {"step_size": 0.5, "layers": layers[0], "seed": 0}
    assert config.variants[1].point == {"step_size": 0.5, "layers": layers[0], "seed": 1}
    assert config.variants[3].point == {"step_size": 0.5, "layers": layers[1], "seed": 0}
    assert config.variants[-1].point == {"step_size": 1.0, "layers": layers[1], "seed": 2}
    last = config.variants[-1].recipe
    assert (last.step_size, last.seed, last.layers) == (1.0, 2, (("block8", 1.0), ("block10", 2.0)))


def test_grid_over_max_side_and_job_settings(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "grid: {max_side: [0, 256]}\n"
                  "job: {workers: 4, gpus_per_worker: 0.5, retries: 0, unit_size: 2}\n")
    assert [v.recipe.max_side for v in config.variants] == [None, 256]
    assert config.job == JobSettings(workers=4, gpus_per_worker=0.5, retries=0, unit_size=2)


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    config = load(tmp_path, BASE + "dream: {steps: 3}\n", output="elsewhere", steps=5,
                  seed=None, workers=2)
    assert config.output == Path("elsewhere")
    assert config.variants[0].recipe.steps == 5 and config.job.workers == 2
    with pytest.raises(ConfigError, match="^--steps: must be between 1 and 10000"):
        load(tmp_path, BASE, steps=-1)  # an override is named as the option that gave it
    assert "unknown setting" in error_of(tmp_path, BASE, stpes=3)


def _recipe_png(folder: Path, **values: Any) -> str:
    import numpy as np

    from jaxdream.images import save_png

    recipe = {"jaxdream": "0", "model": "efficientnet_lite0", "weights_sha256": "ab" * 32,
              "layers": {"block8": 1.0}, "steps": 7, "seed": 3, "preset": "lapnorm", **values}
    path = folder / "made.png"
    save_png(path, np.zeros((16, 16, 3), np.uint8), recipe)
    return str(path)


def test_settings_resolve_defaults_preset_recipe_config_options_in_that_order(
        tmp_path: Path) -> None:
    png = _recipe_png(tmp_path)
    config = load_config(write(tmp_path, BASE + "dream: {seed: 4}\n"), {"jitter": 5},
                         recipe=png)
    recipe = config.variants[0].recipe
    # preset lapnorm (from the PNG), the PNG's steps and layers, the config's seed, the option.
    assert (recipe.normaliser, recipe.steps, recipe.layers, recipe.seed, recipe.jitter) == (
        "laplacian", 7, (("block8", 1.0),), 4, 5)
    assert recipe.octaves == Recipe().octaves
    assert config.recipe_weights_sha256 == "ab" * 32 and config.recipe == png
    other = load_config(write(tmp_path, BASE + "model: efficientnet_lite1\n"), recipe=png)
    assert other.recipe_weights_sha256 is None, "another model: other weights"
    assert other.variants[0].recipe.layers == ((MODELS["efficientnet_lite1"].default_layers,
                                                1.0),), "another model: its own layer"


def test_a_bad_recipe_value_names_the_png(tmp_path: Path) -> None:
    png = _recipe_png(tmp_path, steps=0)
    with pytest.raises(ConfigError, match=f"^recipe {png}: steps: must be between"):
        load_config(write(tmp_path, BASE), recipe=png)
    with pytest.raises(ConfigError, match="cannot be combined with --recipe"):
        load_config(write(tmp_path, BASE + "dream: {preset: classic}\n"), recipe=_recipe_png(
            tmp_path))


# --- inputs ----------------------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small tree of (fake) photos; the working directory is its root."""
    for name in ("a.jpg", "b.PNG", "notes.md", "sub/c.jpg", "sub/deeper/d.webp", "empty/x.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_inputs_file_folder_glob(photos: Path) -> None:
    assert expand_inputs(["a.jpg"]) == ["a.jpg"]
    assert expand_inputs(["."]) == ["./a.jpg", "./b.PNG"], "images only, sorted, not recursive"
    assert expand_inputs(["*"]) == ["a.jpg", "b.PNG"], "image files only"
    assert expand_inputs(["**"]) == ["a.jpg", "b.PNG", "sub/c.jpg", "sub/deeper/d.webp"]
    assert expand_inputs(["sub/**/*"]) == ["sub/c.jpg", "sub/deeper/d.webp"]
    assert expand_inputs(["notes.md"]) == ["notes.md"], "a file named is taken whatever it is"


def test_inputs_txt_list_and_dedup(photos: Path) -> None:
    (photos / "sub" / "list.txt").write_text(
        "# photos\n\nc.jpg\n  deeper/d.webp  \n../a.jpg\n# done\n", encoding="utf-8")
    assert expand_inputs(["sub/list.txt"]) == ["sub/c.jpg", "sub/deeper/d.webp", "sub/../a.jpg"]
    assert expand_inputs(["a.jpg", "sub/list.txt", ".", "./sub/c.jpg"]) == [
        "a.jpg", "sub/c.jpg", "sub/deeper/d.webp", "./b.PNG"]
    (photos / "absolute.txt").write_text(f"{photos / 'b.PNG'}\n", encoding="utf-8")
    assert expand_inputs(["absolute.txt"]) == [str(photos / "b.PNG")]


@pytest.mark.parametrize("entry, reason", [
    ("missing.jpg", "no such file or folder"), ("empty", "holds no image file"),
    ("*.md", "matches no image file"), ("nothing/**/*.jpg", "matches no image file"),
    ("list.txt", "no such file"), ("bad.txt", "not UTF-8"), ("blank.txt", "lists no file"),
])
def test_inputs_that_match_nothing(photos: Path, entry: str, reason: str) -> None:
    (photos / "bad.txt").write_bytes(b"\xff\xfe\x00")
    (photos / "blank.txt").write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        expand_inputs(["a.jpg", entry], source="job.yaml: inputs")
    assert str(caught.value).startswith("job.yaml: inputs[1]: ")
    assert reason in str(caught.value) and (entry in str(caught.value))


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, path, reason", [
    (BASE + "ouput: x\n", "ouput", "did you mean 'output'"),
    (BASE + "dream: {stpes: 3}\n", "dream.stpes", "did you mean 'steps'"),
    (BASE + "grid: {sed: [1]}\n", "grid.sed", "did you mean 'seed'"),
    (BASE + "job: {worker: 2}\n", "job.worker", "did you mean 'workers'"),
    (BASE + "dream: {model: googlenet}\n", "dream.model", "top level"),
    (BASE + "grid: {model: [googlenet]}\n", "grid.model", "cannot be a grid axis"),
    (BASE + "grid: {preset: [classic]}\n", "grid.preset", "cannot be a grid axis"),
    (BASE + "1: x\n", "top level", "keys must be names"),
    ("output: out\n", "inputs", "missing"),
    ("inputs: []\noutput: out\n", "inputs", "non-empty list"),
    ("inputs: [a.jpg, 3]\noutput: out\n", "inputs[1]", "expected a path"),
    ("inputs: a.jpg\noutput: ''\n", "output", "expected a path"),
    (BASE + "model: effnet\n", "model", "unknown model"),
    (BASE + "weights: [a]\n", "weights", "expected a path"),
    (BASE + "max_side: -5\n", "max_side", "at least 16"),
    (BASE + "max_side: 512.0\n", "max_side", "expected an integer"),
    (BASE + "dream: [steps]\n", "dream", "expected a mapping"),
    (BASE + "dream: {steps: ten}\n", "dream.steps", "expected an integer, got 'ten'"),
    (BASE + "dream: {steps: 1.5}\n", "dream.steps", "expected an integer, got 1.5"),
    (BASE + "dream: {steps: true}\n", "dream.steps", "expected an integer, got True"),
    (BASE + "dream: {steps: -3}\n", "dream.steps", "between 1 and 10000"),
    (BASE + "dream: {seed: -1}\n", "dream.seed", "between 0 and"),
    (BASE + "dream: {octave_scale: 1}\n", "dream.octave_scale", "above 1"),
    (BASE + "dream: {step_size: 0}\n", "dream.step_size", "positive"),
    (BASE + "dream: {step_size: .nan}\n", "dream.step_size", "positive"),
    (BASE + "dream: {preset: clasic}\n", "dream.preset", "did you mean 'classic'"),
    (BASE + "dream: {layers: block99}\n", "dream.layers", "unknown endpoint 'block99'"),
    (BASE + "dream: {layers: {block8: one}}\n", "dream.layers.block8", "expected a number"),
    (BASE + "dream: {layers: {block8: .inf}}\n", "dream.layers.block8", "finite"),
    (BASE + "dream: {layers: {}}\n", "dream.layers", "empty"),
    (BASE + "dream: {layers: 3}\n", "dream.layers", "expected 'block8:1"),
    (BASE + "dream: {objective: channel}\n", "dream.channels", "needs at least one channel"),
    (BASE + "dream: {channels: [a]}\n", "dream.channels[0]", "expected an integer"),
    (BASE + "dream: {guide: ''}\n", "dream.guide", "expected a path"),
    (BASE + "dream: {shape_bucket: 0}\n", "dream.shape_bucket", "multiple of 1..512"),
    (BASE + "grid: {shape_bucket: [1, 64, 600]}\n", "grid.shape_bucket[2]", "1..512"),
    (BASE + "grid: {step_size: [0.5, 1, 0]}\n", "grid.step_size[2]", "positive"),
    (BASE + "grid: {step_size: []}\n", "grid.step_size", "non-empty list"),
    (BASE + "grid: {step_size: 1.5}\n", "grid.step_size", "non-empty list"),
    (BASE + "grid: {seed: [1, 2, 1]}\n", "grid.seed[2]", "listed twice"),
    (BASE + "grid: {layers: [block8, block99]}\n", "grid.layers[1]", "unknown endpoint"),
    (BASE + "dream: {steps: 3}\ngrid: {steps: [1, 2]}\n", "grid.steps",
     "set in both grid and dream.steps"),
    (BASE + "max_side: 64\ngrid: {max_side: [32]}\n", "grid.max_side", "set in both"),
    (BASE + "grid: {objective: [l2, channel]}\n", "dream.channels",
     "needs at least one channel (grid point objective='channel')"),
    (BASE + "job: {workers: 0}\n", "job.workers", "at least 1"),
    (BASE + "job: {retries: -1}\n", "job.retries", "at least 0"),
    (BASE + "job: {gpus_per_worker: .inf}\n", "job.gpus_per_worker", "at least 0"),
    (BASE + "job: {unit_size: 2.5}\n", "job.unit_size", "expected an integer"),
])
def test_errors_name_file_key_path_and_reason(tmp_path: Path, text: str, path: str,
                                              reason: str) -> None:
    message = error_of(tmp_path, text)
    assert f"job.yaml: {path}: " in message, message
    assert reason in message, message


def test_grid_size_is_capped(tmp_path: Path) -> None:
    axes = "".join(f"  {name}: {list(range(1, 23))}\n" for name in ("seed", "steps", "jitter"))
    assert len(range(1, 23)) ** 3 > MAX_VARIANTS
    message = error_of(tmp_path, BASE + "grid:\n" + axes)
    assert "job.yaml: grid: 10648 variants (22 x 22 x 22); at most 10000" in message


def test_every_grid_variant_is_validated(tmp_path: Path) -> None:
    message = error_of(tmp_path, BASE + "grid:\n  seed: [0, 1]\n  tile_size: [512, 32]\n")
    assert "job.yaml: grid.tile_size[1]: must be at least 64" in message
    # Only the last variant is wrong, and only by the combination of dream and grid values.
    message = error_of(tmp_path, BASE + "dream: {channels: [3]}\n"
                       "grid: {objective: [channel, neuron, l2]}\n")
    assert ("job.yaml: dream.channels: only the channel and neuron objectives use channels, "
            "not 'l2' (grid point objective='l2')") in message


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"), (b"# only a comment\n", "empty"), (b"\xff\xfe", "not UTF-8"),
    (b"- a\n- b\n", "top level must be a mapping"), (b"just text", "top level must be"),
    (b"a: [1, 2\n", "not valid YAML"), (b"a: 1\n---\nb: 2\n", "not valid YAML"),
    (b"a: 2024-13-45\n", "not valid YAML"), (b"a: b\n" + b"x" * (1 << 20), "too large"),
    (b"[" * 1200, "nested too deeply"),
])
def test_unreadable_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=reason) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(ConfigError, match="cannot read the config"):
            load_config(path)


def test_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system",
                "!!python/name:os.system", "!!python/object:pathlib.Path"):
        message = error_of(tmp_path, f"inputs: {tag} ['touch {marker}']\noutput: out\n")
        assert "not valid YAML" in message and "python" in message
    assert not marker.exists()


def test_yaml_bomb_is_refused_fast(tmp_path: Path) -> None:
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    text = "output: out\ninputs: [" + ", ".join(levels) + "]\n"  # 9**10 strings expanded
    start = time.perf_counter()
    assert "refused: more than" in error_of(tmp_path, text)
    assert "contains itself" in error_of(tmp_path, BASE + "dream: &d [*d]\n")
    assert time.perf_counter() - start < 5


# --- fuzzing: only ConfigError, with a one-line message, for any content ---------------------

def check_only_config_errors(path: Path, content: str | bytes) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        message = str(error)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"


_NAMES = sorted({*TOP_KEYS, *DREAM_KEYS, *GRID_KEYS, *JOB_KEYS, "block8", "block10", "bogus"})
_TOKENS = [*_NAMES, ": ", "\n", "  ", "- ", "[", "]", "{", "}", ", ", "&x ", "*x", "'", '"',
           "#", "!!python/object:os.system ", "!!binary ", "!!set ", "? ", "<<: ", "---\n",
           "1.5", "-1", "0", "1e400", "null", "true", "~", ".nan", "\t", "\\", "é", "2024-02-30"]
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
            | st.sampled_from(_NAMES) | st.binary(max_size=8))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(_NAMES) | _TEXT | st.integers(), inner, max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_fuzz_random_bytes_and_text(fuzz_file: Path, content: str | bytes) -> None:
    check_only_config_errors(fuzz_file, content)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join))
def test_fuzz_yaml_like_text(fuzz_file: Path, content: str) -> None:
    check_only_config_errors(fuzz_file, BASE + content)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(_NAMES) | _TEXT, _VALUES, max_size=6))
def test_fuzz_random_mappings(fuzz_file: Path, data: dict[Any, Any]) -> None:
    check_only_config_errors(fuzz_file, yaml.safe_dump(data, allow_unicode=True))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["", "dream", "grid", "job"]), st.sampled_from(_NAMES),
       _VALUES | st.lists(_VALUES, min_size=1, max_size=3))
def test_fuzz_one_bad_value_in_a_valid_config(fuzz_file: Path, section: str, key: str,
                                             value: Any) -> None:
    data: dict[str, Any] = {"inputs": ["a.jpg"], "output": "out", "max_side": 256,
                            "dream": {"steps": 2, "layers": {"block8": 1}},
                            "grid": {"seed": [0, 1]}, "job": {"workers": 2}}
    target = data[section] if section else data
    target[key] = value
    check_only_config_errors(fuzz_file, yaml.safe_dump(data, allow_unicode=True))


# --- issue 17: duplicate keys, and what a special file in inputs is --------------------------

@pytest.mark.parametrize("text, path, lines", [
    (BASE + "output: elsewhere\n", "output", "lines 2 and 3"),
    (BASE + "dream:\n  steps: 3\n  seed: 1\n  steps: 4\n", "dream.steps", "lines 4 and 6"),
    (BASE + "grid:\n  seed: [1, 2]\n  seed: [3]\n", "grid.seed", "lines 4 and 5"),
    (BASE + "grid:\n  layers:\n    - {block8: 1, block8: 2}\n", "grid.layers[0].block8",
     "lines 5 and 5"),
])
def test_duplicate_keys_are_refused_with_their_path(tmp_path: Path, text: str, path: str,
                                                    lines: str) -> None:
    message = error_of(tmp_path, text)
    assert f"job.yaml: {path}: duplicate key ({lines})" in message, message


def test_merge_keys_and_aliases_are_not_duplicates(tmp_path: Path) -> None:
    # An explicit key beside a merge (<<) overrides it, as YAML intends: not a duplicate.
    merged = load(tmp_path, BASE + "dream: {<<: {steps: 3, seed: 1}, steps: 4}\n")
    same = load(tmp_path, BASE + "dream: {seed: 1, steps: 4}\n")
    assert merged.variants == same.variants
    shared = load(tmp_path, "inputs: &x in.jpg\noutput: out\ngrid: {seed: &s [1, 2]}\n")
    assert shared.inputs == ("in.jpg",)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_special_files_in_inputs_say_what_they_are(photos: Path) -> None:
    os.mkfifo(photos / "list.txt")
    os.mkfifo(photos / "pipe.jpg")
    for entry, reason in [("list.txt", "a named pipe (FIFO), not an image or a list"),
                          ("pipe.jpg", "a named pipe (FIFO), not an image or a list"),
                          (os.devnull, "a device, not an image or a list"),
                          ("/dev/zero", "a device, not an image or a list")]:
        with pytest.raises(ConfigError) as caught:
            expand_inputs(["a.jpg", entry], source="job.yaml: inputs")
        assert str(caught.value) == f"job.yaml: inputs[1]: {entry!r}: {reason}"
