"""Helpers for the Ray tests: a private multi-node cluster on 127.0.0.1, tiny jobs, manifests.

Every cluster here is started by the test that uses it, in its own short temporary folder, and
shut down by handle; nothing here runs ``ray stop`` or touches another Ray instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

#: The same for every process of a test cluster (Ray refuses mixed authentication modes).
#: Off, because the token would live in ~/.ray, outside the test's own folder.
AUTH_MODE = "disabled"

#: Cheap but not instant: about 0.1 s an item on a 2-core CPU, so a unit of 3-4 items is still
#: in flight when a test pulls a node or the driver out from under it; 1-3 s to compile.
TINY_DREAM = {"layers": "block0", "octaves": 1, "steps": 20, "jitter": 4, "seed": 0}
TINY_SIDE = 96


def ray_environment(tmp: str) -> dict[str, str]:
    """Environment variables for every process of a test cluster and its drivers.

    ``RAY_TMPDIR``: the cluster's sessions, sockets and address file stay in ``tmp``, away from
    any other Ray instance on the machine. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray then
    takes the loopback address as this node's IP, so ``ray.init(address="127.0.0.1:port")``
    connects to the 127.0.0.1 nodes instead of being rewritten to the machine's public IP,
    where nothing of the test cluster listens (on Linux the flag changes nothing else).
    """
    return {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": AUTH_MODE,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "JAX_PLATFORMS": "cpu"}


@contextlib.contextmanager
def private_ray_environment() -> Iterator[dict[str, str]]:
    """A short temporary folder (Unix socket paths are limited to 107 bytes) with the
    environment of :func:`ray_environment` set in this process, both undone on exit."""
    import ray._private.ray_constants as ray_constants

    tmp = tempfile.mkdtemp(prefix="jdray", dir="/tmp")
    env = ray_environment(tmp)
    saved = {key: os.environ.get(key) for key in env}
    # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported; say it again here.
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield env
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def start_cluster(worker_nodes: int = 2) -> Any:
    """A head node without CPUs (so no worker lands on it and every worker node can be pulled)
    and ``worker_nodes`` nodes of one CPU each, all on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        for _ in range(worker_nodes):
            add_worker_node(cluster)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def add_worker_node(cluster: Any) -> Any:
    return cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")


def write_images(folder: Path, count: int, *, side: int = TINY_SIDE, seed: int = 0) -> list[Path]:
    """``count`` distinct noise PNGs of ``side`` x ``side`` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_config(path: Path, inputs: Sequence[str] | str, output: Path, *,
                 job: Mapping[str, Any] | None = None, dream: Mapping[str, Any] | None = None,
                 max_side: int = TINY_SIDE) -> Path:
    config = {"inputs": inputs if isinstance(inputs, str) else list(inputs),
              "output": str(output), "max_side": max_side, "dream": dict(dream or TINY_DREAM),
              "job": {"unit_size": 3, "retries": 3, **(job or {})}}
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def manifest_rows(outdir: Path) -> list[dict[str, Any]]:
    """Every row of ``outdir``'s manifest; a torn last line (a killed driver) is left out."""
    path = outdir / "manifest.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def run_cli(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``jaxdream run ARGS`` in a fresh process, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "jaxdream.cli", "run", *args],
                          env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def start_cli(args: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None,
              stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "jaxdream.cli", "run", *args],
                            env={**os.environ, **env}, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=stderr)
