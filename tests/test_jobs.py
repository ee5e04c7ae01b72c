"""``jaxdream run`` on a real Ray cluster of three nodes on 127.0.0.1, and the job logic.

The cluster tests start their own cluster (a head without CPUs and two one-CPU worker nodes)
in a private temporary folder, run tiny jobs through it (EfficientNet-Lite0 to ``block0``, one
octave, 96 x 96 noise images), and check the promises of the job runner: a node removed mid-job
costs nothing but a retry, a driver killed mid-job resumes without re-rendering what it
finished, bad inputs are reported and the rest render, the manifest is complete and lists only
outputs that exist.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from jaxdream import jobs
from jaxdream.config import JobSettings, load_config
from jaxdream.files import display
from jaxdream.recipe import Recipe
from jaxdream.render import Outcome, WorkItem

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_images import make_corpus  # noqa: E402
from ray_cluster import (  # noqa: E402
    TINY_DREAM,
    add_worker_node,
    manifest_rows,
    private_ray_environment,
    run_cli,
    start_cli,
    start_cluster,
    write_config,
    write_images,
)

pytestmark = [
    # Adding a Ray node from this process starts its processes through subprocess with a
    # preexec function, which runs Python's at-fork hooks, and JAX's hook warns once JAX runs
    # threads here (planning a job starts it). The child execs Ray's binaries at once, so the
    # deadlock the warning is about cannot happen.
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
]


# --------------------------------------------------------------------------------------------
# Job logic, no cluster


def _item(name: str, *, layers: str = "block0", steps: int = 1, size: int = 0,
          outdir: Path = Path("/out")) -> WorkItem:
    recipe = Recipe(layers=((layers, 1.0),), steps=steps, octaves=1, max_side=64 + size)
    return WorkItem(id=f"id-{name}", input=f"in/{name}.png", output=outdir / f"{name}_dream.png",
                    recipe=recipe, point={})


def test_units_never_mix_static_settings_and_keep_folder_order() -> None:
    items = [_item("b"), _item("x", steps=2), _item("a"), _item("c"), _item("y", steps=2)]
    units = jobs.make_units(items, unit_size=2)
    assert [[item.input for item in unit.items] for unit in units] == [
        ["in/a.png", "in/b.png"], ["in/c.png"], ["in/x.png", "in/y.png"]]
    assert [unit.index for unit in units] == [0, 1, 2]
    with pytest.raises(ValueError):
        jobs.make_units(items, unit_size=0)


def test_worker_plan_follows_the_hardware() -> None:
    cpu_node = {"CPU": 8.0}
    plan = jobs.plan_workers(JobSettings(), {"CPU": 16.0}, [cpu_node, cpu_node, {"CPU": 0.0}],
                             units=100)
    assert (plan.count, plan.platform, plan.num_cpus, plan.num_gpus) == (2, "cpu", 1, 0)
    plan = jobs.plan_workers(JobSettings(workers=6, cpus_per_worker=2), {"CPU": 16.0},
                             [cpu_node, cpu_node], units=100)
    assert (plan.count, plan.num_cpus) == (6, 2)
    assert jobs.plan_workers(JobSettings(workers=8), {"CPU": 16.0}, [], units=3).count == 3
    gpu = jobs.plan_workers(JobSettings(), {"CPU": 32.0, "GPU": 4.0}, [], units=100)
    assert (gpu.count, gpu.platform, gpu.num_gpus) == (4, "cuda", 1.0)
    shared = jobs.plan_workers(JobSettings(gpus_per_worker=0.5), {"GPU": 4.0}, [], units=100)
    assert (shared.count, shared.num_gpus) == (8, 0.5)
    tpu_host = {"CPU": 96.0, "TPU": 4.0}
    tpu = jobs.plan_workers(JobSettings(), {"CPU": 192.0, "TPU": 8.0}, [tpu_host, tpu_host],
                            units=100)
    assert (tpu.count, tpu.platform, dict(tpu.resources)) == (2, "tpu", {"TPU": 4.0})
    env = jobs.worker_env("cuda")
    assert env["JAX_PLATFORMS"] == "cuda" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


@pytest.mark.parametrize("name", ["JAXDREAM_COMPILE_AHEAD", "JAXDREAM_TILE_WORKERS"])
def test_workers_use_threads_for_their_own_cpus(name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(name, raising=False)
    assert jobs.worker_env("cpu", 1.0)[name] == "1"
    assert jobs.worker_env("cpu", 2.0)[name] == "2"
    assert jobs.worker_env("cpu", 64.0)[name] == "4"
    monkeypatch.setenv(name, "0")  # the user's choice travels
    assert jobs.worker_env("cpu", 8.0)[name] == "0"


def test_manifest_reading_survives_a_torn_line_and_keeps_the_last_row(tmp_path: Path) -> None:
    (tmp_path / "a_dream.png").write_bytes(b"png")
    (tmp_path / "b_dream.png").write_bytes(b"png")
    manifest = tmp_path / jobs.MANIFEST_NAME
    manifest.write_text(
        '{"id": "1", "output": "a_dream.png", "status": "done"}\n'
        '{"id": "2", "output": "b_dream.png", "status": "done"}\n'
        '{"id": "3", "output": "gone_dream.png", "status": "done"}\n'
        '{"id": "1", "output": "a_dream.png", "status": "failed"}\n'
        '{"id": "4", "output": null, "status": "failed"}\n'
        '["not", "a", "row"]\n'
        '{"id": "2", "output": "c_dream.png", "sta', encoding="utf-8")
    rows = jobs.read_manifest(manifest)
    assert [row["id"] for row in rows] == ["1", "2", "3", "1", "4"]
    # 1: its last row failed; 3: its output is gone; 4: failed rows finish nothing.
    assert list(jobs.finished_rows(rows, tmp_path)) == [("2", "b_dream.png")]
    assert jobs.read_manifest(tmp_path / "missing.jsonl") == []


def test_temporaries_of_interrupted_writes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    keep = ["a_dream.png", ".a_dream.png.notours.tmp", ".other.png.0123456789ab.tmp", "x.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".a_dream.png.0123456789ab.tmp").write_bytes(b"partial")
    assert jobs.clean_temporaries([tmp_path / "a_dream.png", tmp_path / "b_dream.png"]) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_one_line_escapes_control_characters() -> None:
    assert display("bad\nname\x1b[31m.png: text") == "bad\\nname\\x1b[31m.png: text"


def test_a_full_output_disk_stops_the_job_and_leaves_it_resumable(tmp_path: Path) -> None:
    """A worker that reports ENOSPC stops dispatching: everything later would fail the same
    way, and what is left is exactly what --resume renders."""
    items = [_item(name, outdir=tmp_path) for name in "abcd"]
    (tmp_path / "a_dream.png").write_bytes(b"png")
    writer = jobs.ManifestWriter(tmp_path / jobs.MANIFEST_NAME, tmp_path)
    summary = jobs.JobSummary()
    config: Any = dataclasses.make_dataclass("C", ["job", "output"])(JobSettings(unit_size=2),
                                                                     tmp_path)
    lines: list[str] = []
    driver = jobs.Scheduler(config, items, writer, summary, say=lines.append, progress=False,
                          on_rows=None, worker_wait_s=1)
    unit = driver.queue.popleft()
    full = f"{tmp_path}/b_dream.png: cannot write: {os.strerror(errno.ENOSPC)}"
    driver._record(unit, [Outcome("in/a.png", tmp_path / "a_dream.png", "done", id="id-a"),
                          Outcome("in/b.png", None, "failed", full, id="id-b")], "w", 1)
    writer.close()
    assert "disk is full" in summary.stopped and "--resume" in summary.stopped
    assert (summary.done, summary.failed) == (1, 1)
    assert len(driver.queue) == 1  # the unit of c and d: never sent, left for --resume
    rows = manifest_rows(tmp_path)
    assert [(row["input"], row["status"]) for row in rows] == [("in/a.png", "done"),
                                                                ("in/b.png", "failed")]
    assert any("No space left on device" in line for line in lines)


def test_a_job_whose_workers_all_died_stops_and_leaves_the_rest_to_resume(
        tmp_path: Path) -> None:
    items = [_item(name, outdir=tmp_path) for name in "abc"]
    writer = jobs.ManifestWriter(tmp_path / jobs.MANIFEST_NAME, tmp_path)
    summary = jobs.JobSummary()
    config: Any = dataclasses.make_dataclass("C", ["job", "output"])(JobSettings(), tmp_path)
    driver = jobs.Scheduler(config, items, writer, summary, say=print, progress=False,
                          on_rows=None, worker_wait_s=3600)
    driver.pool.workers = [jobs.Worker(handle=None, state="ready"), jobs.Worker(handle=None)]
    driver._check_workers()
    assert not summary.stopped
    driver.pool.workers[0].state = driver.pool.workers[1].state = "dead"
    driver.pool.last_death = "ActorDiedError: out of memory"
    driver._check_workers()
    writer.close()
    assert summary.stopped == "no worker left (last: ActorDiedError: out of memory)"
    assert summary.exit_status == 1 and manifest_rows(tmp_path) == []


# --------------------------------------------------------------------------------------------
# On a real cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[Any, dict[str, str]]]:
    """Three nodes on 127.0.0.1: a head without CPUs and two one-CPU worker nodes."""
    with private_ray_environment() as env:
        cluster = start_cluster(worker_nodes=2)
        try:
            yield cluster, env
        finally:
            cluster.shutdown()


def _final_rows(outdir: Path) -> dict[tuple[str, str | None], list[dict[str, Any]]]:
    by_item: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for row in manifest_rows(outdir):
        by_item.setdefault((row["id"], row["output"] or row["input"]), []).append(row)
    return by_item


def _assert_complete(config_path: Path, outdir: Path) -> list[dict[str, Any]]:
    """Every planned item has exactly one row, done, and its output is a whole PNG; the
    folder holds nothing else but the manifest (no partial file, no temporary)."""
    from jaxdream.render import plan_items

    items, unreadable = plan_items(load_config(config_path))
    assert not unreadable
    rows = manifest_rows(outdir)
    keys = [(row["id"], row["output"]) for row in rows]
    assert sorted(keys) == sorted(jobs.item_key(item, outdir) for item in items)
    assert all(row["status"] == "done" and row["error"] == "" for row in rows)
    for row in rows:
        with Image.open(outdir / row["output"]) as image:
            image.load()  # raises on a truncated file
            assert image.size == (96, 96) and "jaxdream" in image.text
    # Nothing else: no temporaries, no partial files; the gallery and its thumbnails.
    assert sorted(os.listdir(outdir)) == sorted([jobs.MANIFEST_NAME, "index.html", "thumbs",
                                                 *(row["output"] for row in rows)])
    page = (outdir / "index.html").read_text()
    assert all(row["output"] in page for row in rows)
    return rows


def test_a_node_removed_mid_job_costs_a_retry_not_an_item(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = ray_cluster
    write_images(tmp_path / "photos", 36)
    outdir = tmp_path / "out"
    # Ten times the tiny dream's steps keep each worker's next unit running while the driver
    # handles the one that came back: with 20 steps it was once already back (its result
    # inlined to the driver, so nothing was lost and nothing retried).
    config_path = write_config(tmp_path / "job.yaml", str(tmp_path / "photos"), outdir,
                               dream={**TINY_DREAM, "steps": 200})
    config = load_config(config_path)
    removed: list[str] = []
    workers = {node.node_id: node for node in cluster.worker_nodes}

    def pull_node(rows: list[dict[str, Any]]) -> None:
        # The node that just returned a unit has its next unit in flight: pull it now.
        if not removed and rows[0]["node"] in workers:
            removed.append(rows[0]["node"])
            cluster.remove_node(workers[rows[0]["node"]], allow_graceful=False)

    try:
        summary = jobs.run_job(config, address=cluster.address, progress=False,
                               on_rows=pull_node)
    finally:
        if removed:  # give the module's cluster its second worker node back
            add_worker_node(cluster)
            cluster.wait_for_nodes()
    assert removed, "no node was removed: the job finished before a unit came back?"
    assert summary.retried_units >= 1
    assert (summary.done, summary.failed, summary.not_run, summary.exit_status) == (36, 0, 0, 0)
    _assert_complete(config_path, outdir)


def test_a_killed_driver_resumes_without_rendering_again(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = ray_cluster
    write_images(tmp_path / "photos", 40, seed=1)
    outdir = tmp_path / "out"
    config_path = write_config(tmp_path / "job.yaml", str(tmp_path / "photos"), outdir,
                               job={"unit_size": 2})
    driver = start_cli([str(config_path), "--address", cluster.address, "-q"], env)
    try:
        deadline = time.monotonic() + 120
        while len(manifest_rows(outdir)) < 4 and driver.poll() is None:
            assert time.monotonic() < deadline, "the first driver recorded nothing in 120 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    before = [row for row in manifest_rows(outdir) if row["status"] == "done"]
    assert 4 <= len(before) < 40, "the driver was not killed mid-job"
    stats = {row["output"]: (outdir / row["output"]).stat() for row in before}

    resumed = run_cli([str(config_path), "--address", cluster.address, "--resume", "-q"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(before)} of 40 item(s) already done" in resumed.stderr
    for output, stat in stats.items():  # not rendered again: same file, same inode
        now = (outdir / output).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), output
    rows = _assert_complete(config_path, outdir)
    assert [row for row in rows if row["output"] in stats] == before


def test_bad_inputs_and_a_crashing_unit_are_recorded_and_the_rest_render(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, env = ray_cluster
    photos = tmp_path / "photos"
    write_images(photos, 5, seed=2)
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.jpg").write_text("not an image")
    (photos / "photo_000_copy.png").write_bytes((photos / "photo_000.png").read_bytes())
    outdir = tmp_path / "out"
    config = load_config(write_config(tmp_path / "job.yaml", str(photos), outdir,
                                      job={"unit_size": 2}))

    # One item whose recipe names a layer the model lacks: the worker's engine raises, which
    # is a bug in the caller, and must cost that unit's items only.
    import jaxdream.planning

    real_plan = jaxdream.planning.plan_stream

    def plan_with_a_broken_item(config: Any) -> Iterator[WorkItem | Outcome]:
        for item in real_plan(config):
            if isinstance(item, WorkItem) and item.input.endswith("photo_001.png"):
                broken = dataclasses.replace(item.recipe, layers=(("no_such_layer", 1.0),))
                item = dataclasses.replace(item, recipe=broken)
            yield item

    monkeypatch.setattr(jaxdream.planning, "plan_stream", plan_with_a_broken_item)
    lines: list[str] = []
    summary = jobs.run_job(config, address=cluster.address, progress=False, say=lines.append)
    assert (summary.planned, summary.done, summary.failed, summary.exit_status) == (8, 5, 3, 1)
    rows = {row["input"]: row for row in manifest_rows(outdir)}
    assert len(rows) == 8
    assert "empty" in rows[str(photos / "empty.png")]["error"]
    assert "not an image" in rows[str(photos / "text.jpg")]["error"]
    broken_row = rows[str(photos / "photo_001.png")]
    assert broken_row["status"] == "failed" and broken_row["attempt"] == 1  # not retried
    assert "worker error" in broken_row["error"] and "no_such_layer" in broken_row["error"]
    # The copy has the same content (same id) as photo_000 and still gets its own output.
    assert rows[str(photos / "photo_000_copy.png")]["status"] == "done"
    for row in rows.values():
        assert (row["status"] == "done") == (row["output"] is not None)
        if row["output"]:
            assert (outdir / row["output"]).is_file()
        else:
            assert "\n" not in row["error"] and row["error"].startswith(row["input"])
    assert sum(line.startswith("error: ") for line in lines) == 3


def test_an_unwritable_manifest_stops_the_job_with_a_clear_error_and_resume_finishes(
        ray_cluster: tuple[Any, dict[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, env = ray_cluster
    write_images(tmp_path / "photos", 8, seed=3)
    outdir = tmp_path / "out"
    config_path = write_config(tmp_path / "job.yaml", str(tmp_path / "photos"), outdir,
                               job={"unit_size": 2})
    config = load_config(config_path)
    real_append = jobs.ManifestWriter.append
    calls = []

    def full_disk(data: bytes) -> None:
        """The manifest's writes once the disk is full: every one fails with ENOSPC."""
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def disk_fills_up(self: jobs.ManifestWriter, rows: Any) -> None:
        if rows:
            calls.append(len(rows))
            if len(calls) == 2:
                self._write = full_disk  # type: ignore[method-assign]
        real_append(self, rows)

    monkeypatch.setattr(jobs.ManifestWriter, "append", disk_fills_up)
    with pytest.raises(jobs.JobError, match="cannot write the manifest: No space left on "
                                            "device; .* rerun with --resume"):
        jobs.run_job(config, address=cluster.address, progress=False)
    monkeypatch.undo()
    assert len(manifest_rows(outdir)) == 2  # the first unit only
    summary = jobs.run_job(config, address=cluster.address, progress=False, resume=True)
    assert (summary.already_done, summary.done, summary.exit_status) == (2, 6, 0)
    _assert_complete(config_path, outdir)


def test_hostile_corpus_through_a_private_local_ray(tmp_path: Path) -> None:
    """No address: the job starts its own Ray on this machine. Every good file renders, every
    bad one is a failed row with a one-line reason and an ``error:`` line, exit status 1."""
    corpus = tmp_path / "corpus"
    cases = make_corpus(corpus)
    special = [case for case in cases if not (case.path.is_file() and not case.path.is_symlink())
               or "\n" in case.path.name]
    listing = tmp_path / "special.txt"
    listing.write_text("".join(f"{case.path}\n" for case in special if "\n" not in
                               case.path.name), encoding="utf-8")
    outdir = tmp_path / "out"
    config_path = write_config(tmp_path / "job.yaml", [str(corpus), str(listing)], outdir,
                               dream={"layers": "stem", "octaves": 1, "steps": 1, "jitter": 0},
                               max_side=512, job={"unit_size": 8})
    with private_ray_environment() as env:
        result = run_cli([str(config_path), "-q"], env, timeout=180)
    assert result.returncode == 1, result.stderr
    rows = {row["input"]: row for row in manifest_rows(outdir)}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for case in cases:
        row = rows.get(str(case.path))
        assert row is not None, f"{case.path.name!a} has no manifest row"
        if case.should_load:
            assert row["status"] == "done", (case.description, row["error"])
            with Image.open(outdir / row["output"]) as image:
                assert image.size == case.expected_shape[::-1], case.description
        else:
            assert row["status"] == "failed" and row["output"] is None, case.description
            assert row["error"] and "\n" not in row["error"], case.description
            assert sum(display(row["error"]) in line for line in errors) == 1, (
                case.description)
    assert len(errors) == sum(not case.should_load for case in cases)
    pngs = [name for name in os.listdir(outdir) if name.endswith(".png")]
    assert len(pngs) == sum(case.should_load for case in cases)
    assert any(line.startswith("dreamed ") for line in result.stderr.splitlines())
