"""The output-folder lock (issue 17, item 1): real processes, stale locks, symlinks, fallback."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxdream import outdir as outlock
from jaxdream.outdir import LOCK_NAME, OutputBusy, acquire, output_lock

HOLD = r"""
import sys, time
from pathlib import Path
from jaxdream.outdir import acquire
lock = acquire(Path(sys.argv[1]), "jaxdream run")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _holder(folder: Path, seconds: float = 60) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


@pytest.mark.timeout(60)
def test_a_second_process_is_refused_naming_the_holder_then_takes_over_when_it_dies(
        tmp_path: Path) -> None:
    child = _holder(tmp_path)
    try:
        with pytest.raises(OutputBusy) as caught:
            acquire(tmp_path, "jaxdream dream")
        message = str(caught.value)
        assert message.startswith(f"{tmp_path}: in use by jaxdream run (pid {child.pid} on "
                                  f"{socket.gethostname()}, since "), message
        assert "\n" not in message
    finally:
        child.send_signal(signal.SIGKILL)  # dies holding it: no release, the file stays
        child.communicate()
    assert (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path, "jaxdream dream") as lock:
        assert lock.previous is not None and lock.previous["pid"] == child.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.timeout(120)
def test_many_processes_racing_for_one_folder_never_hold_it_together(tmp_path: Path) -> None:
    """Each racer appends 'enter'/'leave' while it believes it holds the lock; the log must
    never show two enters in a row."""
    script = r"""
import os, sys, time
from pathlib import Path
from jaxdream.outdir import OutputBusy, acquire
folder, log = Path(sys.argv[1]), sys.argv[2]
got = 0
deadline = time.monotonic() + 8
while got < 5 and time.monotonic() < deadline:
    try:
        lock = acquire(folder, "racer")
    except OutputBusy:
        time.sleep(0.001)
        continue
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"enter {os.getpid()}\n".encode())
    time.sleep(0.002)
    os.write(fd, f"leave {os.getpid()}\n".encode())
    os.close(fd)
    lock.release()
    got += 1
print(got)
"""
    log = tmp_path / "log.txt"
    racers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(log)],
                               stdout=subprocess.PIPE, text=True) for _ in range(6)]
    counts = [int(racer.communicate(timeout=100)[0]) for racer in racers]
    assert sum(counts) >= 6, counts  # every racer got in at least once, most five times
    lines = log.read_text().splitlines()
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter.startswith("enter") and leave == "leave" + enter[len("enter"):], lines
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_symlinked_lock_file_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OutputBusy, match="symbolic link"):
        acquire(folder, "jaxdream run")
    assert victim.read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_lock_file_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(OutputBusy, match="not a regular file"):
        acquire(tmp_path, "jaxdream run")


def test_without_flock_stale_locks_on_this_host_are_taken_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outlock.fcntl, "flock", no_flock)
    path = tmp_path / LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    here = socket.gethostname()
    path.write_text(json.dumps({"command": "jaxdream run", "pid": dead_pid, "host": here,
                                "started": "yesterday"}))
    with output_lock(tmp_path, "jaxdream dream") as lock:
        assert not lock.flocked and lock.previous is not None
        assert lock.previous["pid"] == dead_pid
        with pytest.raises(OutputBusy, match=rf"in use by jaxdream dream \(pid {os.getpid()} "):
            acquire(tmp_path, "jaxdream run")  # held by a live process: refused
    assert not path.exists()
    path.write_text(json.dumps({"command": "jaxdream run", "pid": dead_pid,
                                "host": "some-other-host", "started": "today"}))
    with pytest.raises(OutputBusy, match="on some-other-host"):
        acquire(tmp_path, "jaxdream dream")  # another host's pid means nothing here
    assert path.exists()


def test_garbage_in_a_lock_file_gives_a_short_readable_message(tmp_path: Path) -> None:
    child = _holder(tmp_path)
    try:
        # overwrite the holder's record with junk (as a hostile user could)
        (tmp_path / LOCK_NAME).write_text(json.dumps({"command": "x\n" * 5000, "pid": "y",
                                                      "host": "\x1b[2J", "started": 1}))
        with pytest.raises(OutputBusy) as caught:
            acquire(tmp_path, "jaxdream dream")
        assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
        assert len(str(caught.value)) < 500
    finally:
        child.kill()
        child.communicate()


def test_release_is_idempotent_and_a_new_holder_can_follow(tmp_path: Path) -> None:
    lock = acquire(tmp_path, "a")
    lock.release()
    lock.release()
    started = time.perf_counter()
    with output_lock(tmp_path, "b"):
        pass
    assert time.perf_counter() - started < 1


# --- claiming a folder: dangerous places, unwritable parents, the job's own outputs ----------

def test_root_and_home_are_refused_unless_forced(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxdream.outdir import claim, refuse_dangerous

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for folder, what in [(Path("/"), "the filesystem root"), (home, "your home folder"),
                         (home / ".." / "home", "your home folder")]:
        with pytest.raises(OutputBusy, match=f"refusing to write into {what}.*--force"):
            claim(folder, "jaxdream dream")
        refuse_dangerous(folder, force=True)  # forced: allowed
    refuse_dangerous(home / "dreams")  # a folder inside home is fine


def unwritable_parent(tmp_path: Path) -> tuple[Path, str]:
    """A folder in which nothing can be created, and the reason the OS gives: a read-only
    folder, or for root (whom permissions do not stop) a folder of /sys."""
    if os.geteuid() == 0 and Path("/sys/kernel").is_dir():
        return Path("/sys/kernel"), "Operation not permitted"
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return parent, "Permission denied"


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    from jaxdream.outdir import claim

    parent, reason = unwritable_parent(tmp_path)
    with pytest.raises(OutputBusy) as caught:
        claim(parent / "jaxdream-test" / "sub", "jaxdream dream")
    assert str(caught.value) == (f"{parent / 'jaxdream-test' / 'sub'}: cannot create the output "
                                 f"folder: {reason}")


def test_a_file_in_the_way_is_one_line(tmp_path: Path) -> None:
    from jaxdream.outdir import claim

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputBusy, match="exists and is not a folder"):
        claim(tmp_path / "f", "jaxdream dream")


def test_leave_out_outputs_keeps_photos_and_drops_dreams_sheets_and_thumbs(
        tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from jaxdream.images import save_png
    from jaxdream.outdir import leave_out_outputs

    pixels = np.zeros((16, 16, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "chelsea.png")
    Image.fromarray(pixels).save(tmp_path / "my_dream.png")  # a photo, despite its name
    save_png(tmp_path / "chelsea_dream.png", pixels, {"model": "x"})
    save_png(tmp_path / "chelsea_grid.png", pixels, {"kind": "contact_sheet"})
    (tmp_path / "thumbs").mkdir()
    Image.fromarray(pixels).save(tmp_path / "thumbs" / "t.jpg")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other"
    elsewhere.mkdir()
    save_png(elsewhere / "old_dream.png", pixels, {"model": "x"})  # not in this output
    paths = [str(tmp_path / name) for name in ("chelsea.png", "my_dream.png",
                                               "chelsea_dream.png", "chelsea_grid.png",
                                               "thumbs/t.jpg")] + [str(elsewhere / "old_dream.png")]
    assert leave_out_outputs(paths, tmp_path) == [paths[0], paths[1], paths[5]]
