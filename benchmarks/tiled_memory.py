"""Peak memory of large dreams, tiled against untiled, each in a fresh process; and one
full-quality 4096 x 4096 tiled dream to look at.

    python benchmarks/tiled_memory.py                          # the table (~6 min, 2 cores)
    python benchmarks/tiled_memory.py --sizes 1024,2048 --modes untiled,512/4
    python benchmarks/tiled_memory.py --full --out /tmp/tiled_4096.png     # ~5 min

Workload: EfficientNet-Lite0 (embedded weights) at its default layer (block10), classic
settings (4 octaves at 1.4, jitter 32, step 1.5) but ``--steps`` steps per octave (1 by
default: peak memory does not depend on the step count, every step reuses the same buffers),
on examples/astronaut.jpg upscaled with Pillow's LANCZOS to N x N, batch 1. A mode is
``untiled`` (tile_above 0) or ``ABOVE/GROUP``: octaves whose longer side exceeds ABOVE are
tiled in 512-pixel tiles, GROUP tiles at a time through the network (the recipe's default is
1280/4). A mode that tiles exactly the same octaves as one already measured at that size is
skipped.

Each measurement is a fresh Python process. It reports its peak resident memory (VmHWM from
/proc/self/status) after loading the model, after compiling the dream and after running it,
XLA's own plan for the compiled program (temporary buffers, arguments, outputs), and the
seconds spent compiling and dreaming. The parent watches the child's resident memory and
kills it above ``--guard-gib`` (then the row says "did not fit" with the largest RSS seen),
so an untiled 4096 dream cannot take the shared machine down. Baseline for the ratios: the
untiled run of the same size, else the process floor (import + model load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _status_kib(field: str, pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def mem_available_gib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def octave_sides(size: int, octaves: int, scale: float = 1.4) -> list[int]:
    sides = [size]
    for _ in range(octaves - 1):
        sides.append(max(1, round(sides[-1] / scale)))
    return sides


def parse_mode(mode: str) -> tuple[int, int]:
    """'untiled' -> (0, 1); 'ABOVE/GROUP' -> (ABOVE, GROUP)."""
    if mode == "untiled":
        return 0, 1
    above, group = mode.split("/")
    return int(above), int(group)


# ---------------------------------------------------------------------------------- child
def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One dream in this (fresh) process; returns the measurements."""
    import numpy as np
    from PIL import Image

    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import Engine, ItemParams
    from jaxdream.images import load_rgb, save_png, to_uint8
    from jaxdream.models import load_model

    size = spec["size"]
    source = Image.open(spec["input"]).convert("RGB")
    photo = np.asarray(source.resize((size, size), Image.LANCZOS), np.float32)
    del source
    if spec.get("save_input"):
        Image.fromarray(photo.astype(np.uint8)).save(spec["save_input"])
        photo = load_rgb(spec["save_input"], max_side=None).astype(np.float32)
    model = load_model("efficientnet_lite0")
    layer = model.spec.default_layers
    settings = StaticSettings((layer,), octaves=spec["octaves"], octave_scale=1.4,
                              steps=spec["steps"], tile_size=spec["tile_size"],
                              tile_above=spec["tile_above"], tile_group=spec["tile_group"])
    engine = Engine(model, settings, batch_size=1)
    params = [ItemParams(1.5, 32, 0, (1.0,))]
    out: dict[str, Any] = {"layer": layer, "hwm_loaded": _status_kib("VmHWM") * 1024}

    # Compile first, on its own, to see what compiling costs and what XLA plans to allocate
    # (the engine keeps the program, so render() below reuses it).
    start = time.perf_counter()
    buffer, sample = engine._stack([photo], params, (size, size))
    images, sample = engine._place((buffer, sample))
    program = engine._program(images, sample)
    out["compile_s"] = time.perf_counter() - start
    out["hwm_compiled"] = _status_kib("VmHWM") * 1024
    try:
        analysis = program.memory_analysis()
        out["xla_temp"] = int(analysis.temp_size_in_bytes)
        out["xla_args"] = int(analysis.argument_size_in_bytes)
        out["xla_out"] = int(analysis.output_size_in_bytes)
    except Exception as error:  # noqa: BLE001 - not every backend reports it
        out["xla_error"] = str(error)
    print(json.dumps({"progress": "compiled", **out}), flush=True)
    del images, sample, buffer

    start = time.perf_counter()
    result = engine.render([photo], params)[0]
    out["dream_s"] = time.perf_counter() - start
    out["hwm_dreamed"] = _status_kib("VmHWM") * 1024
    out["changed"] = float(np.abs(result - photo).mean())
    if spec.get("output"):
        recipe = {"model": "efficientnet_lite0", "layers": {layer: 1.0},
                  "octaves": settings.octaves, "octave_scale": settings.octave_scale,
                  "steps": settings.steps, "step_size": 1.5, "jitter": 32, "seed": 0,
                  "tile_size": settings.tile_size, "tile_above": settings.tile_above,
                  "tile_group": settings.tile_group, "input": Path(spec["input"]).name}
        save_png(spec["output"], to_uint8(result), recipe)
    return out


# --------------------------------------------------------------------------------- parent
def run_child(spec: dict[str, Any], guard_bytes: int) -> dict[str, Any]:
    """Runs one measurement in a fresh process, killing it if its RSS passes the guard."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "_child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = {"max_rss": 0, "killed": False}

    def watch() -> None:
        while proc.poll() is None:
            rss = _status_kib("VmRSS", proc.pid) * 1024
            seen["max_rss"] = max(seen["max_rss"], rss)
            if rss > guard_bytes:
                seen["killed"] = True
                proc.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = dict(lines[-1]) if lines else {}
    result.pop("progress", None)
    result["wall_s"] = time.perf_counter() - start
    result["max_rss_seen"] = seen["max_rss"]
    if seen["killed"]:
        result["status"] = f"did not fit (killed above {guard_bytes / GIB:.0f} GiB)"
    elif proc.returncode != 0:
        result["status"] = f"failed ({proc.returncode}): {stderr.strip().splitlines()[-1:]}"
    else:
        result["status"] = "ok"
    return result


def header() -> None:
    import jax

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    print(f"machine: {machine_line()}, {ram:.1f} GiB RAM "
          f"({mem_available_gib():.1f} GiB available now); jax {jax.__version__} "
          f"({jax.default_backend()}), python {platform.python_version()}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def gib(value: Any) -> str:
    return f"{value / GIB:6.2f}" if isinstance(value, (int, float)) and value else "     -"


def table(args: argparse.Namespace) -> None:
    header()
    print(f"workload: EfficientNet-Lite0 to block10, {Path(args.input).name} upscaled (LANCZOS) "
          f"to N x N, 4 octaves at 1.4 x {args.steps} step(s), jitter 32, step 1.5, batch 1, "
          f"tile size {args.tile_size}; one fresh process per row; guard "
          f"{args.guard_gib:g} GiB RSS")
    floor = run_child({"size": 64, "input": args.input, "octaves": 1, "steps": 1,
                       "tile_size": args.tile_size, "tile_above": 0, "tile_group": 1},
                      int(args.guard_gib * GIB))
    print(f"process floor (import, model load, 64x64 dream): peak RSS "
          f"{floor.get('hwm_dreamed', 0) / GIB:.2f} GiB")
    print(f"{'size':>5} {'mode':>8} {'tiled octaves':>22} {'peak RSS GiB':>12} "
          f"{'after load':>10} {'after compile':>13} {'XLA temp':>8} {'vs untiled':>10} "
          f"{'compile s':>9} {'dream s':>8}  status")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        sides = octave_sides(size, 4)
        measured: dict[tuple[bool, ...], str] = {}
        untiled_peak = None
        for mode in args.modes.split(","):
            above, group = parse_mode(mode)
            pattern = tuple(above > 0 and side > above for side in sides)
            key = (*pattern, group if any(pattern) else 0)
            if key in measured:
                print(f"{size:>5} {mode:>8}  same tiling as {measured[key]}, skipped")
                continue
            measured[key] = mode
            spec = {"size": size, "input": args.input, "octaves": 4, "steps": args.steps,
                    "tile_size": args.tile_size, "tile_above": above, "tile_group": group}
            guard = min(args.guard_gib, max(mem_available_gib() - 3.0, 1.0))
            result = run_child(spec, int(guard * GIB))
            ok = result["status"] == "ok"
            peak = result.get("hwm_dreamed") if ok else result["max_rss_seen"]
            if mode == "untiled" and ok:
                untiled_peak = peak
            ratio = (f"{peak / untiled_peak:10.2f}" if untiled_peak and peak and mode !=
                     "untiled" else f"{'':>10}")
            tiled = ",".join(str(s) for s, t in zip(sides, pattern, strict=True) if t) or "none"
            rows.append({"size": size, "mode": mode, **result})
            print(f"{size:>5} {mode:>8} {tiled:>22} {gib(peak):>12} "
                  f"{gib(result.get('hwm_loaded')):>10} {gib(result.get('hwm_compiled')):>13} "
                  f"{gib(result.get('xla_temp')):>8} {ratio} "
                  f"{result.get('compile_s', float('nan')):9.1f} "
                  f"{result.get('dream_s', float('nan')):8.1f}  {result['status']}"
                  + ("" if ok else f" (largest RSS seen {peak / GIB:.2f} GiB)"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def full(args: argparse.Namespace) -> None:
    header()
    above, group = parse_mode(args.full_mode)
    print(f"workload: ONE full dream, EfficientNet-Lite0 to block10, {Path(args.input).name} "
          f"upscaled (LANCZOS) to {args.full_size} x {args.full_size}, 4 octaves at 1.4 x "
          f"{args.full_steps} steps (classic), jitter 32, step 1.5, tiles {args.tile_size} "
          f"above {above}, {group} at a time; output {args.out}")
    spec = {"size": args.full_size, "input": args.input, "octaves": 4, "steps": args.full_steps,
            "tile_size": args.tile_size, "tile_above": above, "tile_group": group,
            "output": args.out, "save_input": args.save_input}
    result = run_child(spec, int(args.guard_gib * GIB))
    print(f"status {result['status']}; peak RSS {result.get('hwm_dreamed', 0) / GIB:.2f} GiB "
          f"(after load {result.get('hwm_loaded', 0) / GIB:.2f}, after compile "
          f"{result.get('hwm_compiled', 0) / GIB:.2f}; XLA temp buffers "
          f"{result.get('xla_temp', 0) / GIB:.2f} GiB); compile {result.get('compile_s', 0):.1f}"
          f" s, dream {result.get('dream_s', 0):.1f} s, process {result['wall_s']:.1f} s; mean "
          f"|change| {result.get('changed', float('nan')):.1f} of 255")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=str(ROOT / "examples" / "astronaut.jpg"))
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--modes", default="untiled,512/4,512/1,1280/4",
                        help="untiled and/or ABOVE/GROUP tilings to measure at every size")
    parser.add_argument("--steps", type=int, default=1, help="steps per octave in the table")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--guard-gib", type=float, default=12.0,
                        help="kill a child whose RSS passes this (also capped at the memory "
                             "available minus 3 GiB)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--full", action="store_true", help="the full-quality dream instead")
    parser.add_argument("--full-size", type=int, default=4096)
    parser.add_argument("--full-steps", type=int, default=10)
    parser.add_argument("--full-mode", default="1280/4", help="ABOVE/GROUP (recipe default)")
    parser.add_argument("--out", default="/tmp/tiled_4096.png")
    parser.add_argument("--save-input", default=None,
                        help="also write the upscaled input here (and dream what load_rgb "
                             "reads back)")
    args = parser.parse_args()
    if args.full:
        full(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
