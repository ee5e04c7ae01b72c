"""cluster/ is complete: every file parses, the launcher configs pass Ray's own schema, and
every command that submits a job names the real entry point with a config that exists."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws-gpu.yaml", "gcp-tpu.yaml"]
#: `jaxdream run CONFIG ...` as written in a command (a YAML string or a README/comment line).
RUN_COMMAND = re.compile(r"\bjaxdream run ([^\s\\]+)")


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))


def _check_run_commands(text: str, where: str) -> int:
    """Every `jaxdream run CONFIG` in ``text`` names a config of configs/ that loads."""
    from jaxdream.config import load_config

    found = RUN_COMMAND.findall(text)
    for config in found:
        assert config.startswith("configs/") and (ROOT / config).is_file(), (where, config)
        load_config(ROOT / config)  # parses and validates: the job would start
    return len(found)


def test_every_cluster_file_is_there_and_parses() -> None:
    names = {path.name for path in CLUSTER.iterdir()}
    assert {*LAUNCHERS, "kuberay-rayjob.yaml", "runtime_env.yaml", "Dockerfile",
            "README.md"} <= names
    for name in names:
        if name.endswith(".yaml"):
            assert isinstance(_load(name), dict), name


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_pass_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    validate_config(prepare_config(copy.deepcopy(config)))
    # The schema is strict, so the check above means something:
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config({**copy.deepcopy(config), "setup_comands": []}))
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    setup = " ".join(config["setup_commands"] + config.get("worker_setup_commands", []))
    # The project with its bucket protocol (s3fs or gcsfs), so that bucket jobs need no mount.
    assert "/mnt/shared" in setup and re.search(
        r'pip install -q -e "\$HOME/jaxdream\[(s3|gcs)\]"', setup)
    assert config["file_mounts"] == {"/home/ubuntu/jaxdream": "."}
    header = "".join(line for line in (CLUSTER / name).read_text().splitlines(True)
                     if line.startswith("#"))
    assert _check_run_commands(header, name) >= 1


def test_aws_has_gpu_workers_and_gcp_tpu_workers() -> None:
    aws = _load("aws-gpu.yaml")
    workers = [t for k, t in aws["available_node_types"].items() if k != aws["head_node_type"]]
    assert [w["node_config"]["InstanceType"] for w in workers] == ["g5.xlarge"]
    assert 'jax[cuda12]' in " ".join(aws["setup_commands"])
    gcp = _load("gcp-tpu.yaml")
    workers = [t for k, t in gcp["available_node_types"].items() if k != gcp["head_node_type"]]
    assert [w["node_config"]["acceleratorType"] for w in workers] == ["v4-8"]
    assert 'jax[tpu]' in " ".join(gcp["worker_setup_commands"])


def test_kuberay_rayjob_runs_jaxdream_on_a_gpu_worker_group() -> None:
    job = _load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["jaxdream", "run"] and "--output" in words
    assert words[words.index("--output") + 1].startswith("/mnt/shared/")
    assert _check_run_commands(spec["entrypoint"], "entrypoint") == 1
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu_group,) = cluster["workerGroupSpecs"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in (cluster["headGroupSpec"]["template"]["spec"], gpu_group["template"]["spec"]):
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in mounts
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "jaxdream-shared"


def test_runtime_env_ships_the_project_and_a_shared_cache() -> None:
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    assert env["env_vars"]["JAXDREAM_CACHE"].startswith("/mnt/shared/")


def test_readme_submits_jobs_through_the_real_entry_point() -> None:
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    assert "ray job submit" in readme and "/mnt/shared/jaxdream/folder" in readme
    code = "\n".join(readme.split("```")[1::2])  # the fenced blocks: commands to copy
    assert _check_run_commands(code, "cluster/README.md") >= 1
    for name in [*LAUNCHERS, "kuberay-rayjob.yaml", "runtime_env.yaml", "Dockerfile"]:
        assert f"`{name}`" in readme, name


def test_jaxdream_run_is_the_console_script_entry_point() -> None:
    """`jaxdream` is the package's console script, and its parser has the `run` command
    that the cluster files call, with the options they use."""
    from jaxdream.cli import build_parser

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["jaxdream"] == "jaxdream.cli:main"
    args = build_parser().parse_args(["run", "configs/folder.yaml", "--output", "/mnt/x",
                                      "--address", "auto", "--resume"])
    assert (args.config, args.output, args.address, args.resume) == (
        "configs/folder.yaml", "/mnt/x", "auto", True)
