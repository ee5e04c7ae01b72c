"""Datasets in Google Cloud Storage, tested as the S3 ones are (tests/test_storage.py).

Every test talks to a GCS emulator on 127.0.0.1 that this module starts itself
(``gcp-storage-emulator``, in memory, on a free port), reached by gcsfs through
``STORAGE_EMULATOR_HOST`` with a made-up access token (``FSSPEC_GS_TOKEN``, fsspec's own
config, sent as a bearer token that the emulator ignores) which must never show up in an
error, a log line or a manifest; nothing reaches the internet. The server is stopped at the end.

gcsfs's default filesystem since 2026 (``ExtendedGcsFileSystem``) first asks GCS's gRPC
control plane what kind each bucket is; an HTTP emulator cannot answer that (every call waits
60 s for TLS to a plain-HTTP port), so these tests use gcsfs's core filesystem through its own
switch, ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``. Everything jaxdream calls is the same.
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
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("gcsfs")

from jaxdream import storage  # noqa: E402
from jaxdream.errors import ConfigError, ImageError  # noqa: E402
from jaxdream.inputs import expand_inputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_cluster import private_ray_environment, run_cli, write_config  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BUCKET = "gphotos"
MISSING = "absent-store"  # no bucket of this name; not "bucket" in it, so messages must say so
SECRET = "ya29.jaxdream-test-token-5f1c9a7e"  # the access token the token server hands out
ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clear_fs_cache() -> None:
    """fsspec keeps one filesystem per options; the endpoint comes from the environment and
    is not among them, so a change of server must start afresh."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@contextlib.contextmanager
def _token_server(folder: Path) -> Iterator[tuple[Path, str, list[int]]]:
    """A service-account key file whose ``token_uri`` is a server on 127.0.0.1 that swaps the
    signed assertion for :data:`SECRET`: the credentials a VM or a key file gives, found where
    google-auth finds them (``GOOGLE_APPLICATION_CREDENTIALS``), with nothing online. Yields
    the key file, the key's PEM and the count of tokens handed out."""
    import http.server
    import threading

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    served = [0]

    class Tokens(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            served[0] += 1
            body = json.dumps({"access_token": SECRET, "expires_in": 3600,
                               "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Tokens)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = folder / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "jd-test", "private_key_id": "k1",
        "private_key": pem, "client_email": "jd@jd-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": f"http://127.0.0.1:{server.server_port}/token"}))
    try:
        yield path, pem, served
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The emulator's environment (endpoint, credentials file), set in this process too."""
    import fsspec
    import gcsfs.core
    from gcp_storage_emulator.server import create_server

    for name in ("gcp_storage_emulator", "api.bucket", "api.object"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    with _token_server(tmp_path_factory.mktemp("gcs-key")) as (key_file, pem, served):
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", **ENV,
               "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        # This process may have imported gcsfs already, with its default filesystem.
        saved_gs = fsspec.registry.get("gs")
        fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
        _clear_fs_cache()
        _KEY_LINE[:] = [pem.splitlines()[1]]
        try:
            yield env
        finally:
            server.stop()
            if saved_gs is not None:
                fsspec.register_implementation("gs", saved_gs, clobber=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _clear_fs_cache()
    assert served[0] >= 1  # the store was reached signed in, with the key file


#: A line of the private key, once the fixture made one.
_KEY_LINE: list[str] = []


def _no_secret(*texts: str) -> None:
    """Neither the access token nor the private key is printed or recorded."""
    for text in texts:
        assert SECRET not in text and "ya29" not in text and "PRIVATE KEY" not in text
        assert not any(line in text for line in _KEY_LINE)


def _fs() -> Any:
    import gcsfs.core

    return gcsfs.core.GCSFileSystem()


def _png(seed: int, side: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _put(key: str, data: bytes) -> None:
    _fs().pipe_file(f"{BUCKET}/{key}", data)


def _get(key: str) -> bytes:
    return bytes(_fs().cat_file(f"{BUCKET}/{key}"))


def _keys(prefix: str) -> list[str]:
    found = _fs().find(f"{BUCKET}/{prefix}", refresh=True)
    return sorted(name.split("/", 1)[1] for name in found)


def _manifest(key: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _get(key).splitlines()]


# --------------------------------------------------------------------------------------------
# Listing and identity, no Ray


def test_prefixes_and_globs_expand_to_objects_identified_by_content(
        gcs: dict[str, str]) -> None:
    for index in range(3):
        _put(f"list/a/p{index}.png", _png(index))
    _put("list/a/notes.md", b"not an image")
    _put("list/a/deeper/p9.png", _png(9))
    base = f"gs://{BUCKET}/list/a"
    assert expand_inputs([base + "/"]) == [f"{base}/p{i}.png" for i in range(3)]
    assert expand_inputs([f"{base}/p[02].png"]) == [f"{base}/p0.png", f"{base}/p2.png"]
    assert expand_inputs([f"{base}/*.png"]) == [f"{base}/p{i}.png" for i in range(3)]

    first = json.loads(storage.identity(f"{base}/p0.png"))
    assert first["size"] == len(_png(0)) and first["etag"]
    # The same bytes written again: a new generation, the same identity (nothing re-rendered).
    _put("list/a/p0.png", _png(0))
    _clear_fs_cache()
    expand_inputs([base + "/"])
    assert json.loads(storage.identity(f"{base}/p0.png")) == first
    _put("list/a/p0.png", _png(100))
    _clear_fs_cache()
    expand_inputs([base + "/"])
    assert json.loads(storage.identity(f"{base}/p0.png")) != first


def test_missing_bucket_and_prefix_are_one_config_line(gcs: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"inputs\[0\].*bucket does not exist") as error:
        expand_inputs(["gs://absent-store/in/"], source="job.yaml: inputs")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"inputs\[0\].*bucket does not exist"):
        expand_inputs(["gs://absent/in/*.png"], source="job.yaml: inputs")
    # gcsfs's not-found error is the bare path: a bucket named "...bucket..." that exists must
    # not read as a missing bucket when only the prefix is missing.
    _fs().mkdir("my-bucket-2")
    for entry in ("gs://my-bucket-2/nothing-here/", "gs://my-bucket-2/nothing-here/*.png",
                  "gs://my-bucket-2/gone.png"):
        with pytest.raises(ConfigError, match="holds no image|matches no image|no such object"
                           ) as error:
            expand_inputs([entry], source="job.yaml: inputs")
        assert "does not exist" not in str(error.value), entry
    with pytest.raises(ImageError, match="my-bucket-2/gone.png: cannot read: no such object"):
        storage.read_object("gs://my-bucket-2/gone.png")


def test_objects_read_and_written_whole(gcs: dict[str, str]) -> None:
    from jaxdream.images import load_rgb_bytes

    _put("bad/page.png", b"<!doctype html><html>404</html>")
    _put("bad/empty.png", b"")
    for key, why in [("page.png", "HTML page"), ("empty.png", r"empty file \(0 bytes\)")]:
        url = f"gs://{BUCKET}/bad/{key}"
        with pytest.raises(ImageError, match=why) as error:
            load_rgb_bytes(storage.read_object(url), storage.redact(url))
        assert str(error.value).startswith(url + ":")
    _put("bad/big.png", _png(2))
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        storage.read_object(f"gs://{BUCKET}/bad/big.png", max_bytes=100)
    with pytest.raises(ImageError, match=f"{BUCKET}/bad/gone.png: cannot read: no such object"):
        storage.read_object(f"gs://{BUCKET}/bad/gone.png")
    storage.put_object(f"gs://{BUCKET}/put/x.bin", b"whole")
    assert _get("put/x.bin") == b"whole"
    with pytest.raises(storage.StorageError, match="absent-store/x.bin: cannot write: the "
                                                   "bucket does not exist"):
        storage.put_object("gs://absent-store/x.bin", b"whole")
    storage.check_writable(f"gs://{BUCKET}/put/")
    assert _keys("put/") == ["put/x.bin"]  # the probe is gone
    with pytest.raises(ConfigError, match=r"^output gs://absent-store/out/\S*: cannot write: "
                                          r"the bucket does not exist"):
        storage.check_writable("gs://absent-store/out")


# --------------------------------------------------------------------------------------------
# Refused before anything renders: exit status 2, one line


def _refused(tmp_path: Path, inputs: str, output: str, env: dict[str, str]) -> str:
    config = write_config(tmp_path / "job.yaml", [inputs], output)  # type: ignore[arg-type]
    with private_ray_environment() as ray_env:
        result = run_cli([str(config), "-q"], {**ray_env, **env}, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    _no_secret(result.stderr, result.stdout)
    return lines[0]


def test_a_missing_bucket_exits_2_before_rendering(gcs: dict[str, str],
                                                   tmp_path: Path) -> None:
    _put("pre/in/a.png", _png(5))
    line = _refused(tmp_path, f"gs://{BUCKET}/pre/in/", "gs://absent-store/out", gcs)
    assert "gs://absent-store/out" in line and "bucket does not exist" in line
    line = _refused(tmp_path, "gs://absent-store/in/", f"gs://{BUCKET}/pre/out", gcs)
    assert "inputs[0]" in line and "bucket does not exist" in line
    assert _keys("pre/") == ["pre/in/a.png"]


def test_gcsfs_default_filesystem_and_no_credentials_still_give_one_line(
        gcs: dict[str, str], tmp_path: Path) -> None:
    """gcsfs's default filesystem with no credentials anywhere (no token, no ADC file, no
    metadata server) warns on every call that it cannot learn the bucket's layout; the user
    still sees jaxdream's one line."""
    env = {key: value for key, value in os.environ.items() if key not in ENV}
    env.update(STORAGE_EMULATOR_HOST=gcs["STORAGE_EMULATOR_HOST"], NO_GCE_CHECK="true",
               GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no-such-credentials.json"),
               CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    config = write_config(tmp_path / "job.yaml", ["gs://absent-store/in/"],
                          f"gs://{BUCKET}/quiet/out")  # type: ignore[arg-type]
    with private_ray_environment() as ray_env:
        result = subprocess.run([sys.executable, "-m", "jaxdream.cli", "run", str(config), "-q"],
                                env={**env, **ray_env}, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "inputs[0]" in result.stderr and "bucket does not exist" in result.stderr


def test_gcs_listings_and_errors_translate() -> None:
    """What the emulator cannot show: a real GCS listing (etag that changes with metadata,
    composite objects without MD5) and gcsfs's 401/403 errors."""
    from gcsfs.retry import HttpError

    info = {"name": "b/a.png", "size": 10, "etag": "CKih16GjycICEAE=", "generation": "17",
            "md5Hash": "XUFAKrxLKna5cZ2REBfFkg==", "crc32c": "mnG7TA==", "updated": "t"}
    same = {**info, "etag": "CKih16GjycICEAI=", "generation": "18", "updated": "u"}
    assert storage.identity_of("gs://b/a.png", info) == storage.identity_of("gs://b/a.png", same)
    composite = {key: value for key, value in info.items() if key != "md5Hash"}
    assert json.loads(storage.identity_of("gs://b/a.png", composite))["etag"] == "mnG7TA=="
    assert storage.identity_of("gs://b/a.png", info) != storage.identity_of(
        "gs://b/a.png", {**info, "md5Hash": "boCcvaBzKsSEWRalkBb5VA=="})
    denied = [OSError("Forbidden: b/photos/o\nsa@p.iam.gserviceaccount.com does not have "
                      "storage.objects.list access"),
              HttpError({"code": 401, "message": "Invalid Credentials"})]
    for error in denied:
        assert storage.reason(error).startswith("access denied ("), error


# --------------------------------------------------------------------------------------------
# A whole job: bucket to bucket through `jaxdream run`, then --resume


def test_a_job_from_a_bucket_to_a_bucket_resumes_from_the_prefix(gcs: dict[str, str],
                                                                  tmp_path: Path) -> None:
    from jaxdream.images import read_recipe

    photos = {f"job/in/photo_{index}.png": _png(10 + index) for index in range(3)}
    for key, data in photos.items():
        _put(key, data)
    _put("job/in/broken.png", b"<html>not a photo</html>")
    config = write_config(tmp_path / "job.yaml", [f"gs://{BUCKET}/job/in/"],
                          f"gs://{BUCKET}/job/out/", job={"unit_size": 2})  # type: ignore
    with private_ray_environment() as env:
        first = run_cli([str(config), "-q"], {**env, **gcs}, timeout=300)
        assert first.returncode == 1, first.stderr  # the broken object fails alone
        errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"gs://{BUCKET}/job/in/broken.png" in errors[0], first.stderr
        outputs = [key for key in _keys("job/out/") if key.endswith(".png")]
        # Listed inputs are named by themselves alone: stem, then a digest of the URL.
        from jaxdream.planning import output_stem

        stems = [output_stem(f"gs://{BUCKET}/job/in/photo_{i}.png", True) for i in range(3)]
        assert all(re.fullmatch(f"photo_{i}_[0-9a-f]{{8}}", stem) for i, stem in enumerate(stems))
        assert outputs == [f"job/out/{stem}_dream.png" for stem in stems]
        assert [key for key in _keys("job/out/") if "manifest" in key] == [
            "job/out/manifest.jsonl"]  # parts compacted
        rows = _manifest("job/out/manifest.jsonl")
        assert len(rows) == 4 and sum(row["status"] == "done" for row in rows) == 3
        for row in rows:
            if row["status"] != "done":
                continue
            key = "job/in/" + row["input"].rsplit("/", 1)[1]
            assert row["input_sha256"] == hashlib.sha256(photos[key]).hexdigest()
            local = tmp_path / row["output"]
            local.write_bytes(_get("job/out/" + row["output"]))
            recipe = read_recipe(local)
            assert recipe["input"]["sha256"] == row["input_sha256"]
            with Image.open(local) as image:
                assert image.size == (96, 96)
                assert json.loads(image.text["jaxdream"])["id"] == row["id"]
        before = {key: _fs().info(f"{BUCKET}/{key}")["generation"] for key in outputs}

        again = run_cli([str(config), "-q", "--resume"], {**env, **gcs}, timeout=300)
    assert again.returncode == 1, again.stderr  # the broken object is tried again, fails again
    assert "resuming: 3 of 4 item(s) already done" in again.stderr, again.stderr
    assert "dreamed 0 of 4 item(s)" in again.stderr, again.stderr
    assert {key: _fs().info(f"{BUCKET}/{key}")["generation"] for key in outputs} == before
    rows = _manifest("job/out/manifest.jsonl")
    assert len(rows) == 4 and not [key for key in _keys("job/out/") if "manifest.parts" in key]
    assert len({(row["id"], row["output"]) for row in rows}) == 4
    _no_secret(first.stderr, first.stdout, again.stderr, again.stdout, json.dumps(rows))


# --------------------------------------------------------------------------------------------
# Containers in a bucket: a WebDataset shard and a Parquet table


def _shard(samples: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_shard_and_a_parquet_table_in_a_bucket_are_inputs(gcs: dict[str, str],
                                                            tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from jaxdream.config import load_config
    from jaxdream.render import dream_config, plan_items

    _put("shards/train-000000.tar", _shard({"0000.png": _png(40), "0000.cls": b"1",
                                            "0001.png": b"<html>"}))
    _put("shards/train-000001.tar", _shard({"1000.jpg": _png(41)}))
    table = pa.table({"image": [{"bytes": _png(50), "path": "a.png"},
                                {"bytes": _png(51), "path": "b.png"}]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _put("tables/train.parquet", buffer.getvalue())

    entries = [f"gs://{BUCKET}/shards/train-{{000000..000001}}.tar",
               f"gs://{BUCKET}/tables/train.parquet"]
    shards, table_url = f"gs://{BUCKET}/shards", f"gs://{BUCKET}/tables/train.parquet"
    assert expand_inputs(entries) == [
        f"{shards}/train-000000.tar#0000.png", f"{shards}/train-000000.tar#0001.png",
        f"{shards}/train-000001.tar#1000.jpg", f"{table_url}#0000000.row",
        f"{table_url}#0000001.row"]
    config = load_config(write_config(tmp_path / "job.yaml", entries, tmp_path / "out",
                                      dream={"layers": "stem", "octaves": 1, "steps": 1},
                                      max_side=64))
    items, failures = plan_items(config)
    assert not failures and len({item.id for item in items}) == 5
    again, _ = plan_items(config)
    assert [item.id for item in again] == [item.id for item in items]

    report, _ = dream_config(config, progress=False, gallery=False, report=lambda line: None)
    by_input = {outcome.input: outcome for outcome in report.outcomes}
    bad = by_input[f"{shards}/train-000000.tar#0001.png"]
    assert bad.status == "failed" and bad.reason.startswith(f"{shards}/train-000000.tar#0001.png: ")
    done = [outcome for outcome in report.outcomes if outcome.status == "done"]
    assert len(done) == 4
    assert by_input[f"{shards}/train-000001.tar#1000.jpg"].input_sha256 == (
        hashlib.sha256(_png(41)).hexdigest())
    assert by_input[f"{table_url}#0000001.row"].input_sha256 == (
        hashlib.sha256(_png(51)).hexdigest())
