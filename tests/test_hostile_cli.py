"""``jaxdream dream`` against careless and hostile use of its output folder (issue 17).

Two jobs on one folder (item 1), an output folder that cannot be created (4), the input folder
as output (5), failures that must reach the gallery (6), gallery errors (10), and ``/`` or the
home folder as output (11). Real model, thumbnail sizes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxdream.cli import main

from conftest import EXAMPLES

FAST = ["--max-side", "32", "--octaves", "1", "--steps", "1", "--layers", "block0", "-q"]
TINY = {"layers": "block0", "octaves": 1, "steps": 1}


@pytest.fixture(autouse=True)
def _private_compile_cache(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config_file(path: Path, inputs: object, output: Path, **extra: object) -> Path:
    path.write_text(yaml.safe_dump({"inputs": inputs, "output": str(output), "max_side": 32,
                                    "dream": dict(TINY), **extra}), encoding="utf-8")
    return path


def errors_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def unwritable_parent(tmp_path: Path) -> Path:
    """A folder where nothing can be created (for root, whom permissions do not stop: /sys)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return parent


# --- item 4: an output folder that cannot be created -----------------------------------------

def test_an_output_folder_that_cannot_be_created_is_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = unwritable_parent(tmp_path) / "jaxdream-test" / "sub"
    assert main(["dream", str(EXAMPLES / "chelsea.jpg"), "-o", str(target), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {target}: cannot create the output folder: "
                                        f"{'Operation not permitted' if os.geteuid() == 0 else 'Permission denied'}"]
    config = config_file(tmp_path / "c.yaml", str(EXAMPLES / "chelsea.jpg"), target)
    assert main(["dream", "--config", str(config), "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- item 11: / and the home folder -----------------------------------------------------------

def test_root_and_home_as_output_are_refused_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    photo = str(EXAMPLES / "chelsea.jpg")
    # "/" itself is refused by the same check (tests/test_outdir.py); it is not tried here,
    # where a regression would write into the machine's root.
    assert main(["dream", photo, "-o", str(home), *FAST]) == 2
    err = capsys.readouterr().err
    assert "refusing to write into your home folder" in err and "--force" in err
    config = config_file(tmp_path / "c.yaml", photo, home / ".")
    assert main(["dream", "--config", str(config), "-q"]) == 2
    assert "your home folder" in capsys.readouterr().err
    assert not (home / "chelsea_dream.png").exists()
    assert main(["dream", photo, "-o", str(home), "--force", *FAST]) == 0
    assert (home / "chelsea_dream.png").is_file()


# --- item 5: output folder == input folder ---------------------------------------------------

def test_rerunning_into_the_input_folder_dreams_only_the_photos_under_stable_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "chelsea.jpg", photos)
    for _ in range(2):
        assert main(["dream", str(photos), "-o", str(photos), *FAST]) == 0
    assert sorted(p.name for p in photos.iterdir()) == ["chelsea.jpg", "chelsea_dream.png"]
    capsys.readouterr()
    # A grid with a gallery: outputs, a contact sheet, thumbnails and index.html stay put too.
    config = config_file(tmp_path / "g.yaml", str(photos), photos, grid={"seed": [1, 2]})
    for _ in range(2):
        assert main(["dream", "--config", str(config), "-q"]) == 0
    names = sorted(p.name for p in photos.iterdir())
    assert names == ["chelsea.jpg", "chelsea_dream.png", "chelsea_dream_0.png",
                     "chelsea_dream_1.png", "chelsea_grid.png", "index.html", "thumbs"], names
    # Named explicitly, a previous output is still dreamed: only folder expansion leaves it out.
    assert main(["dream", str(photos / "chelsea_dream.png"), "-o", str(photos), *FAST]) == 0
    assert (photos / "chelsea_dream_dream.png").is_file()


# --- item 6: failures reach the gallery --------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_inputs_that_fail_when_opened_are_in_the_gallery_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    listed = [str(EXAMPLES / "chelsea.jpg"), str(tmp_path / "missing.jpg"), "/dev/zero",
              str(tmp_path / "pipe.jpg"), str(tmp_path / "empty.jpg")]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "out"
    config = config_file(tmp_path / "c.yaml", str(tmp_path / "list.txt"), out)
    assert main(["dream", "--config", str(config), "-q"]) == 1
    err = capsys.readouterr().err
    assert len(errors_of(err)) == 4 and "(4 failed" in err
    page = (out / "index.html").read_text()
    assert "<p>1 done, 0 skipped, 4 failed</p>" in page, page[:2000]
    for name in listed[1:]:
        assert name in page


# --- item 10: gallery errors --------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_gallery_that_cannot_be_written_names_the_right_path_and_fails_the_exit_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "thumbs")
    config = config_file(tmp_path / "c.yaml", str(EXAMPLES / "chelsea.jpg"), out)
    status = main(["dream", "--config", str(config), "-q"])
    err = capsys.readouterr().err
    errors = errors_of(err)
    assert len(errors) == 1 and f"{out / 'thumbs'}" in errors[0], err
    assert status == 1, "an error: line means a non-zero exit status"
    assert (out / "chelsea_dream.png").is_file()  # the dream itself is safe


# --- item 1: two jaxdream dream processes on one folder ------------------------------------

@pytest.mark.timeout(300)
def test_a_second_dream_into_a_busy_folder_is_refused_naming_the_first(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    slow = [sys.executable, "-m", "jaxdream.cli", "dream", str(EXAMPLES / "chelsea.jpg"),
            "-o", str(out), "--max-side", "96", "--octaves", "2", "--steps", "40", "-q"]
    first = subprocess.Popen(slow, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".jaxdream.lock").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first dream never locked its folder"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # it holds the lock, however fast it would finish
        try:
            second = subprocess.run(
            [sys.executable, "-m", "jaxdream.cli", "dream", str(EXAMPLES / "coffee.jpg"),
             "-o", str(out), *FAST], env=env, capture_output=True, text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert f"in use by jaxdream dream (pid {first.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert not (out / "coffee_dream.png").exists()
    assert not (out / ".jaxdream.lock").exists()
    assert main(["dream", str(EXAMPLES / "coffee.jpg"), "-o", str(out), *FAST]) == 0


def test_an_input_over_the_file_size_limit_is_refused_without_reading_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # 300 MB on paper, nothing on disk
        f.write((EXAMPLES / "chelsea.jpg").read_bytes())
        f.truncate(300 * 2**20)
    started = time.perf_counter()
    assert main(["dream", str(big), str(EXAMPLES / "chelsea.jpg"), "-o", str(tmp_path / "o"),
                 *FAST]) == 1
    errors = errors_of(capsys.readouterr().err)
    assert errors == [f"error: {big}: file too large: 314572800 bytes exceeds the limit of "
                      f"268435456 (max_file_bytes; refused before reading)"], errors
    assert time.perf_counter() - started < 60


def test_the_file_size_limit_is_settable_from_the_cli_and_a_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = EXAMPLES / "chelsea.jpg"
    size = photo.stat().st_size
    assert main(["dream", str(photo), "-o", str(tmp_path / "a"), "--max-file-bytes",
                 str(size - 1), *FAST]) == 1
    assert f"file too large: {size} bytes exceeds the limit of {size - 1}" in \
        capsys.readouterr().err
    config = config_file(tmp_path / "c.yaml", str(photo), tmp_path / "b",
                         max_file_bytes=size - 1)
    assert main(["dream", "--config", str(config), "-q"]) == 1
    assert f"exceeds the limit of {size - 1}" in capsys.readouterr().err
    assert main(["dream", str(photo), "-o", str(tmp_path / "c"), "--max-file-bytes",
                 str(size), *FAST]) == 0
    config = config_file(tmp_path / "d.yaml", str(photo), tmp_path / "d", max_file_bytes=10)
    assert main(["dream", "--config", str(config), "-q"]) == 2
    assert "max_file_bytes: must be at least 1024, got 10" in capsys.readouterr().err
