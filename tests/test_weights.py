"""Fetching official weights, against an HTTP server on 127.0.0.1 (nothing leaves the machine)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jaxdream.cli import main
from jaxdream.models import MODELS
from jaxdream.models.weights import WeightsError, WeightsSource, cache_dir, fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PREFIX = hashlib.sha256(PAYLOAD).hexdigest()[:8]
SHA1 = hashlib.sha1(PAYLOAD).hexdigest()


class _Server:
    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                server.requests.append(self.path)
                if self.path.startswith("/missing"):
                    self.send_error(404)
                    return
                body = PAYLOAD
                if self.path.startswith("/corrupt"):
                    body = PAYLOAD[:-1] + b"\x00"
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                if self.path.startswith("/interrupted"):
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[_Server]:
    running = _Server()
    yield running
    running.close()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXDREAM_CACHE", str(tmp_path / "cache"))


def _leftovers() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_verifies_and_caches(server: _Server) -> None:
    source = WeightsSource(url=server.url(f"/model-{PREFIX}.pth"), sha256_prefix=PREFIX)
    path = fetch("m", source, progress=False)
    assert path == cache_dir() / f"model-{PREFIX}.pth"
    assert path.read_bytes() == PAYLOAD
    assert fetch("m", source, progress=False) == path
    assert len(server.requests) == 1, "a cached file must not be downloaded again"
    fetch("m", source, progress=False, force=True)
    assert len(server.requests) == 2
    assert _leftovers() == [path.name]


def test_a_corrupted_download_is_refused_and_leaves_nothing(server: _Server) -> None:
    source = WeightsSource(url=server.url(f"/corrupt-{PREFIX}.pth"), sha256_prefix=PREFIX)
    with pytest.raises(WeightsError, match=f"published prefix is {PREFIX}"):
        fetch("m", source, progress=False)
    assert _leftovers() == []


def test_a_published_sha1_is_checked(server: _Server) -> None:
    """Caffe's model zoo publishes a whole SHA-1 (bvlc_googlenet.caffemodel's readme)."""
    good = WeightsSource(url=server.url("/net.caffemodel"), sha1=SHA1)
    assert fetch("m", good, progress=False).read_bytes() == PAYLOAD
    bad = WeightsSource(url=server.url("/corrupt/other.caffemodel"), sha1=SHA1)
    with pytest.raises(WeightsError, match=f"published one is {SHA1}; refused"):
        fetch("m", bad, progress=False)
    assert _leftovers() == ["net.caffemodel"]


def test_a_download_without_a_published_checksum_says_so(
        server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    source = WeightsSource(url=server.url("/places.caffemodel"))
    assert not source.verified and "no published checksum" in source.describe()
    assert fetch("m", source, progress=False).read_bytes() == PAYLOAD
    warning = capsys.readouterr().err
    assert "publishes no checksum" in warning
    assert hashlib.sha256(PAYLOAD).hexdigest() in warning


def test_an_interrupted_download_leaves_nothing(server: _Server) -> None:
    source = WeightsSource(url=server.url(f"/interrupted-{PREFIX}.pth"), sha256_prefix=PREFIX)
    with pytest.raises(WeightsError, match="interrupted"):
        fetch("m", source, progress=False)
    assert _leftovers() == []


def test_an_interrupted_download_keeps_the_good_cached_copy(server: _Server) -> None:
    good = WeightsSource(url=server.url(f"/model-{PREFIX}.pth"), sha256_prefix=PREFIX)
    path = fetch("m", good, progress=False)
    broken = WeightsSource(url=server.url(f"/interrupted/model-{PREFIX}.pth"),
                           sha256_prefix=PREFIX)
    with pytest.raises(WeightsError):
        fetch("m", broken, progress=False, force=True)
    assert path.read_bytes() == PAYLOAD
    assert _leftovers() == [path.name]


def test_http_errors_and_unreachable_servers_are_clear(server: _Server) -> None:
    with pytest.raises(WeightsError, match="cannot download .*404"):
        fetch("m", WeightsSource(url=server.url("/missing.pth"), sha256_prefix=PREFIX),
              progress=False)
    closed = server.url("/x.pth")
    server.close()
    with pytest.raises(WeightsError, match="cannot download"):
        fetch("m", WeightsSource(url=closed, sha256_prefix=PREFIX), progress=False, timeout=5)
    assert _leftovers() == []


def test_cli_fetch_and_list(server: _Server, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    spec = dataclasses.replace(MODELS["efficientnet_lite0"], name="served",
                               weights=WeightsSource(url=server.url(f"/served-{PREFIX}.pth"),
                                                     sha256_prefix=PREFIX))
    broken = dataclasses.replace(spec, name="broken", weights=WeightsSource(
        url=server.url(f"/corrupt/broken-{PREFIX}.pth"), sha256_prefix=PREFIX))
    monkeypatch.setitem(MODELS, "served", spec)
    monkeypatch.setitem(MODELS, "broken", broken)

    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "served" in listing and "missing" in listing
    assert main(["weights", "fetch", "served", "broken", "-q"]) == 1
    captured = capsys.readouterr()
    assert f"served-{PREFIX}.pth" in captured.out
    assert "broken" in captured.err and "refused" in captured.err
    assert main(["weights", "list"]) == 0
    assert f"present  {cache_dir() / f'served-{PREFIX}.pth'}" in capsys.readouterr().out
    assert main(["weights", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
