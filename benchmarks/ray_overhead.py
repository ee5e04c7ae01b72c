"""What Ray costs: the same 32 items through the engine directly and through ``jaxdream run``.

    python benchmarks/ray_overhead.py [--items 32] [--repeats 2]

Workload: 32 photos cut from the three sample photos (examples/), half 256x192 landscape and
half 192x256 portrait (two shape buckets), dreamed with classic-style settings scaled down to
run in minutes on a laptop CPU: EfficientNet-Lite0 to block5, 4 octaves of 1.4, 6 steps each,
step 1.5, jitter 16. Four runs, each in a fresh process timed from start to exit, after one
untimed run that fills the on-disk compilation cache (so every run loads its programs rather
than compiling them, as a second run of a real job does):

* ``direct``: ``plan_items`` + ``render_items`` in one process, no Ray (what ``jaxdream dream``
  does);
* ``ray, N worker(s)``: ``jaxdream run`` with a private local Ray instance and N workers
  (N = 1, 2), which adds starting Ray, starting the workers (each imports JAX and loads the
  model), shipping units and writing the manifest.

Reported: seconds and images per second per run (median of ``--repeats``), the Ray overhead as
the ratio ``ray, 1 worker`` / ``direct``, and the speed-up of 2 workers over 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DREAM = {"layers": "block5", "octaves": 4, "octave_scale": 1.4, "steps": 6, "step_size": 1.5,
         "jitter": 16, "seed": 0}

_DIRECT = """
import sys
from jaxdream.config import load_config
from jaxdream.engine import default_cache_dir, enable_compilation_cache
from jaxdream.render import plan_items, render_items
enable_compilation_cache(default_cache_dir())
items, failed = plan_items(load_config(sys.argv[1]))
report = render_items(items, overwrite=True)
assert not failed and all(o.status == "done" for o in report.outcomes), report.outcomes
"""


def make_photos(folder: Path, count: int) -> None:
    """``count`` crops of the sample photos: even ones landscape 256x192, odd ones portrait."""
    from PIL import Image

    sources = [Image.open(ROOT / "examples" / name).convert("RGB")
               for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source = sources[index % len(sources)]
        width, height = (256, 192) if index % 2 == 0 else (192, 256)
        scale = max(width / source.width, height / source.height) * (1.0 + 0.1 * (index % 5))
        resized = source.resize((round(source.width * scale), round(source.height * scale)))
        left = (index * 37) % (resized.width - width + 1)
        top = (index * 53) % (resized.height - height + 1)
        resized.crop((left, top, left + width, top + height)).save(folder / f"p{index:03d}.png")


def write_config(path: Path, photos: Path, output: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"inputs": str(photos), "output": str(output),
                                    "max_side": 256, "dream": DREAM,
                                    "job": {"unit_size": 4, "retries": 1}}))


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import ray

    work = Path(tempfile.mkdtemp(prefix="jdbench", dir="/tmp"))
    try:
        photos, config = work / "photos", work / "job.yaml"
        make_photos(photos, args.items)
        write_config(config, photos, work / "out")
        # A private Ray folder: the runs never meet another Ray instance on this machine.
        env = {**os.environ, "RAY_TMPDIR": str(work), "JAX_PLATFORMS": "cpu"}
        direct = [sys.executable, "-c", _DIRECT, str(config)]

        def run(workers: int) -> list[str]:
            return [sys.executable, "-m", "jaxdream.cli", "run", str(config), "-q",
                    "--workers", str(workers)]

        print(f"machine: {machine_line()}; python "
              f"{platform.python_version()}, jax {jax.__version__}, ray {ray.__version__}")
        print(f"workload: {args.items} photos (half 256x192, half 192x256), efficientnet_lite0 "
              f"to {DREAM['layers']}, {DREAM['octaves']} octaves x {DREAM['steps']} steps, "
              f"unit_size 4, compilation cache warm; each run a fresh process, median of "
              f"{args.repeats}")
        timed(direct, env)  # fills the compilation cache; not timed
        results: dict[str, float] = {}
        for name, command in (("direct", direct), ("ray, 1 worker", run(1)),
                              ("ray, 2 workers", run(2))):
            results[name] = statistics.median(timed(command, env) for _ in range(args.repeats))
            print(f"  {name:15s} {results[name]:7.1f} s  {args.items / results[name]:6.2f} img/s",
                  flush=True)
        overhead = results["ray, 1 worker"] / results["direct"]
        speedup = results["ray, 1 worker"] / results["ray, 2 workers"]
        print(f"Ray overhead (ray, 1 worker / direct): {overhead:.2f}x")
        print(f"2 workers vs 1 (speed-up): {speedup:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
