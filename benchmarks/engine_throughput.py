"""What the engine buys on CPU: batch sizes, one program for a whole grid, few programs for a
folder of mixed sizes. Each part prints its workload, the machine and ratios against a baseline
measured in the same run.

    python benchmarks/engine_throughput.py                 # all three parts (~20 min, 2 cores)
    python benchmarks/engine_throughput.py batch           # 1. img/s against batch size
    python benchmarks/engine_throughput.py grid            # 2. a 16-setting grid: one engine
                                                           #    against 16 CLI runs
    python benchmarks/engine_throughput.py buckets         # 3. programs for 50 mixed-size photos,
                                                           #    then again from the disk cache

1. **Batch size.** EfficientNet-Lite0 (embedded weights) at its default layer, classic settings
   (4 octaves at 1.4, jitter 32, step 1.5) with ``--steps`` steps per octave on ``--images``
   photos of ``--size`` square, rendered by one Engine per batch size. Compiling is excluded
   from the timings (a warm-up batch first) and reported on its own line. Baseline: batch 1.
2. **Grid.** 16 settings (4 step sizes x 4 weights of block10 against block8, as
   configs/grid.yaml) on examples/chelsea.jpg at ``--grid-side``. ``jaxdream dream --config``
   renders them through one engine (one compiled program); the baselines are what sweeping by
   hand costs: 16 ``jaxdream dream`` runs, (a) each with an empty compilation cache (as with no
   cache), (b) sharing one cache that starts empty (the CLI's default behaviour: the first run
   compiles, the others load), (c) with that cache warm. Every one is a fresh process, timed
   wall-clock from start to exit, with ``JAXDREAM_CACHE`` pointing at a temporary folder. The
   16 outputs of the grid are compared pixel for pixel with the 16 single runs.
3. **Buckets.** 50 crops/resizes of examples/*.jpg, sides 200..1000 px at random, dreamed at
   max side 256 (``--bucket-octaves`` octaves x 2 steps) by one Engine with the default bucket
   (64 px) in a fresh process with an empty compilation cache; then the same again in a second
   fresh process with that cache. Reported: buckets, programs built, programs XLA compiled
   afresh (``CompileStats.compiled``), and the check programs <= buckets x static settings, and
   compiled == 0 on the second run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHELSEA = ROOT / "examples" / "chelsea.jpg"
STEP_SIZES = (0.5, 1.0, 1.5, 2.0)
BLOCK10_WEIGHTS = (0.25, 1.0, 2.0, 4.0)


def machine() -> str:
    import jax

    return (f"machine: {machine_line()}; jax {jax.__version__} ({jax.default_backend()}), "
            f"python {platform.python_version()}, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def jaxdream_cli() -> list[str]:
    exe = Path(sys.executable).with_name("jaxdream")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxdream.cli"]


# --------------------------------------------------------------------------- 1. batch size
def part_batch(args: argparse.Namespace) -> None:
    from PIL import Image

    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import Engine, ItemParams
    from jaxdream.models import load_model

    batches = [int(b) for b in args.batches.split(",")]
    model = load_model("efficientnet_lite0")
    layer = model.spec.default_layers
    settings = StaticSettings((layer,), octaves=4, octave_scale=1.4, steps=args.steps)
    photo = np.asarray(Image.open(CHELSEA).convert("RGB").resize((args.size, args.size),
                                                                 Image.LANCZOS), np.float32)
    print("\n== 1. throughput against batch size ==")
    print(machine())
    print(f"workload: EfficientNet-Lite0 to {layer}, {args.size}x{args.size} "
          f"(examples/chelsea.jpg resized), 4 octaves x {args.steps} steps, jitter 32, step 1.5;"
          f" {args.images} images per timed render (images/batch compiled calls), median of "
          f"{args.repeats} interleaved renders; compile excluded")
    engines = {}
    images = [photo] * args.images
    params = [ItemParams(1.5, 32, seed, (1.0,)) for seed in range(args.images)]
    for batch in batches:
        engines[batch] = Engine(model, settings, batch_size=batch)
        engines[batch].render(images[:batch], params[:batch])  # compiles, then one call
    # Batch sizes take turns, so a burst of load from elsewhere on a shared machine falls on
    # all of them alike rather than on one.
    times: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(args.repeats):
        for batch in batches:
            start = time.perf_counter()
            engines[batch].render(images, params)
            times[batch].append(time.perf_counter() - start)
    rates = {batch: args.images / statistics.median(times[batch]) for batch in batches}
    for batch in batches:
        print(f"batch {batch}: {rates[batch]:6.3f} img/s ({1 / rates[batch]:5.2f} s/img; "
              f"renders {', '.join(f'{t:.1f}' for t in times[batch])} s), ratio vs batch "
              f"{batches[0]}: {rates[batch] / rates[batches[0]]:.2f} (best-of ratio "
              f"{min(times[batches[0]]) / min(times[batch]):.2f}); compile "
              f"{engines[batch].stats.seconds:.1f} s")


# --------------------------------------------------------------------------------- 2. grid
def _timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def _cli_sweep(work: Path, name: str, shared_cache: Path | None, args: argparse.Namespace
               ) -> tuple[float, list[float], list[Path]]:
    """16 `jaxdream dream` runs, one per setting; the cache is per run unless shared."""
    times, outputs = [], []
    for index, (step, weight) in enumerate((s, w) for s in STEP_SIZES for w in BLOCK10_WEIGHTS):
        cache = shared_cache or work / f"{name}_cache_{index:02d}"
        env = {**os.environ, "JAXDREAM_CACHE": str(cache)}
        outdir = work / f"{name}_{index:02d}"
        command = [*jaxdream_cli(), "dream", str(CHELSEA), "-o", str(outdir), "-q", "--overwrite",
                   "--layers", f"block8:1,block10:{weight:g}", "--step-size", f"{step:g}",
                   "--max-side", str(args.grid_side), "--octaves", str(args.grid_octaves),
                   "--steps", str(args.grid_steps), "--seed", "0"]
        times.append(_timed(command, env))
        outputs.append(outdir / "chelsea_dream.png")
    return sum(times), times, outputs


def part_grid(args: argparse.Namespace) -> None:
    from PIL import Image

    from jaxdream.images import read_recipe

    print("\n== 2. a 16-setting grid: one engine against 16 separate CLI runs ==")
    print(machine())
    print(f"workload: examples/chelsea.jpg at max side {args.grid_side}, EfficientNet-Lite0, "
          f"layers block8:1,block10:w, w in {list(BLOCK10_WEIGHTS)} x step size in "
          f"{list(STEP_SIZES)}, {args.grid_octaves} octaves x {args.grid_steps} steps, seed 0, "
          f"default batch size; every figure is the wall-clock of fresh processes "
          f"(start-up, model load, compile or cache load, dream, PNG write)")
    with tempfile.TemporaryDirectory(prefix="jaxdream_grid_") as tmp:
        work = Path(tmp)
        config = work / "grid.yaml"
        layers = [f'"block8:1,block10:{w:g}"' for w in BLOCK10_WEIGHTS]
        config.write_text(
            f"inputs: {CHELSEA}\noutput: {work / 'grid'}\nmax_side: {args.grid_side}\n"
            f"dream:\n  preset: classic\n  seed: 0\n  octaves: {args.grid_octaves}\n"
            f"  steps: {args.grid_steps}\n"
            f"grid:\n  step_size: [{', '.join(f'{s:g}' for s in STEP_SIZES)}]\n"
            f"  layers: [{', '.join(layers)}]\n")
        env = {**os.environ, "JAXDREAM_CACHE": str(work / "grid_cache")}
        grid_seconds = _timed([*jaxdream_cli(), "dream", "--config", str(config), "-q",
                               "--overwrite"], env)
        grid_outputs = sorted((work / "grid").glob("chelsea_dream_*.png"))
        print(f"one engine (jaxdream dream --config, empty cache): {grid_seconds:7.1f} s for "
              f"{len(grid_outputs)} outputs")

        rows: list[tuple[str, float, list[float]]] = []
        if not args.skip_cold:
            total, times, cold_outputs = _cli_sweep(work, "cold", None, args)
            rows.append(("16 CLI runs, each with an empty cache", total, times))
        shared = work / "shared_cache"
        total, times, shared_outputs = _cli_sweep(work, "shared", shared, args)
        rows.append(("16 CLI runs, one cache starting empty", total, times))
        total, times, _ = _cli_sweep(work, "warm", shared, args)
        rows.append(("16 CLI runs, warm cache", total, times))
        for label, total, times in rows:
            print(f"{label:40s}: {total:7.1f} s (per run median {statistics.median(times):.1f} s,"
                  f" first {times[0]:.1f} s), ratio to one engine: {total / grid_seconds:.2f}")

        reference = cold_outputs if not args.skip_cold else shared_outputs
        worst = 0
        for ours, theirs in zip(grid_outputs, reference, strict=True):
            # Same setting on both sides (the grid's variants are numbered step-size-major).
            mine, single = read_recipe(ours), read_recipe(theirs)
            assert (mine["step_size"], mine["layers"]) == (single["step_size"],
                                                           single["layers"]), (mine, single)
            a = np.asarray(Image.open(ours).convert("RGB"), np.int16)
            b = np.asarray(Image.open(theirs).convert("RGB"), np.int16)
            worst = max(worst, int(np.abs(a - b).max()))
        print(f"grid outputs against the single runs: max |difference| {worst} (of 255) over "
              f"{len(grid_outputs)} image pairs")


# ------------------------------------------------------------------------------ 3. buckets
def make_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` crops/resizes of examples/*.jpg, each side 200..1000 px at random."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples").glob("*.jpg"))]
    for index in range(count):
        source = sources[index % len(sources)]
        width, height = (int(v) for v in rng.integers(200, 1001, size=2))
        # A random crop of the source with the target's aspect ratio, then resized.
        aspect = width / height
        crop_w = min(source.width, round(source.height * aspect))
        crop_h = min(source.height, round(crop_w / aspect))
        crop_w = min(source.width, round(crop_h * aspect))
        left = int(rng.integers(0, source.width - crop_w + 1))
        top = int(rng.integers(0, source.height - crop_h + 1))
        photo = source.crop((left, top, left + crop_w, top + crop_h)).resize((width, height),
                                                                             Image.LANCZOS)
        photo.save(folder / f"photo_{index:02d}.jpg", quality=90)


def bucket_child(folder: str, octaves: int, steps: int, max_side: int) -> dict[str, Any]:
    """Runs in a fresh process: dreams every photo of ``folder``, returns the engine's count."""
    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import (DEFAULT_BUCKET, Engine, ItemParams, default_batch_size,
                                 default_cache_dir, enable_compilation_cache)
    from jaxdream.images import load_rgb
    from jaxdream.models import load_model

    enable_compilation_cache(default_cache_dir())  # under $JAXDREAM_CACHE, set by the parent
    model = load_model("efficientnet_lite0")
    settings = StaticSettings((model.spec.default_layers,), octaves=octaves, steps=steps)
    images = [load_rgb(str(path), max_side=max_side) for path in sorted(Path(folder).iterdir())]
    engine = Engine(model, settings, batch_size=default_batch_size(), bucket=DEFAULT_BUCKET)
    buckets = engine.buckets([image.shape for image in images])
    start = time.perf_counter()
    results = engine.render(images, [ItemParams(1.5, 32, i, (1.0,)) for i in range(len(images))])
    assert all(r.shape == i.shape for r, i in zip(results, images, strict=True))
    return {"images": len(images), "buckets": len(buckets),
            "bucket_shapes": sorted(f"{h}x{w}" for h, w in buckets),
            "shapes": len({image.shape for image in images}),
            "programs": engine.stats.programs, "compiled": engine.stats.compiled,
            "compile_seconds": engine.stats.seconds, "seconds": time.perf_counter() - start,
            "batch_size": engine.batch_size}


def part_buckets(args: argparse.Namespace) -> None:
    print("\n== 3. compiled programs for a folder of mixed-size photos ==")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="jaxdream_buckets_") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_photos(folder, args.photos)
        print(f"workload: {args.photos} crops/resizes of examples/*.jpg, sides 200..1000 px at "
              f"random, dreamed at max side {args.bucket_side}, EfficientNet-Lite0 default "
              f"layer, {args.bucket_octaves} octave(s) x {args.bucket_steps} steps, one static "
              f"setting, default bucket (64 px), default batch size; each run a fresh process, "
              f"both sharing one compilation cache that starts empty")
        env = {**os.environ, "JAXDREAM_CACHE": str(Path(tmp) / "cache")}
        runs = []
        for label in ("first run (empty cache)", "second run (same cache)"):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "_bucket_child", str(folder),
                 str(args.bucket_octaves), str(args.bucket_steps), str(args.bucket_side)],
                env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"child failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(result)
            print(f"{label}: {result['images']} images, {result['shapes']} distinct sizes, "
                  f"{result['buckets']} buckets {result['bucket_shapes']}; "
                  f"{result['programs']} programs built, {result['compiled']} compiled afresh "
                  f"({result['compile_seconds']:.1f} s building); render "
                  f"{result['seconds']:.1f} s, process {wall:.1f} s")
        first, second = runs
        static_settings = 1
        bound = first["buckets"] * static_settings
        print(f"check programs <= buckets x static settings: {first['programs']} <= {bound}: "
              f"{'OK' if first['programs'] <= bound else 'FAILED'}")
        print(f"check second run compiled nothing afresh: compiled = {second['compiled']}: "
              f"{'OK' if second['compiled'] == 0 else 'FAILED'}; building time ratio second / "
              f"first: {second['compile_seconds'] / max(first['compile_seconds'], 1e-9):.3f}")


# ------------------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_bucket_child":
        folder, octaves, steps, side = sys.argv[2:6]
        print(json.dumps(bucket_child(folder, int(octaves), int(steps), int(side))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help="batch, grid and/or buckets (default: all three)")
    parser.add_argument("--size", type=int, default=256, help="1: square side (256)")
    parser.add_argument("--steps", type=int, default=5, help="1: steps per octave (5)")
    parser.add_argument("--batches", default="1,2,4,8", help="1: batch sizes (1,2,4,8)")
    parser.add_argument("--images", type=int, default=8, help="1: images per timed render (8)")
    parser.add_argument("--repeats", type=int, default=3, help="1: timed renders (3)")
    parser.add_argument("--grid-side", type=int, default=256, help="2: max side (256)")
    parser.add_argument("--grid-octaves", type=int, default=4, help="2: octaves (4)")
    parser.add_argument("--grid-steps", type=int, default=10, help="2: steps per octave (10)")
    parser.add_argument("--skip-cold", action="store_true",
                        help="2: leave out the 16 runs with an empty cache each (the slowest)")
    parser.add_argument("--photos", type=int, default=50, help="3: photos (50)")
    parser.add_argument("--bucket-side", type=int, default=256, help="3: max side (256)")
    parser.add_argument("--bucket-octaves", type=int, default=2, help="3: octaves (2)")
    parser.add_argument("--bucket-steps", type=int, default=2, help="3: steps per octave (2)")
    args = parser.parse_args()
    parts = args.parts or ["batch", "grid", "buckets"]
    unknown = sorted(set(parts) - {"batch", "grid", "buckets"})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from batch, grid, buckets")
    if "batch" in parts:
        part_batch(args)
    if "grid" in parts:
        part_grid(args)
    if "buckets" in parts:
        part_buckets(args)


if __name__ == "__main__":
    main()
