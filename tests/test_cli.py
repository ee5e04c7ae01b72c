"""End to end through ``jaxdream`` with the real embedded model, at thumbnail sizes."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxdream import __version__
from jaxdream.cli import main
from jaxdream.images import read_recipe
from jaxdream.models import MODELS

from conftest import EXAMPLES

#: Small and quick, but a real dream: two octaves of the real network.
FAST = ["--max-side", "64", "--octaves", "2", "--steps", "2", "-q"]


@pytest.fixture(autouse=True)
def _private_compile_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_dream_renders_good_inputs_and_reports_each_bad_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes((EXAMPLES.parent / "examples" / "chelsea.jpg").read_bytes()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    out = tmp_path / "out"
    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), str(tmp_path / "missing.jpg"),
                 str(broken), str(text), str(EXAMPLES / "coffee.jpg"), "-o", str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 1, "a failed input must show in the exit status"
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, captured.err
    for name in ("missing.jpg", "broken.png", "notes.jpg"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert "dreamed 2 image(s)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["chelsea_dream.png", "coffee_dream.png"]

    recipe = read_recipe(out / "chelsea_dream.png")
    assert recipe["jaxdream"] == __version__
    assert recipe["model"] == "efficientnet_lite0"
    assert recipe["weights_sha256"].startswith("57934424")
    assert recipe["layers"] == {MODELS["efficientnet_lite0"].default_layers: 1.0}
    assert {k: recipe[k] for k in ("octaves", "octave_scale", "steps", "step_size", "jitter",
                                   "seed", "max_side", "preset")} == {
        "octaves": 2, "octave_scale": 1.4, "steps": 2, "step_size": 1.5, "jitter": 32,
        "seed": 0, "max_side": 64, "preset": "classic"}
    assert recipe["input"]["name"] == "chelsea.jpg" and len(recipe["input"]["sha256"]) == 64
    dreamed = _pixels(out / "chelsea_dream.png")
    assert dreamed.shape == (43, 64, 3)
    original = np.asarray(Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((64, 43)))
    assert np.abs(dreamed.astype(float) - original).mean() > 3, "the dream changed nothing"


def test_recipe_rerenders_the_same_image_and_runs_are_byte_identical(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--seed", "7", "--step-size", "2.5", "--jitter", "12",
               "--layers", "block8:1,block10:2", *FAST]
    photo = str(EXAMPLES / "chelsea.jpg")
    assert main(["dream", photo, "-o", str(tmp_path / "a"), *options]) == 0
    assert main(["dream", photo, "-o", str(tmp_path / "b"), *options]) == 0
    first, second = tmp_path / "a" / "chelsea_dream.png", tmp_path / "b" / "chelsea_dream.png"
    assert first.read_bytes() == second.read_bytes()

    assert main(["dream", photo, "-o", str(tmp_path / "c"), "--recipe", str(first), "-q"]) == 0
    again = tmp_path / "c" / "chelsea_dream.png"
    np.testing.assert_array_equal(_pixels(again), _pixels(first))
    assert read_recipe(again) == read_recipe(first)
    assert read_recipe(first)["layers"] == {"block8": 1.0, "block10": 2.0}

    # A recipe is a starting point: an explicit option overrides it.
    assert main(["dream", photo, "-o", str(tmp_path / "d"), "--recipe", str(first),
                 "--seed", "8", "-q"]) == 0
    changed = tmp_path / "d" / "chelsea_dream.png"
    assert read_recipe(changed)["seed"] == 8
    assert not np.array_equal(_pixels(changed), _pixels(first))
    capsys.readouterr()


def test_an_exact_size_recipe_renders_again_identically(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --shape-bucket 1 dreams chelsea (64x43 here) at its own size, not in a 64x64 buffer: the
    # recipe says so, re-renders the same pixels, and the padded default dreams other ones.
    photo = str(EXAMPLES / "chelsea.jpg")
    loud = [arg for arg in FAST if arg != "-q"]
    assert main(["dream", photo, "-o", str(tmp_path / "a"), "--shape-bucket", "1", *loud]) == 0
    assert "hint:" not in capsys.readouterr().err
    exact = tmp_path / "a" / "chelsea_dream.png"
    assert read_recipe(exact)["shape_bucket"] == 1
    assert main(["dream", photo, "-o", str(tmp_path / "b"), "--recipe", str(exact), "-q"]) == 0
    again = tmp_path / "b" / "chelsea_dream.png"
    np.testing.assert_array_equal(_pixels(again), _pixels(exact))
    assert read_recipe(again) == read_recipe(exact)
    assert main(["dream", photo, "-o", str(tmp_path / "c"), *loud]) == 0
    # The padded run says how to dream at the photo's size (not with -q, above).
    assert ("hint: 64x43 photos were dreamed in a 64x64 buffer (49% more pixels); "
            "--shape-bucket 1") in capsys.readouterr().err
    padded = tmp_path / "c" / "chelsea_dream.png"
    assert "shape_bucket" not in read_recipe(padded)  # 64: older recipes keep their JSON
    assert not np.array_equal(_pixels(padded), _pixels(exact))
    capsys.readouterr()


def test_speed_hints_name_the_faster_engine_only_when_it_applies() -> None:
    from jaxdream.engine import CompileStats
    from jaxdream.render import speed_hints

    settings = object()
    cold = CompileStats(programs=3, compiled=3)
    mixed = {(300, 400), (512, 384), (200, 512)}
    # A cold folder of three buckets on a CPU: the tile engine; on a GPU, or warm: nothing.
    (hint,) = speed_hints((settings, 0, 64), mixed, cold, "cpu")
    assert hint.startswith("hint: 3 programs were compiled") and "--tiles 128" in hint
    assert speed_hints((settings, 0, 64), mixed, cold, "gpu") == []
    assert speed_hints((settings, 0, 64), mixed, CompileStats(programs=3, loaded=3), "cpu") == []
    assert speed_hints((settings, 128, 0), mixed, cold, "cpu") == []  # already tiles
    # Photos of one size: exact sizes if their buffer is at least 10% larger.
    (hint,) = speed_hints((settings, 0, 64), {(400, 600)}, CompileStats(1, compiled=1), "cpu")
    assert "600x400 photos were dreamed in a 640x448 buffer (19% more pixels)" in hint
    assert speed_hints((settings, 0, 64), {(384, 512)}, CompileStats(1), "cpu") == []
    assert speed_hints((settings, 0, 64), {(380, 512)}, CompileStats(1), "cpu") == []  # 1%
    assert speed_hints((settings, 0, 1), {(400, 600)}, CompileStats(1), "cpu") == []
    assert speed_hints((settings, 0, 64), set(), cold, "cpu") == []  # nothing dreamed


def test_outputs_never_overwrite_inputs_and_existing_outputs_are_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(EXAMPLES / "chelsea.jpg", folder / "cat.jpg")
    shutil.copy(EXAMPLES / "coffee.jpg", folder / "cat_dream.png")  # looks like an output
    (folder / "readme.txt").write_text("not picked up from a folder")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    assert main(["dream", str(folder), "-o", str(folder), *FAST]) == 0
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, f"input {name} was overwritten"
    new = sorted(set(p.name for p in folder.iterdir()) - set(before))
    assert len(new) == 2 and "cat_dream_dream.png" in new
    assert all(name.startswith("cat_") and name.endswith("_dream.png") for name in new)
    capsys.readouterr()

    stamp = {name: (folder / name).stat().st_mtime_ns for name in new}
    assert main(["dream", str(folder / "cat.jpg"), str(folder / "cat_dream.png"),
                 "-o", str(folder), *FAST]) == 0
    assert "skipped" in capsys.readouterr().err
    assert {name: (folder / name).stat().st_mtime_ns for name in new} == stamp


def test_colliding_names_get_distinct_deterministic_outputs(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(EXAMPLES / "chelsea.jpg", tmp_path / sub / "cat.jpg")
    inputs = [str(tmp_path / "a" / "cat.jpg"), str(tmp_path / "b" / "cat.jpg")]
    assert main(["dream", *inputs, "-o", str(tmp_path / "out"), *FAST]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2 and names[0] != names[1]
    assert main(["dream", *inputs, "-o", str(tmp_path / "out2"), *FAST]) == 0
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == names


@pytest.mark.parametrize(("option", "message"), [
    (["--steps", "0"], "--steps: must be"),
    (["--octave-scale", "1.0"], "--octave-scale: must be"),
    (["--step-size", "0"], "--step-size: must be"),
    (["--channels", "3,x"], "--channels: expected integers"),
    (["--max-pixels", "100"], "--max-pixels: must be at least 256"),
    (["--layers", "block99"], "unknown endpoint 'block99'"),
    (["--layers", "block8:x"], "block8:x"),
    (["--preset", "nope"], "unknown preset"),
    (["--model", "nope"], "unknown model"),
    (["--batch-size", "0"], "--batch-size"),
    (["--shape-bucket", "0"], "--shape-bucket: expected a side multiple of 1..512"),
    (["--shape-bucket", "1000"], "--shape-bucket: expected a side multiple of 1..512"),
    (["--weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
])
def test_impossible_options_are_one_clear_error(option: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "o"), *option])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_hostile_weights_file_is_refused_without_effect(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {sentinel}",))

    weights = tmp_path / "weights.pth"
    weights.write_bytes(pickle.dumps({"_conv_stem.weight": Exploit()}))
    code = main(["classify", str(EXAMPLES / "chelsea.jpg"), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert code == 2 and "system" in err and "weights.pth" in err
    assert not sentinel.exists()


def test_weights_option_loads_a_checkpoint_file(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = MODELS["efficientnet_lite0"].local_weights()
    assert path is not None
    copy = tmp_path / "lite0.pth"
    shutil.copy(path, copy)
    assert main(["dream", str(EXAMPLES / "coffee.jpg"), "-o", str(tmp_path / "o"),
                 "--weights", str(copy), *FAST]) == 0
    assert read_recipe(tmp_path / "o" / "coffee_dream.png")["weights"] == "lite0.pth"
    capsys.readouterr()


def test_classify_prints_top_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    code = main(["classify", str(EXAMPLES / "coffee.jpg"), str(empty), "--top", "3"])
    captured = capsys.readouterr()
    assert code == 1 and "empty.jpg" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].endswith("coffee.jpg") and len(lines) == 4
    assert "espresso (967)" in lines[1]


def test_the_console_script_is_installed() -> None:
    script = shutil.which("jaxdream", path=os.path.dirname(sys.executable))
    assert script is not None, "pip install did not create the jaxdream command"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"jaxdream {__version__}"
    result = subprocess.run([script, "dream"], capture_output=True, text=True)
    assert result.returncode == 2 and "INPUT" in result.stderr


def test_a_grid_config_renders_every_variant_with_one_program_a_sheet_and_a_gallery(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "grid.yaml"
    config.write_text(f"""# jaxdream dream --config grid.yaml
inputs: [{EXAMPLES / 'chelsea.jpg'}, {EXAMPLES / 'coffee.jpg'}]
output: {tmp_path / 'out'}
max_side: 64
dream: {{octaves: 2, steps: 2}}
grid:
  step_size: [0.5, 2.0]
  layers: ["block5:1,block8:1", "block5:1,block8:3"]
""")
    assert main(["dream", "--config", str(config), "-q"]) == 0
    err = capsys.readouterr().err
    # Two photos of different sizes share one bucket at 64 px; four settings, one program.
    assert "dreamed 8 image(s)" in err and "built 1 program(s)" in err
    out = tmp_path / "out"
    dreams = sorted(p.name for p in out.glob("*_dream_*.png"))
    assert dreams == [f"{stem}_dream_{i}.png" for stem in ("chelsea", "coffee") for i in range(4)]
    recipe = read_recipe(out / "chelsea_dream_3.png")
    assert recipe["step_size"] == 2.0 and recipe["layers"] == {"block5": 1.0, "block8": 3.0}
    assert recipe["grid"] == {"step_size": 2.0, "layers": "block5:1.0,block8:3.0"}
    # Variants really differ, and each sheet is a labelled 2 x 2 layout.
    assert np.abs(_pixels(out / "chelsea_dream_0.png").astype(int)
                  - _pixels(out / "chelsea_dream_3.png")).mean() > 1.0
    for stem in ("chelsea", "coffee"):
        with Image.open(out / f"{stem}_grid.png") as sheet:
            assert sheet.width > 2 * 64 and sheet.height > 2 * 64
    page = (out / "index.html").read_text()
    assert "chelsea_grid.png" in page and "coffee_dream_2.png" in page


def test_options_override_a_config_and_inputs_conflict_with_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jaxdream.cli import build_parser, job_config

    config = tmp_path / "c.yaml"
    config.write_text(f"inputs: {EXAMPLES / 'chelsea.jpg'}\noutput: {tmp_path}\n"
                      f"dream: {{steps: 5, seed: 4}}\n")
    resolved = job_config(build_parser().parse_args(
        ["dream", "--config", str(config), "--steps", "3", "--preset", "lapnorm"]))
    recipe = resolved.variants[0].recipe
    assert (recipe.steps, recipe.seed, recipe.normaliser) == (3, 4, "laplacian"), \
        "defaults, then the preset, then the config, then the options"
    assert main(["dream", "--config", str(config), "--steps", "0"]) == 2
    assert "--steps: must be between 1 and 10000" in capsys.readouterr().err
    assert main(["dream", "--config", str(config), "photo.jpg"]) == 2
    assert "photo.jpg" in capsys.readouterr().err
    config.write_text("inputs: x.jpg\noutput: o\ndream: {stpes: 3}\n")
    assert main(["dream", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "dream.stpes" in err and "steps" in err


def test_the_hostile_corpus_through_dream_renders_the_good_and_reports_each_bad(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hostile_images import make_corpus

    cases = make_corpus(tmp_path / "corpus")
    inputs = [str(case.path) for case in cases]
    out = tmp_path / "out"
    status = main(["dream", *inputs, "-o", str(out), "--max-side", "32", "--octaves", "1",
                   "--steps", "1", "--layers", "block0", "-q"])
    captured = capsys.readouterr()
    assert status == 1, "some inputs failed, so the exit status says so"
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    written = set(captured.out.split())
    good = [case for case in cases if case.should_load]
    # A folder given as input is a folder of inputs; an empty one is a failed input too.
    bad = [case for case in cases if not case.should_load]
    assert len(cases) >= 50 and len(good) >= 20 and len(bad) >= 20
    assert len(written) == len(good), "every good file renders"
    assert all(Path(path).is_file() and Path(path).parent == out for path in written)
    from jaxdream.images import _display

    for case in bad:  # each bad file: exactly one line, naming it (escaped), with its reason
        mine = [line for line in errors if _display(case.path) in line]
        assert len(mine) == 1, (case.description, mine)
        reason = "holds no image file" if case.path.is_dir() else case.reason
        if reason:
            assert reason in mine[0], (case.description, mine[0])
    assert len(errors) == len(bad)
    # Nothing else was written: no partial files, no temporaries.
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == []


def test_the_pixel_limit_is_settable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path), *FAST]
    assert main([*args, "--max-pixels", "10000"]) == 1  # the cat has 451 x 300 pixels
    assert "too large" in capsys.readouterr().err
    assert main([*args, "--max-pixels", "200000"]) == 0


@pytest.mark.parametrize("name", ["../escape.jpg", "-rf.jpg", "..jpg", ".hidden.jpg",
                                  "a b\u00e9\u4e2d.jpg", "x\\y.jpg", "CON.jpg"])
def test_output_names_stay_inside_the_output_folder(tmp_path: Path, name: str) -> None:
    from jaxdream.render import output_stems, variant_path

    out = tmp_path / "out"
    for stem in output_stems([f"/abs/dir/{name}", name, f"../../{name}"], out):
        for path in (variant_path(out, stem, 0, 1), variant_path(out, stem, 3, 16)):
            assert path.resolve().parent == out.resolve()
            assert not path.name.startswith(("-", "."))


def test_a_full_disk_fails_clearly_leaves_nothing_partial_and_a_rerun_finishes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import stat

    import jaxdream.images

    inputs = [str(EXAMPLES / name) for name in ("chelsea.jpg", "coffee.jpg")]
    out = tmp_path / "out"
    real_fsync = os.fsync
    synced = {"files": 0}

    def full_after_first_file(fd: int) -> None:  # the disk fills up while writing the second
        if stat.S_ISREG(os.fstat(fd).st_mode):
            synced["files"] += 1
            if synced["files"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(jaxdream.images.os, "fsync", full_after_first_file)
    assert main(["dream", *inputs, "-o", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert [p.name for p in out.iterdir()] == ["chelsea_dream.png"], "no partial file"
    monkeypatch.setattr(jaxdream.images.os, "fsync", real_fsync)
    assert main(["dream", *inputs, "-o", str(out), *FAST]) == 0
    assert "1 skipped" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["chelsea_dream.png", "coffee_dream.png"]


def test_an_input_that_yields_no_image_is_a_failed_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder.jpg").mkdir()
    inputs = [str(EXAMPLES / "chelsea.jpg"), str(tmp_path / "empty"), str(tmp_path / "folder.jpg"),
              str(tmp_path / "*.webp")]
    assert main(["dream", *inputs, "-o", str(tmp_path / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, err
    assert "empty holds no image file" in errors[0] and "folder.jpg holds no" in errors[1]
    assert "*.webp matches no image file" in errors[2]
    assert "dreamed 1 image(s)" in err and "(3 failed, 0 skipped)" in err


def test_with_no_image_to_dream_no_progress_bar_is_drawn(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["dream", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "dreaming" not in err and err.count("holds no image file") == 1, err


def test_inputs_may_come_after_options_and_unknown_words_are_still_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from jaxdream.cli import parse_arguments

    args = parse_arguments(["dream", "a.jpg", "-o", "out", "--steps", "5", "b.jpg", "c/"])
    assert (args.command, args.inputs, args.output, args.steps) == \
        ("dream", ["a.jpg", "b.jpg", "c/"], "out", 5)
    args = parse_arguments(["classify", "a.jpg", "--top", "3", "b.jpg"])
    assert (args.inputs, args.top) == (["a.jpg", "b.jpg"], 3)
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["dream", "a.jpg", "-o", "out", "--stpes", "5"])
    assert exit_info.value.code == 2 and "--stpes" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without an input list takes no extra words
        parse_arguments(["models", "vgg16", "extra"])
    assert "extra" in capsys.readouterr().err


def test_an_unwritable_cache_folder_warns_and_the_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxdream import engine

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("JAXDREAM_CACHE", str(blocker / "cache"))
    heard: list[str] = []
    assert engine.use_disk_cache(heard.append) is False
    assert len(heard) == 1 and heard[0].startswith("warning: compilation cache disabled")
