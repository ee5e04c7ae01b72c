"""``jaxdream run`` against two jobs on one output folder, and the manifest under concurrent
writers (issue 17, items 1 and 6). Real driver processes on a private local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_cluster import (  # noqa: E402
    manifest_rows,
    private_ray_environment,
    run_cli,
    start_cli,
    start_cluster,
    write_config,
    write_images,
)

pytestmark = [pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[Any, dict[str, str]]]:
    with private_ray_environment() as env:
        cluster = start_cluster(worker_nodes=1)
        try:
            yield cluster, env
        finally:
            cluster.shutdown()


def _wait_for_lock(outdir: Path, driver: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not (outdir / ".jaxdream.lock").exists():
        assert driver.poll() is None, "the first job ended before it locked its folder"
        assert time.monotonic() < deadline, "the first job never locked its folder"
        time.sleep(0.01)


@pytest.mark.timeout(600)
def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_keeps_its_manifest(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = ray_cluster
    write_images(tmp_path / "photos", 24, seed=4)
    outdir = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", str(tmp_path / "photos"), outdir,
                          job={"unit_size": 2})
    first = start_cli([str(config), "--address", cluster.address, "-q"], env,
                      stderr=subprocess.PIPE)
    try:
        _wait_for_lock(outdir, first)
        first.send_signal(signal.SIGSTOP)  # it holds the lock, however fast it would finish
        try:
            second = run_cli([str(config), "--address", cluster.address, "-q"], env,
                             timeout=120)
            resumed = run_cli([str(config), "--address", cluster.address, "--resume", "-q"],
                              env, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by jaxdream run (pid {first.pid} on " in lines[0]
        assert resumed.returncode == 2 and "in use by jaxdream run" in resumed.stderr
    finally:
        _, err = first.communicate(timeout=500)
    assert first.returncode == 0, err
    rows = manifest_rows(outdir)
    assert len(rows) == 24 and all(row["status"] == "done" for row in rows)
    assert {row["output"] for row in rows} == {p.name for p in outdir.glob("*_dream.png")}
    # Run again without --resume: the manifest is never replaced with less than it held.
    again = run_cli([str(config), "--address", cluster.address, "-q"], env)
    assert again.returncode == 0, again.stderr
    rows = manifest_rows(outdir)
    assert len({(row["id"], row["output"]) for row in rows}) == 24 and len(rows) == 24


@pytest.mark.timeout(600)
def test_two_runs_started_together_render_once(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = ray_cluster
    write_images(tmp_path / "photos", 6, seed=5)
    outdir = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", str(tmp_path / "photos"), outdir)
    drivers = [subprocess.Popen([sys.executable, "-m", "jaxdream.cli", "run", str(config),
                                 "--address", cluster.address, "-q"],
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(driver.communicate(timeout=500)[1], driver.returncode) for driver in drivers]
    codes = sorted(code for _, code in results)
    assert codes == [0, 2], results
    refused = next(err for err, code in results if code == 2)
    # Started together, the refused one may look before the holder has written its name into
    # the lock: then the message says "another jaxdream job" and names the lock file instead.
    assert ("in use by jaxdream run" in refused
            or ("in use by another jaxdream job" in refused and ".jaxdream.lock" in refused))
    rows = manifest_rows(outdir)
    assert len(rows) == 6 and all(row["status"] == "done" for row in rows)


@pytest.mark.timeout(600)
def test_the_gallery_summary_and_manifest_agree_on_failures(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = ray_cluster
    photos = write_images(tmp_path / "photos", 2, seed=6)
    missing = [str(tmp_path / f"missing_{i:03d}.jpg") for i in range(30)]
    (tmp_path / "empty.png").write_bytes(b"")
    listed = [*map(str, photos), *missing, "/dev/zero", str(tmp_path / "empty.png")]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    outdir = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", str(tmp_path / "list.txt"), outdir)
    result = run_cli([str(config), "--address", cluster.address, "-q"], env)
    assert result.returncode == 1, result.stderr
    failed = len(missing) + 2
    assert f"{failed} failed" in result.stderr, result.stderr
    rows = manifest_rows(outdir)
    assert sum(row["status"] == "failed" for row in rows) == failed
    page = (outdir / "index.html").read_text()
    assert f"<p>2 done, 0 skipped, {failed} failed</p>" in page, page[-3000:]
    for path in listed[2:]:
        assert path in page


# --------------------------------------------------------------------------------------------
# The manifest under concurrent writers: no row is ever lost

_WRITER = r"""
import json, os, random, sys, time
from pathlib import Path
from jaxdream import jobs
from jaxdream.outdir import OutputBusy, acquire

outdir, name, count, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
written = 0
while written < count:
    try:
        lock = acquire(outdir, "writer " + name)
    except OutputBusy:
        time.sleep(rng.random() * 0.003)
        continue
    try:
        writer = jobs.ManifestWriter(outdir / jobs.MANIFEST_NAME, outdir)
        try:
            batch = min(count - written, rng.randint(1, 7))
            rows = []
            for i in range(written, written + batch):
                out = f"{name}_{i:04d}_dream.png"
                (outdir / out).write_bytes(b"x")
                text = "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 300)))
                rows.append({"id": f"{name}-{i}", "input": f"in/{name}/{i}.png", "output": out,
                             "status": "done", "error": text})
            writer.append(rows)
            written += batch
        finally:
            writer.close()
    finally:
        lock.release()
print(written)
"""


@pytest.mark.timeout(300)
def test_concurrent_writers_never_lose_a_manifest_row(tmp_path: Path) -> None:
    """Six processes, each opening the manifest (which compacts it) and appending random
    batches of random rows, while they compete for the folder's lock; a reader polls the file
    meanwhile. Every row ever written must be there at the end, exactly once."""
    from jaxdream import jobs

    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), f"w{k}", "60",
                                 str(k)], stdout=subprocess.PIPE, text=True)
               for k in range(6)]
    seen_max = 0
    while any(w.poll() is None for w in writers):
        rows = jobs.read_manifest(tmp_path / jobs.MANIFEST_NAME)
        assert len(rows) >= seen_max, "the manifest shrank while jobs wrote to it"
        seen_max = len(rows)
        time.sleep(0.01)
    assert [int(w.communicate()[0]) for w in writers] == [60] * 6
    rows = jobs.read_manifest(tmp_path / jobs.MANIFEST_NAME)
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(f"w{k}-{i}" for k in range(6) for i in range(60))
