"""A measured prototype (issue 10): one fixed-shape tile program for every photo.

    python benchmarks/tile_engine.py sweep                 # per-tile cost and compile time, T x B
    python benchmarks/tile_engine.py bench --tile 128 --batch 1   # cold/warm against the CLI
    python benchmarks/tile_engine.py bench --smoke         # one small run of each, checks set-up

The only compiled network program is ``grad of the objective over a [B, T, T, 3] batch of
tiles`` (Lite0 to ``block10``, classic L2, features centred on padding masked out as
``ascent._tiled_gradient`` does). It is jitted once per (model, layers, T, B) and kept on disk
with :mod:`jaxdream.program_cache`, so a warm run loads it untraced. Everything else (octave
pyramid, random roll, cutting tiles, pasting gradients, the classic mean-|g| normalisation, the
update and clipping) is NumPy in this process: it compiles nothing, whatever the image sizes.

The dream (classic: 4 octaves x 1.4, 10 steps, step 1.5, jitter 32):

- every octave of every image is covered by equal T x T tiles after the step's random roll
  (``ascent.tile_starts``: a grid, the last tile moved back to end at the edge, overlaps
  summed), and the roll adds a fresh 0..T offset on every side longer than T, as the engine's
  tiled mode does, so tile borders never stay put;
- a side shorter than T is padded at its end by edge replication (``np.pad(mode="edge")``, as
  the engine pads buckets) and the padding is masked out of the objective; its gradient is
  dropped;
- scheduling is step-synchronous across images: every image in flight cuts the tiles of its
  current step, all those tiles are packed into batches of B (only the round's last batch has
  empty slots, zero tiles with an all-false mask), then every image pastes its gradients and
  steps. Images in flight may be at different octaves; a finished image frees its place.

Its math (resize, roll, tile program) is the package's opt-in tile engine, ``jaxdream dream
--tiles T`` (:mod:`jaxdream.tiles`, batch 1, one image at a time); here the rounds pack the tiles
of every image in flight into batches of B. It does not reproduce the default whole-image
engine's pixels: the jitter comes from NumPy's generator and tiles see their own borders, so
outputs differ from ``jaxdream dream`` without ``--tiles`` (the report compares them). ``bench`` runs each configuration as a fresh process: "cold" with
an empty cache folder, "warm" with the same folder again, and the ``jaxdream dream`` CLI on the
same inputs in the same command, with compile counts taken from JAX's monitoring events.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

START = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

#: Installed first in every worker: counts what JAX traced, lowered and compiled (a compile
#: served by the persistent cache still fires the backend event, and also a cache-hit event).
LISTENERS = r'''
import atexit, json, sys, time
import jax.monitoring as _m
_c = {"trace_s": 0.0, "traces": 0, "lower_s": 0.0, "compile_s": 0.0, "compiles": 0,
      "xla_cache_hits": 0}
def _dur(event, seconds, **kw):
    if event == "/jax/core/compile/jaxpr_trace_duration":
        _c["trace_s"] += seconds; _c["traces"] += 1
    elif event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        _c["lower_s"] += seconds
    elif event == "/jax/core/compile/backend_compile_duration":
        _c["compile_s"] += seconds; _c["compiles"] += 1
def _ev(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        _c["xla_cache_hits"] += 1
_m.register_event_duration_secs_listener(_dur)
_m.register_event_listener(_ev)
atexit.register(lambda: print("COMPILES " + json.dumps(_c), file=sys.stderr, flush=True))
'''

CLASSIC = dict(octaves=4, scale=1.4, steps=10, step_size=1.5, jitter=32)


# ------------------------------------------------------------------------------ NumPy parts
# The dream's math lives in the package now (``tiles: T`` in a recipe, jaxdream.tiles); this
# prototype keeps its step-synchronous rounds over every image in flight, for batches B > 1.
from jaxdream.tiles import draw_shift, resize_aligned  # noqa: E402


class ImageDream:
    """The classic dream of one image, driven one step at a time from outside: ``cut`` gives
    the tiles of the current step, ``paste`` takes their gradients and makes the step."""

    def __init__(self, index: int, image: np.ndarray, tile: int, seed: int = 0) -> None:
        from jaxdream.ascent import octave_shapes

        self.index, self.tile = index, tile
        self.rng = np.random.default_rng(seed)
        shapes = octave_shapes(image.shape[0], image.shape[1], CLASSIC["octaves"],
                               CLASSIC["scale"])
        bases = [np.asarray(image, np.float32)]
        for shape in shapes[1:]:
            bases.append(resize_aligned(bases[-1], shape))
        self.bases = bases[::-1]  # smallest first
        self.rank, self.step = 0, 0
        self.x = self.bases[0].copy()
        self.done = False
        self._pending: tuple[np.ndarray, list[tuple[int, int]], int, int] | None = None

    def cut(self) -> tuple[np.ndarray, np.ndarray]:
        from jaxdream.ascent import tile_starts

        t = self.tile
        height, width = self.x.shape[:2]
        shift = draw_shift(self.rng, (height, width), CLASSIC["jitter"], t)
        rolled = np.roll(self.x, (int(shift[0]), int(shift[1])), axis=(0, 1))
        th, tw = min(t, height), min(t, width)
        starts = [(r, c) for r in tile_starts(height, th) for c in tile_starts(width, tw)]
        tiles = np.empty((len(starts), t, t, 3), np.float32)
        masks = np.zeros((len(starts), t, t), bool)
        masks[:, :th, :tw] = True
        for slot, (r, c) in enumerate(starts):
            piece = rolled[r:r + th, c:c + tw]
            if th < t or tw < t:
                piece = np.pad(piece, ((0, t - th), (0, t - tw), (0, 0)), mode="edge")
            tiles[slot] = piece
        self._pending = (shift, starts, th, tw)
        return tiles, masks

    def paste(self, grads: np.ndarray) -> None:
        assert self._pending is not None
        shift, starts, th, tw = self._pending
        grad = np.zeros_like(self.x)
        for (r, c), g in zip(starts, grads, strict=True):
            grad[r:r + th, c:c + tw] += g[:th, :tw]
        grad = np.roll(grad, (-int(shift[0]), -int(shift[1])), axis=(0, 1))
        mean = float(np.mean(np.abs(grad)))
        scale = CLASSIC["step_size"] / max(mean, float(np.finfo(np.float32).tiny))
        self.x = np.clip(self.x + np.float32(scale) * grad, 0.0, 255.0)
        self.step += 1
        if self.step == CLASSIC["steps"]:
            self.step = 0
            detail = self.x - self.bases[self.rank]
            self.rank += 1
            if self.rank == len(self.bases):
                self.done = True
            else:
                base = self.bases[self.rank]
                self.x = base + resize_aligned(detail, base.shape[:2])


# ------------------------------------------------------------------------------- JAX parts
def tile_program(graphdef, state, layers: tuple[str, ...]):  # type: ignore[no-untyped-def]
    """jit(grad of the objective over a batch of tiles): (state, tiles, masks) -> grads, the
    package's tile program (jaxdream.tiles) with classic L2 terms of weight 1 bound."""
    import jax

    from jaxdream.objectives import TermParams
    from jaxdream.tiles import tile_program as package_program

    terms = tuple(TermParams(np.float32(1.0), np.zeros((0,), np.float32),
                             np.zeros((0, 0), np.float32)) for _ in layers)
    program = package_program(graphdef, jax.tree.structure(state),
                              tuple(("l2", name) for name in layers))
    return jax.jit(lambda state, tiles, masks: program(jax.tree.leaves(state), tiles, masks,
                                                       terms))


def build_program(model, tile: int, batch: int, cache: Path | None):  # type: ignore[no-untyped-def]
    """The tile program, loaded untraced from ``cache`` if it is there; returns (program,
    seconds, loaded)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxdream import program_cache
    from jaxdream.engine import enable_compilation_cache

    graphdef, state = nnx.split(model.module)
    layers = (model.spec.default_layers,)
    jitted = tile_program(graphdef, state, layers)
    tiles = jnp.zeros((batch, tile, tile, 3), jnp.float32)
    masks = jnp.zeros((batch, tile, tile), bool)
    start = time.perf_counter()
    if cache is None:
        return jitted.lower(state, tiles, masks).compile(), state, time.perf_counter() - start, False
    enable_compilation_cache(cache)
    key = program_cache.program_key("tile_engine", graphdef, layers, tile, batch)
    program, loaded = program_cache.load_or_compile(
        key, (state, tiles, masks),
        lambda: jitted.lower(state, tiles, masks))
    return program, state, time.perf_counter() - start, loaded


def dream_all(program, state, images: list[np.ndarray], tile: int, batch: int,
              in_flight: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """Dreams every image; at most ``in_flight`` at a time share the rounds' batches."""
    import jax.numpy as jnp

    results: list[np.ndarray | None] = [None] * len(images)
    waiting = list(range(len(images)))[::-1]
    active: list[ImageDream] = []
    counts: dict[str, float] = {"rounds": 0, "tiles": 0, "batches": 0, "empty_slots": 0,
                                "numpy_s": 0.0}
    while waiting or active:
        while waiting and len(active) < in_flight:
            index = waiting.pop()
            active.append(ImageDream(index, images[index], tile, seed=0))
        start = time.perf_counter()
        cuts = [dream.cut() for dream in active]
        tiles = np.concatenate([c[0] for c in cuts])
        masks = np.concatenate([c[1] for c in cuts])
        total = len(tiles)
        slots = -(-total // batch) * batch
        if slots > total:
            tiles = np.concatenate([tiles, np.zeros((slots - total, tile, tile, 3), np.float32)])
            masks = np.concatenate([masks, np.zeros((slots - total, tile, tile), bool)])
        counts["numpy_s"] += time.perf_counter() - start
        # Dispatch every batch of the round before reading any back (JAX runs them in turn).
        pending = [program(state, jnp.asarray(tiles[s:s + batch]), jnp.asarray(masks[s:s + batch]))
                   for s in range(0, slots, batch)]
        grads = np.concatenate([np.asarray(p) for p in pending])
        counts["rounds"] += 1
        counts["tiles"] += total
        counts["batches"] += slots // batch
        counts["empty_slots"] += slots - total
        start = time.perf_counter()
        offset = 0
        for dream, (cut_tiles, _) in zip(active, cuts, strict=True):
            dream.paste(grads[offset:offset + len(cut_tiles)])
            offset += len(cut_tiles)
        for dream in [d for d in active if d.done]:
            results[dream.index] = dream.x
            active.remove(dream)
        counts["numpy_s"] += time.perf_counter() - start
    return results, counts  # type: ignore[return-value]


def worker(args: argparse.Namespace) -> None:
    """One prototype run in this process; prints a JSON line of phase times."""
    phases: dict[str, float | int | str] = {}  # (in-process phases; wall time is timed outside)
    import jax  # noqa: F401

    from jaxdream.images import load_rgb, save_png, to_uint8
    from jaxdream.models import load_model

    phases["import_s"] = time.perf_counter() - START
    start = time.perf_counter()
    model = load_model("efficientnet_lite0", None)
    images = [load_rgb(path, max_side=args.max_side) for path in args.inputs]
    phases["load_s"] = time.perf_counter() - start
    program, state, phases["program_s"], phases["program_loaded"] = build_program(
        model, args.tile, args.batch, args.cache)
    start = time.perf_counter()
    results, counts = dream_all(program, state, images, args.tile, args.batch,
                                args.in_flight or len(images))
    phases["dream_s"] = time.perf_counter() - start
    phases.update(counts)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for path, result in zip(args.inputs, results, strict=True):
        save_png(args.out / f"{Path(path).stem}.png", to_uint8(result),
                 {"prototype": "benchmarks/tile_engine.py", "tile": args.tile})
    phases["write_s"] = time.perf_counter() - start
    phases["in_process_s"] = time.perf_counter() - START
    print("PHASES " + json.dumps(phases), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ sweep
def sweep(args: argparse.Namespace) -> None:
    """Per-tile gradient time and compile time for each T and B, in this process."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdream.models import load_model

    model = load_model("efficientnet_lite0", None)
    graphdef, state = nnx.split(model.module)
    layers = (model.spec.default_layers,)
    print(f"load {os.getloadavg()}; jax {jax.__version__}; Lite0 {layers}")
    print("| T | B | trace+lower s | compile s | s per call | ms per tile | us per pixel |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tile in args.tiles:
        for batch in args.batches:
            jitted = tile_program(graphdef, state, layers)
            tiles = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (batch, tile, tile, 3)),
                                jnp.float32)
            masks = jnp.ones((batch, tile, tile), bool)
            start = time.perf_counter()
            lowered = jitted.lower(state, tiles, masks)
            traced = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            compiled_s = time.perf_counter() - start
            compiled(state, tiles, masks).block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(state, tiles, masks).block_until_ready()
                times.append(time.perf_counter() - start)
            call = statistics.median(times)
            print(f"| {tile} | {batch} | {traced:.2f} | {compiled_s:.2f} | {call:.3f} | "
                  f"{1000 * call / batch:.1f} | {1e6 * call / (batch * tile * tile):.3f} |",
                  flush=True)
    print(f"load {os.getloadavg()}")


# ------------------------------------------------------------------------------------ bench
def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(command: list[str], env: dict[str, str]) -> tuple[float, dict, dict]:
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    found: dict[str, dict] = {"COMPILES": {}, "PHASES": {}}
    for line in done.stderr.splitlines():
        for tag in found:
            if line.startswith(tag + " "):
                found[tag] = json.loads(line[len(tag) + 1:])
    return seconds, found["COMPILES"], found["PHASES"]


def run_prototype(inputs: list[Path], cache: Path, out: Path, args: argparse.Namespace
                  ) -> tuple[float, dict, dict]:
    code = LISTENERS + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\n" \
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    return run([sys.executable, "-c", code, str(Path(__file__).resolve()), "worker",
                "--tile", str(args.tile), "--batch", str(args.batch), "--max-side",
                str(args.max_side), "--cache", str(cache), "--out", str(out),
                *map(str, inputs)], {})


def run_cli(inputs: list[Path], cache: Path, out: Path, max_side: int, extra: list[str] = ()
            ) -> tuple[float, dict, dict]:
    code = LISTENERS + "\nimport sys\nfrom jaxdream.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    seconds, compiles, _ = run([sys.executable, "-c", code, "dream", *map(str, inputs), "-o",
                                str(out), "-q", "--overwrite", "--max-side", str(max_side),
                                *extra], {"JAXDREAM_CACHE": str(cache)})
    return seconds, compiles, {}


def describe(seconds: float, compiles: dict, phases: dict) -> str:
    line = (f"{seconds:6.1f} s | {compiles.get('compiles', '?')} compiles "
            f"({compiles.get('xla_cache_hits', 0)} from XLA cache) | XLA compile "
            f"{compiles.get('compile_s', 0):.1f} s, trace {compiles.get('trace_s', 0):.1f} s, "
            f"lower {compiles.get('lower_s', 0):.1f} s")
    if phases:
        rest = seconds - phases["program_s"] - phases["dream_s"]
        line += (f" | program {phases['program_s']:.1f} s ("
                 f"{'loaded' if phases['program_loaded'] else 'built'}), dream "
                 f"{phases['dream_s']:.1f} s (NumPy roll/cut/paste/update "
                 f"{phases['numpy_s']:.1f} s), rest (start-up, model, write) {rest:.1f} s; "
                 f"{phases['tiles']} tiles in {phases['batches']} batches "
                 f"({phases['empty_slots']} empty slots)")
    return line


def bench(args: argparse.Namespace) -> None:
    from _common import machine_line
    from peers import make_photos, run_eager_lite0

    print(f"machine: {machine_line()}")
    print(f"prototype: T={args.tile}, B={args.batch}, edge padding, step-synchronous rounds "
          f"over every image in flight; classic Lite0 block10, 4 octaves x 1.4, 10 steps")
    work = Path(tempfile.mkdtemp(prefix="tile-engine-"))
    rng = np.random.default_rng(1)  # peers.py's mixed folder: same sizes, same crops
    mixed = [tuple(int(v) for v in rng.integers(300, 801, 2)) for _ in range(24)]
    jobs = [("one", "one photo examples/chelsea.jpg, max side 512",
             [REPO / "examples" / "chelsea.jpg"]),
            ("mixed", "24 photos of 300-800 px (peers.py's folder), max side 512",
             make_photos(work / "mixed_in", mixed[:2] if args.smoke else mixed))]
    try:
        for name, workload, inputs in jobs:
            if name not in args.jobs:
                continue
            print(f"\n## {workload}\n{uptime()}")
            if args.eager:
                eager = run_eager_lite0(inputs, args.max_side, work / f"{name}_eager")
                print(f"eager PyTorch script, one process: {eager:.1f} s")
            for repeat in range(args.repeats):
                print(f"### round {repeat + 1}: {uptime()}", flush=True)
                proto_cache = work / f"{name}_proto_cache_{repeat}"
                cli_cache = work / f"{name}_cli_cache_{repeat}"
                figures = {}
                for label, runner in [
                        ("prototype cold", lambda: run_prototype(
                            inputs, proto_cache, args.keep / f"{name}_proto", args)),
                        ("jaxdream CLI cold", lambda: run_cli(
                            inputs, cli_cache, args.keep / f"{name}_cli", args.max_side)),
                        ("prototype warm", lambda: run_prototype(
                            inputs, proto_cache, args.keep / f"{name}_proto", args)),
                        ("jaxdream CLI warm", lambda: run_cli(
                            inputs, cli_cache, args.keep / f"{name}_cli", args.max_side))]:
                    if repeat and "warm" in label and not args.warm_every_round:
                        continue
                    seconds, compiles, phases = runner()
                    figures[label] = seconds
                    print(f"{label:18s} | {describe(seconds, compiles, phases)}", flush=True)
                for kind in ("cold", "warm"):
                    if f"prototype {kind}" in figures:
                        ratio = figures[f"prototype {kind}"] / figures[f"jaxdream CLI {kind}"]
                        print(f"prototype / CLI, {kind}: {ratio:.2f}")
            if args.warm_pairs:
                # Warm runs are a few seconds: alternate more pairs to see through the noise.
                ratios = []
                for _ in range(args.warm_pairs):
                    proto, _, _ = run_prototype(inputs, work / f"{name}_proto_cache_0",
                                                args.keep / f"{name}_proto", args)
                    cli, _, _ = run_cli(inputs, work / f"{name}_cli_cache_0",
                                        args.keep / f"{name}_cli", args.max_side)
                    ratios.append(proto / cli)
                    print(f"warm pair: prototype {proto:.1f} s, CLI {cli:.1f} s, ratio "
                          f"{proto / cli:.2f}", flush=True)
                print(f"prototype / CLI, warm, median of {len(ratios)} pairs: "
                      f"{statistics.median(ratios):.2f}")
            if name == "one" and args.seed_floor:
                # The noise floor of the comparison: the engine against itself, another seed.
                seconds, compiles, _ = run_cli(inputs, work / f"{name}_cli_cache_0",
                                               args.keep / f"{name}_cli_seed1", args.max_side,
                                               ["--seed", "1"])
                print(f"jaxdream CLI --seed 1 (warm, for the image comparison): {seconds:.1f} s")
            print(uptime())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep")
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 192, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("worker")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--in-flight", type=int, default=0, help="images dreamed together (0: all)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("bench")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--jobs", default="one,mixed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warm-every-round", action="store_true")
    p.add_argument("--warm-pairs", type=int, default=0,
                   help="then this many alternating warm pairs per job (median ratio)")
    p.add_argument("--eager", action="store_true", help="also the eager PyTorch script")
    p.add_argument("--seed-floor", action="store_true",
                   help="also the CLI with --seed 1 on the single photo (image noise floor)")
    p.add_argument("--smoke", action="store_true", help="2 photos in the mixed folder")
    p.add_argument("--keep", type=Path, default=Path("/tmp/tiles/out"),
                   help="where the PNGs are kept (outside the repository)")
    args = parser.parse_args()
    {"sweep": sweep, "worker": worker, "bench": bench}[args.command](args)


if __name__ == "__main__":
    main()
