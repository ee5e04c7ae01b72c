"""Whole-command CPU wall time: jaxdream against the tools people already use, same run.

    python benchmarks/peers.py                       # everything (about 30 min on 2 cores)
    python benchmarks/peers.py --jobs one,googlenet  # a subset
    python benchmarks/peers.py --big                 # also 100 photos of 200-1600 px
    python benchmarks/peers.py --jobs mixed --tiles 128  # also the opt-in tile engine
    python benchmarks/peers.py --jobs mixed --tiles 128 --tiles-only --before COMMIT
                                                     # tile engine, new against old
    python benchmarks/peers.py --jobs vgg16,one --exact  # also photos at their exact size
    python benchmarks/peers.py --jobs lite0 --tiles 128 --rounds 3  # medians of 3 rounds

Every figure is a whole process (or one process per photo, as the peer's README runs it), timed
from outside, on the same photos with the same settings; jaxdream runs "cold" (an empty cache
folder: every program traced and compiled) and "warm" (the same folder again).

The peers:

- **pytorch-deepdream** (gordicaleksa/pytorch-deepdream at the pinned commit below), run from
  its own source in a scratch folder outside this repository, with its own virtual environment
  (torch, torchvision, OpenCV, SciPy, Matplotlib from PyPI). It builds torchvision's models
  with ``pretrained=True``; this script writes *random* weights of the right shapes into the
  scratch ``TORCH_HOME`` under the file names torchvision looks for, so nothing is downloaded
  and nothing in its source is changed (random weights cost the same time as trained ones).
  jaxdream loads the same checkpoint files. Its settings: ``--pyramid_size 4
  --pyramid_ratio 1.8 --num_gradient_ascent_iterations 10`` with its Gaussian smoothing, which
  is jaxdream's ``--preset smooth --octaves 4 --octave-scale 1.8``.
- **an eager PyTorch loop** of jaxdream's classic dream with EfficientNet-Lite0 (the same
  checkpoint; the network is benchmarks/_common.py's port), one process for the whole folder,
  reading and writing the images as jaxdream does.

Set-up (done by the script, once): ``--peer-source`` is a git directory or URL of
pytorch-deepdream (default: a local mirror if there is one, else GitHub); the commit is
``git archive``d into ``--scratch`` (default ``$TMPDIR/jaxdream-peers``) and a venv is made
there with ``python3 -m venv`` and ``pip install``. Photos are made from ``examples/*.jpg``
(crops, flips and resizes) in a temporary folder; nothing else is read or downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_COMMIT = "f37d99a1fa0cafa94aa99d9384026292a3c9bb6c"
PEER_URL = "https://github.com/gordicaleksa/pytorch-deepdream"
PEER_MIRROR = Path("/work/.mirror/gordicaleksa+pytorch-deepdream/repo")
PEER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "opencv-python-headless", "numpy",
                 "scipy", "matplotlib", "imageio"]
JOBS = ("googlenet", "vgg16", "lite0", "one", "mixed")


class Result(NamedTuple):
    """One jaxdream run of one job in one round, with the peer's time of that round."""
    work: str
    label: str
    seconds: float
    peer_name: str
    peer_seconds: float


def load() -> str:
    """The machine's load average (1, 5, 15 min): these runs share their cores."""
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def timed(command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
          ) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


# ------------------------------------------------------------------------------------ set-up
def setup_peer(scratch: Path, source: str) -> Path:
    """pytorch-deepdream's source at PEER_COMMIT and a venv for it, under ``scratch``."""
    tree = scratch / f"pytorch-deepdream-{PEER_COMMIT[:7]}"
    if not (tree / "deepdream.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        git_dir = source
        if not Path(source).exists():
            git_dir = str(scratch / "clone.git")
            if not Path(git_dir).exists():
                subprocess.run(["git", "clone", "--bare", source, git_dir], check=True)
        # Only the code it runs (snapshots may lack the large notebook and sample images).
        archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", PEER_COMMIT,
                                  "deepdream.py", "models", "utils", "LICENCE", "README.md"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    venv = scratch / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEER_PACKAGES], check=True)
    return tree


def random_checkpoints(scratch: Path) -> dict[str, Path]:
    """Random torchvision weights under the names torchvision downloads to (so the peer finds
    them in TORCH_HOME and downloads nothing); returns model -> checkpoint file."""
    home = scratch / "torch_home"
    script = f"""
import json, os, torch, torchvision
from torchvision import models
out = {{}}
for name, weights, kwargs in [("googlenet", models.GoogLeNet_Weights.DEFAULT,
                               dict(aux_logits=True, init_weights=True, transform_input=True)),
                              ("vgg16", models.VGG16_Weights.DEFAULT, {{}})]:
    path = os.path.join({str(home)!r}, "hub", "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(0)
        torch.save(getattr(models, name)(weights=None, **kwargs).state_dict(), path)
    out[name] = path
print(json.dumps(out))
"""
    done = subprocess.run([str(scratch / "venv" / "bin" / "python"), "-c", script], check=True,
                          capture_output=True, text=True)
    return {name: Path(path) for name, path in json.loads(done.stdout.splitlines()[-1]).items()}


def make_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Photos of the given (width, height) cut from examples/*.jpg: random crops of the right
    aspect, flipped every other time, resized with Lanczos."""
    from PIL import Image, ImageOps

    sources = [Image.open(path).convert("RGB") for path in sorted((REPO / "examples").glob(
        "*.jpg"))]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (width, height) in enumerate(sizes):
        source = sources[index % len(sources)]
        aspect = width / height
        crop_w = min(source.width, source.height * aspect) * rng.uniform(0.8, 1.0)
        crop_w = min(source.width, max(1, round(crop_w)))
        crop_h = min(source.height, max(1, round(crop_w / aspect)))
        left = int(rng.integers(0, source.width - crop_w + 1))
        top = int(rng.integers(0, source.height - crop_h + 1))
        image = source.crop((left, top, left + crop_w, top + crop_h)).resize(
            (width, height), Image.Resampling.LANCZOS)
        if index % 2:
            image = ImageOps.mirror(image)
        path = folder / f"photo_{index:03d}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ runners
def run_jaxdream(inputs: list[Path], args: list[str], cache: Path, out: Path,
                 root: Path = REPO) -> tuple[float, str]:
    """One ``jaxdream dream`` process (the code under ``root``); returns wall seconds and its
    'built ...' summary."""
    seconds, text = timed([sys.executable, "-m", "jaxdream.cli", "dream", *map(str, inputs),
                           "-o", str(out), "-q", "--overwrite", *args],
                          env={"JAXDREAM_CACHE": str(cache), "PYTHONPATH": str(root)},
                          cwd=root)  # `python -m` puts the working folder first on sys.path
    match = re.search(r"built (\d+) program\(s\) in ([\d.]+) s \(([^)]*)\)", text)
    built = f"{match.group(1)} programs in {match.group(2)} s ({match.group(3)})" if match else "?"
    return seconds, built


def run_peer(tree: Path, scratch: Path, inputs: list[Path], model: str, layer: str
             ) -> float:
    """pytorch-deepdream, one process per photo, as its README runs it."""
    total = 0.0
    for path in inputs:
        seconds, _ = timed([str(scratch / "venv" / "bin" / "python"), "deepdream.py",
                            "--input", str(path), "--img_width", "600", "--model_name", model,
                            "--layers_to_use", layer, "--pyramid_size", "4", "--pyramid_ratio",
                            "1.8", "--num_gradient_ascent_iterations", "10"], cwd=tree,
                           env={"TORCH_HOME": str(scratch / "torch_home")})
        total += seconds
    return total


EAGER_WORKER = r'''
import sys, json, types, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])  # benchmarks/ (for _common) and the repo (jaxdream.images)
sys.path.insert(0, sys.argv[2])
import numpy as np, torch, torch.nn.functional as F
from _common import _classic_step, torch_lite
from jaxdream.images import load_rgb, save_png, to_uint8
spec = json.loads(sys.argv[3])
torch.set_num_threads(spec["threads"])
state = {k: v.numpy() for k, v in torch.load(spec["weights"], weights_only=True).items()}
config = types.SimpleNamespace(blocks=lambda: [types.SimpleNamespace(**b) for b in spec["blocks"]])
forward = torch_lite(state, config, spec["layer"])

def shapes(h, w, octaves, scale):  # jaxdream.dream.octave_shapes (no jax import here)
    out = [(h, w)]
    for _ in range(octaves - 1):
        out.append((max(1, round(out[-1][0] / scale)), max(1, round(out[-1][1] / scale))))
    return out

out_dir = Path(spec["out"]); out_dir.mkdir(parents=True, exist_ok=True)
for path in spec["inputs"]:
    image = load_rgb(path, max_side=spec["max_side"])
    x0 = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32))
    generator = torch.Generator().manual_seed(0)
    bases = [x0]
    for s in shapes(x0.shape[2], x0.shape[3], 4, 1.4)[1:]:
        bases.append(F.interpolate(bases[-1], size=s, mode="bilinear", align_corners=False))
    detail = torch.zeros_like(bases[-1])
    for rank, base in enumerate(reversed(bases)):
        if rank:
            detail = F.interpolate(detail, size=base.shape[2:], mode="bilinear",
                                   align_corners=False)
        x = base + detail
        for _ in range(10):
            x = _classic_step(forward, x, generator, 1.5, 32)
        detail = x - base
    save_png(out_dir / (Path(path).stem + "_dream.png"),
             to_uint8(x[0].numpy().transpose(1, 2, 0)), {})
'''


def run_eager_lite0(inputs: list[Path], max_side: int, out: Path) -> float:
    """The classic Lite0 dream of every input in one eager PyTorch process."""
    sys.path.insert(0, str(REPO))
    from jaxdream.models.efficientnet_lite import LITE0
    from jaxdream.models.weights import locate
    from jaxdream.models import MODELS

    blocks = [{"expand_ratio": b.expand_ratio, "stride": b.stride,
               "in_channels": b.in_channels, "out_channels": b.out_channels}
              for b in LITE0.blocks()]
    spec = {"weights": str(locate(MODELS["efficientnet_lite0"].weights)), "blocks": blocks,
            "layer": 10, "inputs": [str(p) for p in inputs], "max_side": max_side,
            "out": str(out), "threads": os.cpu_count() or 1}
    seconds, _ = timed([sys.executable, "-c", EAGER_WORKER, str(REPO / "benchmarks"), str(REPO),
                        json.dumps(spec)])
    return seconds


# ------------------------------------------------------------------------------------ jobs
def compare(name: str, work: str, peer_name: str, peer_seconds: float,
            jax_runs: list[tuple[str, float, str]], results: list[Result],
            round_tag: str = "") -> None:
    now = {label: seconds for label, seconds, _ in jax_runs}
    for label, seconds, built in jax_runs:
        results.append(Result(work, label, seconds, peer_name, peer_seconds))
        ratio = "-" if peer_seconds != peer_seconds else f"{seconds / peer_seconds:.2f}"
        if " " in label and not label.startswith("--"):  # an older jaxdream (--before):
            # also say how much faster now is
            ratio += f" (now / this: {now[label.split(' ', 1)[1]] / seconds:.2f})"
        peer = "not run" if peer_seconds != peer_seconds else f"{peer_seconds:.1f} s"
        print(f"| {work} | {label}{round_tag} | {seconds:.1f} s | {peer_name}: {peer} | "
              f"{ratio} | {built} | {load()} |", flush=True)


def print_medians(results: list[Result]) -> None:
    """One row per job and jaxdream run: the median over rounds of its time, of the peer's and
    of their same-round ratio (each ratio is taken within its round, then the median)."""
    grouped: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        grouped.setdefault((result.work, result.label), []).append(result)
    print(f"\nmedians over {max(len(v) for v in grouped.values())} rounds (each ratio is "
          "jaxdream over the peer of the same round):")
    print("| job | jaxdream run | jaxdream | peer | jaxdream / peer | the rounds' ratios |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for (work, label), rows in grouped.items():
        ratios = [r.seconds / r.peer_seconds for r in rows]
        print(f"| {work} | {label} | {statistics.median(r.seconds for r in rows):.1f} s | "
              f"{rows[0].peer_name}: {statistics.median(r.peer_seconds for r in rows):.1f} s "
              f"| {statistics.median(ratios):.2f} | {', '.join(f'{x:.2f}' for x in ratios)} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"subset of {','.join(JOBS)}")
    parser.add_argument("--big", action="store_true",
                        help="also 100 photos of 200-1600 px at max side 1024 (long)")
    parser.add_argument("--scratch", type=Path,
                        default=Path(tempfile.gettempdir()) / "jaxdream-peers")
    parser.add_argument("--peer-source", default=str(PEER_MIRROR) if PEER_MIRROR.exists()
                        else PEER_URL, help="git directory or URL of pytorch-deepdream")
    parser.add_argument("--before", metavar="COMMIT",
                        help="also time jaxdream at this commit of this repository (git "
                             "archive into the scratch folder), same photos, same run")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the peers (with --before: old against new jaxdream only)")
    parser.add_argument("--tiles", type=int, default=0, metavar="T",
                        help="also time the Lite0 jobs with the opt-in tile engine (--tiles T)"
                             ", cold and warm, in the same run")
    parser.add_argument("--tiles-only", action="store_true",
                        help="with --tiles: time the Lite0 jobs with the tile engine only "
                             "(and --before's tile engine), not the whole-image engine")
    parser.add_argument("--exact", action="store_true",
                        help="also time every job with --shape-bucket 1 (each photo dreamed "
                             "at its exact size, no bucket padding), cold and warm")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="run every job N times in turn (the peer, then jaxdream cold and "
                             "warm, each round with fresh caches) and end with each run's "
                             "median time and median same-round ratio: this machine's noise "
                             "moves single runs by 10-30%%")
    parser.add_argument("--smoke", action="store_true",
                        help="one photo per job: checks the set-up, times nothing useful")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    jobs = args.jobs.split(",")
    few = (lambda sizes: sizes[:1]) if args.smoke else (lambda sizes: sizes)

    print(f"machine: {machine_line()}; load at start {load()}")
    print(f"python {sys.version.split()[0]}; peer pytorch-deepdream@{PEER_COMMIT[:7]} with "
          f"{' '.join(PEER_PACKAGES[:2])}")
    args.scratch.mkdir(parents=True, exist_ok=True)
    before = None
    if args.before:
        before = args.scratch / f"jaxdream-{args.before[:10]}"
        if not before.is_dir():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "jaxdream"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)

    def jaxdream_runs(photos: list[Path], flags: list[str], name: str, tiles: int = 0
                      ) -> list[tuple[str, float, str]]:
        runs = []
        variants = [] if tiles and args.tiles_only else [("", REPO, [])] + (
            [(f"{args.before[:7]} ", before, [])] if before else [])
        if args.exact:
            variants.append(("--shape-bucket 1 ", REPO, ["--shape-bucket", "1"]))
        if tiles:
            variants.append((f"--tiles {tiles} ", REPO, ["--tiles", str(tiles)]))
            if before:
                variants.append((f"{args.before[:7]} --tiles {tiles} ", before,
                                 ["--tiles", str(tiles)]))
        for tag, root, extra in variants:
            cache = work / f"{name}_{tag.strip().replace(' ', '')}cache"
            for label in ("cold", "warm"):
                seconds, built = run_jaxdream(photos, flags + extra, cache,
                                              work / f"{name}_out", root)
                runs.append((tag + label, seconds, built))
        return runs
    base = Path(tempfile.mkdtemp(prefix="peers-"))
    results: list[Result] = []
    print("| job | jaxdream run | jaxdream | peer | jaxdream / peer | programs built | "
          "load (1, 5, 15 min) |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    try:
        if {"googlenet", "vgg16"} & set(jobs):
            tree = setup_peer(args.scratch, args.peer_source)
            weights = random_checkpoints(args.scratch)
        for round_index in range(args.rounds):
            # Fresh photos folder and caches each round: every round's "cold" is cold.
            work = base / f"round{round_index}"
            work.mkdir()
            round_tag = f" (round {round_index + 1})" if args.rounds > 1 else ""
            for model, layer, peer_model, peer_layer, count in [
                    ("googlenet", "inception4c", "GOOGLENET", "inception4c", 8),
                    ("vgg16", "conv4_3", "VGG16", "relu4_3", 4)]:
                if model not in jobs:
                    continue
                photos = make_photos(work / f"{model}_in", few([(600, 400)] * count))
                peer = (float("nan") if args.no_peer
                        else run_peer(tree, args.scratch, photos, peer_model, peer_layer))
                flags = ["--model", model, "--weights", str(weights[model]), "--layers", layer,
                         "--preset", "smooth", "--octaves", "4", "--octave-scale", "1.8",
                         "--max-side", "600"]
                runs = jaxdream_runs(photos, flags, model)
                compare(model, f"{model} {layer}, {count} photos 600x400, smooth, 4 octaves "
                        "x 1.8", "pytorch-deepdream, a process per photo", peer, runs, results,
                        round_tag)
            lite_jobs = []
            if "lite0" in jobs:
                lite_jobs.append(("lite0", "Lite0 block10, 8 photos 512x384, classic",
                                  [(512, 384)] * 8, 1024))
            if "one" in jobs:
                lite_jobs.append(("one", "one photo (examples/chelsea.jpg), classic Lite0",
                                  None, 1024))
            if "mixed" in jobs:
                rng = np.random.default_rng(1)
                lite_jobs.append(("mixed", "24 photos of 300-800 px, max side 512, classic Lite0",
                                  [tuple(int(v) for v in rng.integers(300, 801, 2))
                                   for _ in range(24)], 512))
            if args.big:
                rng = np.random.default_rng(2)
                lite_jobs.append(("mixed100", "100 photos of 200-1600 px, max side 1024, classic "
                                  "Lite0", [tuple(int(v) for v in rng.integers(200, 1601, 2))
                                            for _ in range(100)], 1024))
            for name, description, sizes, max_side in lite_jobs:
                photos = ([REPO / "examples" / "chelsea.jpg"] if sizes is None
                          else make_photos(work / f"{name}_in", few(sizes)))
                eager = (float("nan") if args.no_peer
                         else run_eager_lite0(photos, max_side, work / f"{name}_eager"))
                runs = jaxdream_runs(photos, ["--max-side", str(max_side)], name, args.tiles)
                compare(name, description, "eager PyTorch, one process", eager, runs, results,
                        round_tag)
        if args.rounds > 1:
            print_medians(results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load at end {load()}")


if __name__ == "__main__":
    main()
