"""Datasets in object storage: inputs listed (never read) on the driver, objects read by the
workers through the same checks as files, outputs uploaded whole, the manifest in parts beside
them, resume from the prefix alone.

Every test talks to an S3 server on 127.0.0.1 that this module starts itself (moto's
``ThreadedMotoServer`` on a free port) through ``AWS_ENDPOINT_URL``, with dummy credentials;
nothing reaches the internet. The server is stopped at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from jaxdream import storage  # noqa: E402
from jaxdream.errors import ConfigError, ImageError  # noqa: E402
from jaxdream.inputs import expand_inputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_cluster import TINY_DREAM, private_ray_environment, run_cli, write_config  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
    # botocore and the moto server use datetime.utcnow and friends on some versions.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BUCKET = "photos"
DUMMY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": ""}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clear_fs_cache() -> None:
    """fsspec keeps one filesystem per options; credentials from the environment are not
    among them, so a test that changes them must start afresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """The server's environment (endpoint and dummy credentials), set in this process too."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**DUMMY, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    _clear_fs_cache()
    try:
        _client().create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_fs_cache()


def _client(**keys: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        region_name="us-east-1", **keys)


def _png(seed: int, side: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _put(key: str, data: bytes) -> None:
    _client().put_object(Bucket=BUCKET, Key=key, Body=data)


def _keys(prefix: str) -> list[str]:
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# --------------------------------------------------------------------------------------------
# Listing and reading, no Ray


def test_prefixes_globs_and_lists_expand_to_objects_without_reading_them(
        s3: dict[str, str], tmp_path: Path) -> None:
    for index in range(3):
        _put(f"list/a/p{index}.png", _png(index))
    _put("list/a/notes.md", b"not an image")
    _put("list/a/deeper/p9.png", _png(9))
    _put("list/files.txt", b"# two of them\na/p0.png\n\ns3://photos/list/a/p2.png\n")
    local = tmp_path / "mixed.csv"
    local.write_text("id,url\n1,s3://photos/list/a/p1.png\n2,local.png\n", encoding="utf-8")

    base = "s3://photos/list/a"
    assert expand_inputs([base + "/"]) == [f"{base}/p{i}.png" for i in range(3)]
    assert expand_inputs(["s3://photos/list/a/p[02].png"]) == [f"{base}/p0.png",
                                                              f"{base}/p2.png"]
    assert expand_inputs(["s3://photos/list/files.txt"]) == [f"{base}/p0.png", f"{base}/p2.png"]
    assert expand_inputs([str(local)]) == [f"{base}/p1.png", str(tmp_path / "local.png")]
    # Listed objects are identified by ETag and size: the same bytes, the same identity.
    first = storage.identity(f"{base}/p0.png")
    assert json.loads(first)["size"] == len(_png(0))
    _put("list/a/p0.png", _png(100))
    _clear_fs_cache()
    expand_inputs([base + "/"])
    assert storage.identity(f"{base}/p0.png") != first


def test_missing_bucket_and_prefix_are_one_config_line(s3: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"inputs\[0\].*bucket does not exist") as error:
        expand_inputs(["s3://no-such-bucket/in/"], source="job.yaml: inputs")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="holds no image object|no such object"):
        expand_inputs(["s3://photos/nothing-here/"], source="job.yaml: inputs")


def test_objects_go_through_the_hostile_input_checks(s3: dict[str, str]) -> None:
    from jaxdream.images import load_rgb_bytes

    _put("bad/page.png", b"<!doctype html><html>404</html>")
    _put("bad/empty.png", b"")
    _put("bad/cut.png", _png(1)[:200])
    for key, why in [("page.png", "HTML page"), ("empty.png", r"empty file \(0 bytes\)"),
                     ("cut.png", "truncated|corrupt")]:
        url = f"s3://photos/bad/{key}"
        with pytest.raises(ImageError, match=why) as error:
            load_rgb_bytes(storage.read_object(url), storage.redact(url))
        assert str(error.value).startswith(url + ":")
    _put("bad/big.png", _png(2))
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        storage.read_object("s3://photos/bad/big.png", max_bytes=100)
    with pytest.raises(ImageError, match="photos/bad/gone.png: cannot read: no such object"):
        storage.read_object("s3://photos/bad/gone.png")
    good = load_rgb_bytes(_png(3), "x.png", max_side=48)
    assert good.shape == (48, 48, 3) and good.dtype == np.uint8


def test_urls_are_shown_without_secrets() -> None:
    from jaxdream.jobs.manifest import make_row
    from jaxdream.render import Outcome, output_stems

    url = "https://user:pw@example.com:8443/a/b.jpg?X-Amz-Signature=abc#frag"
    assert storage.redact(url) == "https://example.com:8443/a/b.jpg"
    assert output_stems([url], Path("out")) == ["b"]
    row = make_row(None, Outcome(url, None, "failed", "x"), "id", Path("out"))
    assert "abc" not in json.dumps(row) and "pw" not in json.dumps(row)
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b/k")
    assert not storage.is_url("C:\\photos\\a.jpg") and not storage.is_url("photos/a.jpg")


def test_an_s3_output_is_refused_by_the_in_process_renderer(s3: dict[str, str],
                                                            tmp_path: Path) -> None:
    from jaxdream.config import load_config
    from jaxdream.render import dream_config

    config = load_config(write_config(tmp_path / "job.yaml", ["s3://photos/list/a/"],
                                      "s3://photos/out-x"))  # type: ignore[arg-type]
    assert config.output_url == "s3://photos/out-x"
    with pytest.raises(ConfigError, match="jaxdream run"):
        dream_config(config)
    assert not (Path.cwd() / "s3:").exists()


# --------------------------------------------------------------------------------------------
# Refused before anything renders: exit status 2, one line


@contextlib.contextmanager
def _iam_user(deny_prefix: str) -> Iterator[dict[str, str]]:
    """A user allowed everything on the bucket but writing under ``deny_prefix``, and moto's
    IAM checks switched on while the block runs."""
    import boto3
    from moto.core.authorization import enable_iam_authentication

    iam = boto3.client("iam", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                       region_name="us-east-1")
    user = f"jd-{_free_port()}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:PutObject",
         "Resource": f"arn:aws:s3:::{BUCKET}/{deny_prefix}*"}]}
    iam.put_user_policy(UserName=user, PolicyName="jd", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    with enable_iam_authentication():
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _refused(tmp_path: Path, inputs: str, output: str, env: dict[str, str]) -> str:
    config = write_config(tmp_path / "job.yaml", [inputs], output)  # type: ignore[arg-type]
    with private_ray_environment() as ray_env:
        result = run_cli([str(config), "-q"], {**ray_env, **env}, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert env.get("AWS_SECRET_ACCESS_KEY", "testing") not in result.stderr
    return lines[0]


def test_missing_bucket_wrong_key_and_forbidden_prefix_exit_2_before_rendering(
        s3: dict[str, str], tmp_path: Path) -> None:
    _put("pre/in/a.png", _png(5))
    line = _refused(tmp_path, "s3://photos/pre/in/", "s3://no-such-bucket/out", s3)
    assert "no-such-bucket" in line and "bucket does not exist" in line
    line = _refused(tmp_path, "s3://no-such-bucket/in/", "s3://photos/pre/out", s3)
    assert "inputs[0]" in line and "bucket does not exist" in line
    with _iam_user("pre/locked/") as keys:
        wrong = {**s3, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
                 "AWS_SECRET_ACCESS_KEY": "wrong-secret-wrong-secret"}
        line = _refused(tmp_path, "s3://photos/pre/in/", "s3://photos/pre/out", wrong)
        assert "access denied" in line
        line = _refused(tmp_path, "s3://photos/pre/in/", "s3://photos/pre/locked/out",
                        {**s3, **keys})
        assert "pre/locked/out" in line and "access denied" in line
    assert _keys("pre/out") == [] and _keys("pre/locked") == []


# --------------------------------------------------------------------------------------------
# A whole job: bucket to bucket through `jaxdream run`, then --resume


def test_a_job_from_a_bucket_to_a_bucket_resumes_from_the_prefix(s3: dict[str, str],
                                                                  tmp_path: Path) -> None:
    photos = {f"job/in/photo_{index}.png": _png(10 + index) for index in range(4)}
    for key, data in photos.items():
        _put(key, data)
    _put("job/in/broken.png", b"<html>not a photo</html>")
    config = write_config(tmp_path / "job.yaml", ["s3://photos/job/in/"],
                          "s3://photos/job/out/", job={"unit_size": 2})  # type: ignore[arg-type]
    with private_ray_environment() as env:
        first = run_cli([str(config), "-q"], {**env, **s3}, timeout=300)
        assert first.returncode == 1, first.stderr  # the broken object fails alone
        errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [line for line in errors if "s3://photos/job/in/broken.png" in line]
        assert len(errors) == 1, first.stderr
        outputs = [key for key in _keys("job/out/") if key.endswith(".png")]
        # Listed inputs are named by themselves alone: stem, then a digest of the URL.
        from jaxdream.planning import output_stem

        stems = [output_stem(f"s3://photos/job/in/photo_{i}.png", True) for i in range(4)]
        assert all(re.fullmatch(f"photo_{i}_[0-9a-f]{{8}}", stem) for i, stem in enumerate(stems))
        assert outputs == [f"job/out/{stem}_dream.png" for stem in stems]
        assert _keys("job/out/manifest") == ["job/out/manifest.jsonl"]  # parts compacted
        rows = _manifest("job/out/manifest.jsonl")
        assert len(rows) == 5 and sum(row["status"] == "done" for row in rows) == 4
        for row in rows:
            if row["status"] == "done":
                key = "job/in/" + row["input"].rsplit("/", 1)[1]
                assert row["input_sha256"] == hashlib.sha256(photos[key]).hexdigest()
                png = _client().get_object(Bucket=BUCKET, Key="job/out/" + row["output"])
                with Image.open(io.BytesIO(png["Body"].read())) as image:
                    assert image.size == (96, 96)
                    assert json.loads(image.text["jaxdream"])["id"] == row["id"]
        before = {key: _client().head_object(Bucket=BUCKET, Key=key)["ETag"] for key in outputs}

        again = run_cli([str(config), "-q", "--resume"], {**env, **s3}, timeout=300)
    assert "resuming: 4 of 5 item(s) already done" in again.stderr, again.stderr  # 1 bad
    assert "dreamed 0 of 5 item(s)" in again.stderr, again.stderr
    assert {key: _client().head_object(Bucket=BUCKET, Key=key)["ETag"]
            for key in outputs} == before
    rows = _manifest("job/out/manifest.jsonl")
    assert len(rows) == 5 and _keys("job/out/manifest.parts") == []
    assert len({(row["id"], row["output"]) for row in rows}) == 5


def _manifest(key: str) -> list[dict[str, Any]]:
    body = _client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


# --------------------------------------------------------------------------------------------
# The hostile corpus served from S3: the same verdicts as the files, each naming its key


def test_hostile_objects_get_the_verdicts_of_the_files_and_name_their_key(
        s3: dict[str, str], tmp_path: Path) -> None:
    from hostile_images import make_corpus

    from jaxdream.images import load_rgb, load_rgb_bytes

    checked = 0
    for case in make_corpus(tmp_path / "corpus"):
        path = case.path
        if path.is_symlink() or not path.is_file() or "\n" in path.name:
            continue  # links, pipes and folders do not exist in a bucket
        key = f"hostile/{checked:03d}{path.suffix}"
        _put(key, path.read_bytes())
        url = f"s3://{BUCKET}/{key}"
        try:
            expected: Any = load_rgb(path)
        except ImageError as error:
            expected = str(error).split(": ", 1)[1]
        try:
            got: Any = load_rgb_bytes(storage.read_object(url), storage.redact(url))
        except ImageError as error:
            assert str(error).startswith(url + ": "), error
            got = str(error).split(": ", 1)[1]
        if isinstance(expected, str):
            assert got == expected, case.description
        else:
            assert isinstance(got, np.ndarray) and np.array_equal(got, expected), case.description
        checked += 1
    assert checked >= 20


# --------------------------------------------------------------------------------------------
# WebDataset shards


def _shard(samples: dict[str, bytes]) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_shards_local_and_in_a_bucket_are_inputs(s3: dict[str, str],
                                                            tmp_path: Path) -> None:
    from jaxdream.config import load_config
    from jaxdream.images import read_recipe
    from jaxdream.render import dream_config, plan_items
    from jaxdream.shards import expand_braces

    assert expand_braces("s/train-{000008..000010}.tar") == [
        "s/train-000008.tar", "s/train-000009.tar", "s/train-000010.tar"]
    folder = tmp_path / "shards"
    folder.mkdir()
    for index in range(2):
        (folder / f"train-{index:06d}.tar").write_bytes(_shard({
            f"{index}000.jpg": _png(20 + index), f"{index}000.cls": b"3",
            f"{index}001.seg.png": _png(30 + index), f"{index}001.json": b"{}"}))
    _put("shards/train-000002.tar", _shard({"2000.png": _png(40), "2001.png": b"<html>"}))
    good = _shard({"3000.png": _png(41), "3001.png": _png(42)})
    second = 512 + -(-len(_png(41)) // 512) * 512  # where the second member's header starts
    _put("shards/train-000003.tar", good[:second + 512 + 100])  # cut inside its data
    entries = [str(folder / "train-{000000..000001}.tar"),
               "s3://photos/shards/train-{000002..000003}.tar"]
    found = expand_inputs(entries)
    assert [item.rsplit("#", 1)[1] for item in found] == [
        "0000.jpg", "0001.seg.png", "1000.jpg", "1001.seg.png", "2000.png", "2001.png",
        "3000.png", "3001.png", ""]

    config = load_config(write_config(tmp_path / "job.yaml", entries, tmp_path / "out",
                                      dream={"layers": "stem", "octaves": 1, "steps": 1},
                                      max_side=64))
    items, failures = plan_items(config)
    assert not failures and len({item.id for item in items}) == 9
    again, _ = plan_items(config)
    assert [item.id for item in again] == [item.id for item in items]  # stable, nothing read

    report, _ = dream_config(config, progress=False, gallery=False, report=lambda line: None)
    status = {Path(outcome.input).name: outcome for outcome in report.outcomes}
    assert status["train-000002.tar#2001.png"].status == "failed"
    assert status["train-000002.tar#2001.png"].reason.startswith(
        "s3://photos/shards/train-000002.tar#2001.png: ")
    broken = status["train-000003.tar#"]
    assert broken.status == "failed" and broken.reason.startswith(
        "s3://photos/shards/train-000003.tar: not a readable tar shard"), broken.reason
    assert "ends inside this member" in status["train-000003.tar#3001.png"].reason
    done = [outcome for outcome in report.outcomes if outcome.status == "done"]
    assert len(done) == 6
    for outcome in done:
        recipe = read_recipe(outcome.output)
        assert recipe["input"]["sha256"] == outcome.input_sha256 != ""
    assert hashlib.sha256(_png(40)).hexdigest() == status["train-000002.tar#2000.png"].input_sha256


def test_item_ids_are_the_json_identity_hash_they_always_were() -> None:
    """Ids are built without serialising the recipe per item; they must not change, or every
    manifest written before would be re-rendered on --resume."""
    from jaxdream import __version__
    from jaxdream.recipe import Recipe
    from jaxdream.render import item_id

    recipe = Recipe(layers=(("block5", 1.0), ("block3", 0.5)), steps=3, octaves=2)
    for guide in (None, "a" * 64):
        identity = {"input": "f" * 64, "guide": guide, "jaxdream": __version__,
                    "recipe": recipe.to_json(weights_sha256="w" * 64)}
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        assert item_id("f" * 64, recipe, "w" * 64, guide) == (
            hashlib.sha256(text.encode()).hexdigest()[:32])


# --------------------------------------------------------------------------------------------
# On the 3-node 127.0.0.1 Ray cluster: a node pulled, a driver killed, inputs and outputs in S3


@pytest.fixture(scope="module")
def s3_cluster(s3: dict[str, str]) -> Iterator[tuple[Any, dict[str, str]]]:
    """Started after the S3 server, so that every node's processes find its endpoint."""
    from ray_cluster import start_cluster

    with private_ray_environment() as env:
        cluster = start_cluster(worker_nodes=2)
        try:
            yield cluster, {**env, **s3}
        finally:
            cluster.shutdown()


def _photos(prefix: str, count: int, seed: int) -> None:
    for index in range(count):
        _put(f"{prefix}/photo_{index:03d}.png", _png(seed * 1000 + index))


def _assert_bucket_complete(prefix: str, count: int) -> list[dict[str, Any]]:
    """One row per item, all done, each output a whole PNG; nothing else under the prefix."""
    rows = _manifest(f"{prefix}/manifest.jsonl")
    assert len(rows) == count and all(row["status"] == "done" for row in rows)
    assert len({(row["id"], row["output"]) for row in rows}) == count
    assert _keys(prefix + "/") == sorted([f"{prefix}/manifest.jsonl",
                                          *(f"{prefix}/{row['output']}" for row in rows)])
    for row in rows:
        body = _client().get_object(Bucket=BUCKET, Key=f"{prefix}/{row['output']}")["Body"]
        with Image.open(io.BytesIO(body.read())) as image:
            image.load()
            assert image.size == (96, 96) and "jaxdream" in image.text
    return rows


def test_a_node_removed_mid_job_with_bucket_io_costs_a_retry_not_an_item(
        s3_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    from ray_cluster import add_worker_node

    from jaxdream import jobs
    from jaxdream.config import load_config

    cluster, _ = s3_cluster
    _photos("node/in", 24, seed=3)
    # Units of 2: every worker then holds a second unit while the first comes back, so the
    # node pulled below always takes work with it (3 units of 8 could all be back already).
    # Ten times the tiny dream's steps keep that second unit running while the driver writes
    # the first one's manifest part to the bucket: with 20 steps, under load, it was once
    # already back (inlined to the driver, so nothing was lost and nothing retried).
    config = load_config(write_config(tmp_path / "job.yaml", "s3://photos/node/in/",
                                      "s3://photos/node/out", job={"unit_size": 2},
                                      dream={**TINY_DREAM, "steps": 200}))  # type: ignore[arg-type]
    removed: list[str] = []
    workers = {node.node_id: node for node in cluster.worker_nodes}

    def pull_node(rows: list[dict[str, Any]]) -> None:
        if not removed and rows[0]["node"] in workers:
            removed.append(rows[0]["node"])
            cluster.remove_node(workers[rows[0]["node"]], allow_graceful=False)

    try:
        summary = jobs.run_job(config, address=cluster.address, progress=False,
                               on_rows=pull_node)
    finally:
        if removed:
            add_worker_node(cluster)
            cluster.wait_for_nodes()
    assert removed and summary.retried_units >= 1
    assert (summary.done, summary.failed, summary.not_run) == (24, 0, 0)
    _assert_bucket_complete("node/out", 24)


def kill_driver_mid_job(config: Path, address: str, env: dict[str, str], out: str) -> None:
    """Starts `jaxdream run CONFIG` on the cluster and SIGKILLs its driver once two manifest
    parts are under the bucket prefix ``out`` (work recorded, the job not finished)."""
    import signal
    import time

    from ray_cluster import start_cli

    driver = start_cli([str(config), "--address", address, "-q"], env)
    try:
        deadline = time.monotonic() + 180
        while len(_keys(f"{out}/manifest.parts/")) < 2 and driver.poll() is None:
            assert time.monotonic() < deadline, "the first driver recorded nothing in 180 s"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()


def test_a_killed_driver_with_bucket_io_resumes_from_the_manifest_parts(
        s3_cluster: tuple[Any, dict[str, str]], tmp_path: Path) -> None:
    cluster, env = s3_cluster
    _photos("kill/in", 30, seed=4)
    config = write_config(tmp_path / "job.yaml", "s3://photos/kill/in/", "s3://photos/kill/out",
                          job={"unit_size": 2})  # type: ignore[arg-type]
    kill_driver_mid_job(config, cluster.address, env, "kill/out")
    parts = _keys("kill/out/manifest.parts/")
    assert "kill/out/manifest.jsonl" not in _keys("kill/out/"), "it finished before the kill"
    done_before = sum(len(_manifest(part)) for part in parts)
    assert 4 <= done_before < 30

    resumed = run_cli([str(config), "--address", cluster.address, "--resume", "-q"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done_before} of 30 item(s) already done" in resumed.stderr
    assert f"dreamed {30 - done_before} of 30" in resumed.stderr
    _assert_bucket_complete("kill/out", 30)


def test_http_urls_and_lists_of_them_are_inputs(tmp_path: Path) -> None:
    """A web server on 127.0.0.1 that ignores Range requests (Python's own): the size cap
    still holds, a missing URL is one line naming it."""
    import functools
    import http.server
    import threading

    from jaxdream.images import load_rgb_bytes

    pytest.importorskip("aiohttp")
    (tmp_path / "a.png").write_bytes(_png(7, side=40))
    (tmp_path / "list.txt").write_text("a.png\nmissing.png\n", encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert expand_inputs([f"{base}/list.txt", f"{base}/a.png"]) == [
            f"{base}/a.png", f"{base}/missing.png"]
        assert json.loads(storage.identity(f"{base}/a.png"))["size"] == len(_png(7, side=40))
        image = load_rgb_bytes(storage.read_object(f"{base}/a.png"), "a.png")
        assert image.shape == (40, 40, 3)
        with pytest.raises(ImageError, match="larger than 50 bytes"):
            storage.read_object(f"{base}/a.png", max_bytes=50)
        with pytest.raises(ImageError, match=f"^{base}/missing.png: cannot read: no such"):
            storage.read_object(f"{base}/missing.png")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# Parquet: an image-bytes column (the Hugging Face datasets layout), or a list of paths


def test_parquet_image_rows_and_path_lists_are_inputs(s3: dict[str, str],
                                                      tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from jaxdream.config import load_config
    from jaxdream.render import dream_config, plan_items

    images = [_png(50), b"<html>not an image</html>", _png(51)]
    table = pa.table({"image": [{"bytes": data, "path": f"{i}.png"}
                                for i, data in enumerate(images)], "label": [1, 2, 3]})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    buffer = io.BytesIO()
    pq.write_table(table.slice(0, 1), buffer)
    _put("tables/more.parquet", buffer.getvalue())
    _put("tables/listed.png", _png(52))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"url": ["s3://photos/tables/listed.png"]}), buffer)
    _put("tables/list.parquet", buffer.getvalue())

    entries = [str(tmp_path / "train.parquet"), "s3://photos/tables/more.parquet",
               "s3://photos/tables/list.parquet"]
    found = expand_inputs(entries)
    assert found == [f"{tmp_path}/train.parquet#{i:07d}.row" for i in range(3)] + [
        "s3://photos/tables/more.parquet#0000000.row", "s3://photos/tables/listed.png"]
    config = load_config(write_config(tmp_path / "job.yaml", entries, tmp_path / "out",
                                      dream={"layers": "stem", "octaves": 1, "steps": 1},
                                      max_side=64))
    items, failures = plan_items(config)
    assert not failures and len(items) == 5
    report, _ = dream_config(config, progress=False, gallery=False, report=lambda line: None)
    by_input = {outcome.input: outcome for outcome in report.outcomes}
    bad = by_input[f"{tmp_path}/train.parquet#0000001.row"]
    assert bad.status == "failed" and bad.reason.startswith(
        f"{tmp_path}/train.parquet#0000001.row: ") and "HTML" in bad.reason
    assert sum(outcome.status == "done" for outcome in report.outcomes) == 4
    assert by_input[f"{tmp_path}/train.parquet#0000002.row"].input_sha256 == (
        hashlib.sha256(_png(51)).hexdigest())
    assert len(set(os.listdir(tmp_path / "out"))) == 4


def test_a_file_that_is_not_parquet_is_one_config_line(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 nothing here")
    with pytest.raises(ConfigError, match=r"inputs\[0\]: .*fake.parquet: not a readable "
                                          r"Parquet file") as error:
        expand_inputs([str(tmp_path / "fake.parquet")], source="inputs")
    assert "\n" not in str(error.value)


def test_a_prefix_is_listed_page_by_page_and_its_first_objects_come_at_once(
        s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket of a million objects is a thousand listing requests: the first inputs come
    out after the first page, not after the last."""
    import s3fs

    from jaxdream.storage import iter_url

    for index in range(5):
        _put(f"paged/in/p{index}.png", b"x")
    _put("paged/in/notes.md", b"not an image")
    pages: list[int] = []
    real = s3fs.S3FileSystem._list_pages

    async def small_pages(self: Any, method: str, **kwargs: Any) -> Any:
        kwargs["MaxKeys"] = 2
        async for page in real(self, method, **kwargs):
            pages.append(len(page.get("Contents", [])))
            yield page

    monkeypatch.setattr(s3fs.S3FileSystem, "_list_pages", small_pages)
    monkeypatch.setattr("jaxdream.storage.LIST_BATCH", 2)
    _clear_fs_cache()
    listing = iter_url("s3://photos/paged/in/", "inputs[0]", (".png",))
    first, identity = next(listing)
    assert first == "s3://photos/paged/in/p0.png" and '"etag"' in identity
    assert len(pages) == 1
    rest = [url for url, _ in listing]
    assert rest == [f"s3://photos/paged/in/p{index}.png" for index in range(1, 5)]
    assert len(pages) == 3
    with pytest.raises(ConfigError, match="the bucket does not exist"):
        list(iter_url("s3://no-such-bucket/in/", "inputs[0]", (".png",)))
