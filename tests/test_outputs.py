"""Outputs for very large jobs: tar shards (``output_shards``), the Parquet column key
(``image_column``), and the lock on a bucket prefix.

The S3 tests use the moto server on 127.0.0.1 that ``test_storage`` starts (its ``s3``
fixture, imported here); Ray jobs run on a private Ray instance or CLI process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_cluster import (manifest_rows, private_ray_environment, run_cli,  # noqa: E402
                         write_config, write_images)
from test_storage import (BUCKET, _client, _keys, _manifest, _photos,  # noqa: E402, F401
                          _png, _put, _refused, s3, s3_cluster)

from jaxdream.errors import ConfigError  # noqa: E402
from jaxdream.inputs import expand_inputs  # noqa: E402
from jaxdream.jobs.tarout import build_tar, render_unit, sample_key  # noqa: E402
from jaxdream.outdir import LOCK_NAME, OutputBusy, acquire_prefix  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

QUICK = {"layers": "stem", "octaves": 1, "steps": 1, "jitter": 0}


# --------------------------------------------------------------------------------------------
# Tar shards: the bytes


def test_shard_bytes_are_deterministic_sorted_and_indexed_by_offset() -> None:
    long_name = "x" * 140 + "_dream.png"  # beyond ustar's 100 characters: a PAX header
    members = [("b_dream.png", b"\x89PNG b"), (long_name, b"L" * 700), ("a_dream.png", b"A")]
    data, where = build_tar(members)
    assert build_tar(list(reversed(members)))[0] == data  # order given does not matter
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [info.name for info in infos] == sorted(name for name, _ in members)
    for info in infos:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
            0, 0, 0, "", "", 0o644)
    for name, body in members:
        offset, size = where[name]
        assert data[offset:offset + size] == body
    assert sample_key("photo.v2_dream.png") == "photo_v2_dream"


def test_a_unit_rendered_twice_writes_one_shard_name_with_the_same_bytes(tmp_path: Path) -> None:
    """What a retried unit does: the same items give the same shard, byte for byte; each
    done item knows its member and offset, a bad input fails alone and is not in the tar."""
    from jaxdream.config import load_config
    from jaxdream.render import plan_items, render_items

    write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"<html>no</html>")
    config = load_config(write_config(tmp_path / "job.yaml", str(tmp_path / "in"),
                                      tmp_path / "out", dream=QUICK, job={"unit_size": 4}))
    items, _ = plan_items(config)
    assert len(items) == 4

    def run(sink: Any) -> list[Any]:
        return render_items(items, overwrite=True, report=lambda line: None,
                            sink=sink).outcomes

    first = render_unit(items, str(tmp_path / "a"), run)
    second = render_unit(items, str(tmp_path / "b"), run)
    (name_a,) = os.listdir(tmp_path / "a" / "shards")
    (name_b,) = os.listdir(tmp_path / "b" / "shards")
    data = (tmp_path / "a" / "shards" / name_a).read_bytes()
    assert name_a == name_b and data == (tmp_path / "b" / "shards" / name_b).read_bytes()
    assert name_a == hashlib.sha256(data).hexdigest()[:32] + ".tar"
    assert [o.shard for o in first] == [o.shard for o in second]
    assert not (tmp_path / "out").exists()  # nothing loose was written
    done = [o for o in first if o.status == "done"]
    assert len(done) == 3 and [o.status for o in first].count("failed") == 1
    for outcome in done:
        where = outcome.shard
        png = data[where["offset"]:where["offset"] + where["size"]]
        with Image.open(io.BytesIO(png)) as image:
            assert json.loads(image.text["jaxdream"])["id"] == outcome.id
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert len(names) == 6 and not any("broken" in name for name in names)  # png + json each


def test_a_shard_that_cannot_be_written_fails_its_items_and_writes_nothing_partial(
        tmp_path: Path) -> None:
    from jaxdream.recipe import Recipe
    from jaxdream.render import Outcome, WorkItem

    items = [WorkItem(id=f"id{n}", input=f"in/{n}.jpg", output=tmp_path / f"{n}_dream.png",
                      recipe=Recipe()) for n in range(3)]

    def run(sink: Any) -> list[Any]:
        outcomes = []
        for item in items:
            if item.id == "id1":
                outcomes.append(Outcome(item.input, None, "failed", "in/1.jpg: bad", item.id))
            else:
                sink(item, b"png of " + item.id.encode())
                outcomes.append(Outcome(item.input, item.output, "done", "", item.id))
        return outcomes

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "shards").write_text("a file where the folder goes")
    outcomes = render_unit(items, str(tmp_path / "base"), run)
    assert [o.status for o in outcomes] == ["failed"] * 3
    assert outcomes[1].reason == "in/1.jpg: bad"
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.reason.startswith(f"{outcome.input}: ") and outcome.output is None
        assert "cannot write" in outcome.reason and outcome.shard is None
    assert os.listdir(tmp_path / "base") == ["shards"]
    good = render_unit(items, str(tmp_path / "good"), run)
    assert [o.shard is not None for o in good] == [True, False, True]


# --------------------------------------------------------------------------------------------
# Tar shards: the config key


def test_output_shards_and_image_column_are_checked_like_other_keys(tmp_path: Path) -> None:
    import yaml

    from jaxdream.config import load_config

    def config(**keys: Any) -> Any:
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"inputs": "in/", "output": "out", **keys}),
                        encoding="utf-8")
        return load_config(path)

    assert config().output_shards is None and config().job.unit_size == 8
    sharded = config(output_shards=500)
    assert sharded.output_shards == 500 and sharded.job.unit_size == 500
    assert config(output_shards=4, job={"unit_size": 4}).job.unit_size == 4
    for value, message in ((0, "output_shards: must be 1 to 100000"),
                           ("many", "output_shards: expected an integer, got 'many'"),
                           (True, "output_shards: expected an integer")):
        with pytest.raises(ConfigError, match=f"job.yaml: {message}"):
            config(output_shards=value)
    with pytest.raises(ConfigError, match="job.yaml: job.unit_size: is 8 but output_shards "
                                          "is 16; each unit of work is one shard"):
        config(output_shards=16, job={"unit_size": 8})
    with pytest.raises(ConfigError, match="job.yaml: output_shards: applies to still images"):
        config(output_shards=16, animate={"frames": 4})
    with pytest.raises(ConfigError, match="job.yaml: output_shardz: unknown key; did you "
                                          "mean 'output_shards'"):
        config(output_shardz=16)
    assert config(image_column="pixels").image_column == "pixels"
    with pytest.raises(ConfigError, match="job.yaml: image_column: expected text, got 3"):
        config(image_column=3)


def test_the_in_process_renderer_refuses_output_shards(tmp_path: Path) -> None:
    from jaxdream.config import load_config
    from jaxdream.render import dream_config

    write_images(tmp_path / "in", 1)
    config = load_config(write_config(tmp_path / "job.yaml", str(tmp_path / "in"),
                                      tmp_path / "out", job={"unit_size": 2}))
    config = dataclasses.replace(config, output_shards=2)
    with pytest.raises(ConfigError, match="output_shards: .*jaxdream run"):
        dream_config(config)


# --------------------------------------------------------------------------------------------
# Tar shards: whole jobs, a folder and a bucket


def _shard_members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def _check_sharded(rows: list[dict[str, Any]], read: Any, done: int, per_shard: int) -> None:
    """Each done item once, in the shard its row names, at its offset; no shard bigger than
    ``per_shard`` images; every PNG whole."""
    done_rows = [row for row in rows if row["status"] == "done"]
    assert len(done_rows) == done and len({(r["id"], r["output"]) for r in done_rows}) == done
    shards: dict[str, bytes] = {}
    for row in done_rows:
        data = shards.setdefault(row["shard"], read(row["shard"]))
        png = data[row["offset"]:row["offset"] + row["size"]]
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert json.loads(image.text["jaxdream"])["id"] == row["id"]
        assert row["member"] == sample_key(row["output"]) + ".png"
    pngs = [name for data in shards.values() for name in _shard_members(data)
            if name.endswith(".png")]
    assert sorted(pngs) == sorted(row["member"] for row in done_rows)  # each exactly once
    assert all(sum(n.endswith(".png") for n in _shard_members(d)) <= per_shard
               for d in shards.values())


def test_a_sharded_job_into_a_folder_resumes_and_reads_back_as_input(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"<html>no</html>")
    outdir = tmp_path / "out"
    config = write_config(tmp_path / "job.yaml", str(tmp_path / "in"), outdir, dream=QUICK,
                          job={"unit_size": 2})
    text = config.read_text(encoding="utf-8") + "output_shards: 2\n"
    config.write_text(text, encoding="utf-8")
    with private_ray_environment() as env:
        first = run_cli([str(config), "-q"], env, timeout=240)
        assert first.returncode == 1, first.stderr  # the broken input fails alone
        rows = manifest_rows(outdir)
        _check_sharded(rows, lambda name: (outdir / name).read_bytes(), done=5, per_shard=2)
        assert not [name for name in os.listdir(outdir) if name.endswith(".png")]  # no loose
        index = json.loads((outdir / "shards" / "index.json").read_text(encoding="utf-8"))
        assert index["__kind__"] == "wids-shard-index-v1"
        assert sum(shard["nsamples"] for shard in index["shardlist"]) == 5
        page = (outdir / "index.html").read_text(encoding="utf-8")
        assert "5 outputs in" in page and "broken.png" in page
        before = {name: (outdir / "shards" / name).read_bytes()
                  for name in os.listdir(outdir / "shards")}
        # Leftovers of a killed driver: a copy of a shard that no row names, a temporary of
        # a torn write. A shard no row names holding anything else is not a copy: it stays.
        (outdir / "shards" / ("0" * 32 + ".tar")).write_bytes(
            before[index["shardlist"][0]["url"]])
        (outdir / "shards" / ".x.tar.1234.tmp").write_bytes(b"torn")
        other = build_tar([("someone_else.png", b"png")])[0]
        (outdir / "shards" / ("f" * 32 + ".tar")).write_bytes(other)
        again = run_cli([str(config), "-q", "--resume"], env, timeout=240)
    assert "resuming: 5 of 6 item(s) already done" in again.stderr, again.stderr
    assert {name: (outdir / "shards" / name).read_bytes()
            for name in os.listdir(outdir / "shards")} == {**before, "f" * 32 + ".tar": other}
    assert len(manifest_rows(outdir)) == 6
    # The output is a dataset: its shards are jaxdream inputs, one per dream, and the
    # reference WebDataset reader sees one sample per dream: its PNG and its JSON.
    tars = sorted(str(outdir / "shards" / name) for name in before if name.endswith(".tar"))
    found = expand_inputs(tars)
    done = {row["member"]: row for row in rows if row["status"] == "done"}
    assert sorted(entry.rsplit("#", 1)[1] for entry in found) == sorted(done)
    tariterators = pytest.importorskip("webdataset.tariterators")
    samples = []
    for tar in tars:  # its own parsing and grouping by key (wds.WebDataset leaves files open)
        with open(tar, "rb") as stream:
            files = ({**file, "__url__": tar} for file in tariterators.tar_file_iterator(stream))
            samples += list(tariterators.group_by_keys(files))
    assert sorted(sample["__key__"] + ".png" for sample in samples) == sorted(done)
    for sample in samples:
        row = done[sample["__key__"] + ".png"]
        assert json.loads(sample["json"])["id"] == row["id"]
        data = (outdir / row["shard"]).read_bytes()
        assert sample["png"] == data[row["offset"]:row["offset"] + row["size"]]


def test_a_sharded_job_from_a_bucket_to_a_bucket(s3: dict[str, str], tmp_path: Path) -> None:
    for index in range(5):
        _put(f"tj/in/p{index}.png", _png(60 + index))
    config = write_config(tmp_path / "job.yaml", "s3://photos/tj/in/",
                          "s3://photos/tj/out", dream=QUICK,  # type: ignore[arg-type]
                          job={"unit_size": 3})
    config.write_text(config.read_text(encoding="utf-8") + "output_shards: 3\n",
                      encoding="utf-8")
    with private_ray_environment() as env:
        first = run_cli([str(config), "-q"], {**env, **s3}, timeout=300)
        assert first.returncode == 0, first.stderr
        keys = _keys("tj/out/")
        rows = _manifest("tj/out/manifest.jsonl")

        def read(name: str) -> bytes:
            return _client().get_object(Bucket=BUCKET, Key=f"tj/out/{name}")["Body"].read()

        _check_sharded(rows, read, done=5, per_shard=3)
        shards = sorted({row["shard"] for row in rows})
        assert keys == sorted(["tj/out/manifest.jsonl", "tj/out/shards/index.json",
                               "tj/out/index.html",
                               *(f"tj/out/{name}" for name in shards)])  # no lock, no parts
        etags = {key: _client().head_object(Bucket=BUCKET, Key=key)["ETag"] for key in keys}
        _put("tj/out/shards/" + "0" * 32 + ".tar", read(shards[0]))  # a killed run's copy
        again = run_cli([str(config), "-q", "--resume"], {**env, **s3}, timeout=300)
    assert again.returncode == 0 and "dreamed 0 of 5" in again.stderr, again.stderr
    assert _keys("tj/out/") == keys  # the copy went, nothing else did
    assert {key: _client().head_object(Bucket=BUCKET, Key=key)["ETag"] for key in keys
            if "shards/" in key and key.endswith(".tar")} == {
        key: etag for key, etag in etags.items() if key.endswith(".tar")}
    found = expand_inputs([f"s3://photos/tj/out/{name}" for name in shards])
    assert len(found) == 5


def test_a_killed_driver_of_a_sharded_bucket_job_resumes_each_item_into_one_shard(
        s3_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    """On the 3-node cluster: the driver SIGKILLed mid-job leaves its lock and manifest parts;
    --resume on this host takes the lock over (its holder is gone), renders the rest, and
    leaves every item in exactly one shard, one row each, the lock and parts gone."""
    from test_storage import kill_driver_mid_job

    cluster, env = s3_cluster
    _photos("tk/in", 16, seed=7)
    config = write_config(tmp_path / "job.yaml", "s3://photos/tk/in/", "s3://photos/tk/out",
                          job={"unit_size": 2})  # type: ignore[arg-type]
    config.write_text(config.read_text(encoding="utf-8") + "output_shards: 2\n",
                      encoding="utf-8")
    kill_driver_mid_job(config, cluster.address, env, "tk/out")
    assert f"tk/out/{LOCK_NAME}" in _keys("tk/out/"), "the killed driver's lock is gone"
    assert "tk/out/manifest.jsonl" not in _keys("tk/out/"), "it finished before the kill"

    resumed = run_cli([str(config), "--address", cluster.address, "--resume", "-q"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "took over the lock" in resumed.stderr, resumed.stderr
    rows = _manifest("tk/out/manifest.jsonl")

    def read(name: str) -> bytes:
        return _client().get_object(Bucket=BUCKET, Key=f"tk/out/{name}")["Body"].read()

    _check_sharded(rows, read, done=16, per_shard=2)
    assert len(rows) == 16
    assert _keys("tk/out/") == sorted(["tk/out/manifest.jsonl", "tk/out/shards/index.json",
                                       "tk/out/index.html",
                                       *(f"tk/out/{name}" for name in
                                         {row["shard"] for row in rows})])


# --------------------------------------------------------------------------------------------
# Parquet: the column named in the config


def test_image_column_picks_the_column_and_names_file_and_column_when_wrong(
        s3: dict[str, str], tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from jaxdream.config import load_config
    from jaxdream.render import plan_items

    table = pa.table({"image": [{"bytes": _png(70), "path": "a.png"}],
                      "pixels": [_png(71)], "where": ["s3://photos/pq/listed.png"],
                      "label": [3]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _put("pq/data.parquet", buffer.getvalue())
    url = "s3://photos/pq/data.parquet"
    from jaxdream import storage

    rows = expand_inputs([url], image_column="pixels")
    assert rows == [f"{url}#0000000.row"]
    assert json.loads(storage.known_identity(rows[0]) or "{}")["column"] == "pixels"
    assert expand_inputs([url], image_column="where") == ["s3://photos/pq/listed.png"]
    with pytest.raises(ConfigError, match=r"inputs\[0\]: .*s3://photos/pq/data.parquet has no "
                                          r"column 'pixel' \(image_column; columns: image, "
                                          r"pixels, where, label\)"):
        expand_inputs([url], source="inputs", image_column="pixel")
    with pytest.raises(ConfigError, match=r"data.parquet: column 'label' \(image_column\) "
                                          r"holds int64, not image bytes"):
        expand_inputs([url], source="inputs", image_column="label")
    # Through a config: the key reaches planning, and the worker reads that column.
    path = write_config(tmp_path / "job.yaml", [url], tmp_path / "out", dream=QUICK)
    path.write_text(path.read_text(encoding="utf-8") + "image_column: pixels\n",
                    encoding="utf-8")
    items, failures = plan_items(load_config(path))
    assert not failures and len(items) == 1
    from jaxdream.render import _load

    assert _load(items[0])[1] == hashlib.sha256(_png(71)).hexdigest()


# --------------------------------------------------------------------------------------------
# The lock on a bucket prefix


def test_a_prefix_lock_is_create_only_names_its_holder_and_goes_at_release(
        s3: dict[str, str]) -> None:
    prefix = "s3://photos/lk/a"
    key = f"lk/a/{LOCK_NAME}"
    with acquire_prefix(prefix, "jaxdream run") as lock:
        held = json.loads(_client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(OutputBusy) as refused:
            acquire_prefix(prefix, "jaxdream run")
        line = str(refused.value)
        assert line.startswith(f"{prefix}: in use by jaxdream run (pid {os.getpid()} on ")
        assert f"delete {prefix}/{LOCK_NAME}" in line and "\n" not in line
        assert lock.previous is None
    assert _keys("lk/a/") == []
    acquire_prefix(prefix, "jaxdream run").release()  # free again


def test_two_drivers_racing_for_a_prefix_get_one_lock(s3: dict[str, str]) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def race() -> None:
        barrier.wait()
        try:
            results.append(acquire_prefix("s3://photos/lk/race", "jaxdream run"))
        except OutputBusy as error:
            results.append(error)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [result for result in results if not isinstance(result, OutputBusy)]
    assert len(held) == 1 and len(results) == 4
    held[0].release()


def test_a_stale_prefix_lock_is_taken_over_here_and_forced_from_elsewhere(
        s3: dict[str, str], tmp_path: Path) -> None:
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    key = f"lk/b/{LOCK_NAME}"
    stale = {"command": "jaxdream run", "pid": int(dead.stdout), "host": socket.gethostname(),
             "started": "2026-01-01T00:00:00+00:00", "token": "old"}
    _put(key, json.dumps(stale).encode())
    lock = acquire_prefix("s3://photos/lk/b", "jaxdream run")
    assert lock.previous is not None and lock.previous["pid"] == int(dead.stdout)
    lock.release()

    elsewhere = {**stale, "host": "node-7.example", "pid": 1}
    _put(key, json.dumps(elsewhere).encode())
    with pytest.raises(OutputBusy, match=r"in use by jaxdream run \(pid 1 on node-7.example"):
        acquire_prefix("s3://photos/lk/b", "jaxdream run")
    forced = acquire_prefix("s3://photos/lk/b", "jaxdream run", force=True)
    assert forced.previous is not None and forced.previous["host"] == "node-7.example"
    # A holder whose lock was forced away does not remove its successor's at release.
    _put(key, json.dumps({**elsewhere, "token": "newer"}).encode())
    forced.release()
    assert _keys("lk/b/") == [key]

    # Through the CLI: one line naming the holder and the lock object, exit 2, nothing made.
    _put("lk/in/a.png", _png(80))
    line = _refused(tmp_path, "s3://photos/lk/in/", "s3://photos/lk/b", s3)
    assert "node-7.example" in line and f"s3://photos/lk/b/{LOCK_NAME}" in line
    assert _keys("lk/b/") == [key]
