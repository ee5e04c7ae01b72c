"""Where the batched dream spends its time on an accelerator: a profile of batch 1 against a
large batch, and what the optimised programs do differently (issue 11).

    PYTHONPATH=. python3 benchmarks/gpu_profile.py --batches 1,32 --out results/ --label grouped

For each batch size it builds the classic dream's program (EfficientNet-Lite0 to ``block10``,
4 octaves x 10 steps, 512x512) exactly as the engine does, and reports:

- images per second (median of a few calls after a warm-up, each waited on);
- XLA's own cost analysis per image: flops and bytes accessed, completed for the step loops
  when XLA counts a loop body once, and the time the bytes would take at the card's memory
  bandwidth (``--bandwidth``, GB/s; known cards are filled in) -- the memory-bound limit;
- the ten most expensive operations of a profiled call (``jax.profiler`` trace, device events
  summed by name) with their share of the device time;
- a count of the operation kinds in the optimised HLO (gathers, scatters, transposes, copies,
  grouped and dense convolutions, loops, custom calls), side by side for each batch, so that
  what the vmapped program does per image that batch 1 does not shows up as a difference.

Results go to ``OUT/profile_<label>.json`` and ``OUT/profile_<label>.txt``, and the optimised
HLO of every program to ``OUT/hlo_<label>.tar.gz``. Nothing imports Ray or PyTorch; it runs
from the source tree (``PYTHONPATH=.``). CPU check of every code path (seconds):

    python benchmarks/gpu_profile.py --size 64 --octaves 2 --steps 2 --batches 1,2 --out /tmp/p
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, median_seconds  # noqa: E402

#: Memory bandwidth of cards this may run on, GB/s (vendor figures for the SXM parts).
KNOWN_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

#: HLO operation kinds worth counting when comparing programs.
HLO_KINDS = ("gather", "scatter", "transpose", "copy", "dynamic-slice", "dynamic-update-slice",
             "while", "custom-call", "fusion", "reduce", "sort", "pad", "concatenate")


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def hlo_counts(text: str) -> dict[str, int]:
    """Operation kinds in an optimised HLO module's text (fused computations included)."""
    ops = re.findall(r"=\s*[\w\[\]{},:\s\d./()]*?\s([a-z][\w-]*)\(", text)
    counts = collections.Counter(op for op in ops if op in HLO_KINDS)
    groups = [int(v) for v in re.findall(r"feature_group_count=(\d+)", text)]
    counts["convolution (grouped)"] = sum(1 for g in groups if g > 1)
    counts["convolution (dense)"] = len(re.findall(r"\sconvolution\(", text)) - counts[
        "convolution (grouped)"]
    counts["cudnn conv custom-calls"] = len(re.findall(r'custom_call_target="__cudnn\$conv', text))
    return dict(sorted(counts.items()))


def top_ops(trace_dir: str, count: int = 10) -> tuple[list[dict[str, Any]], str]:
    """The ``count`` operations with the most time in a perfetto trace written by
    ``jax.profiler.trace``: device events if there are any, else host XLA events."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return [], "no perfetto trace was written"
    with gzip.open(files[0]) as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if "/device:" in name}
    where = "device" if device else "host"
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        if device and event["pid"] not in device:
            continue
        name = event.get("name", "")
        # Host-side Python frames and runtime wrappers are not operations of the program.
        # (and a host while-loop's event contains its body's events).
        if not device and (name.startswith(("$", "Pjit", "while")) or "::" in name):
            continue
        totals[name] += float(event.get("dur", 0.0))
    whole = sum(totals.values()) or 1.0
    rows = [{"op": name, "us": round(us, 1), "share": round(us / whole, 4)}
            for name, us in totals.most_common(count)]
    return rows, f"{where} events, {whole / 1e3:.1f} ms in all"


@dataclasses.dataclass
class Row:
    batch: int
    compile_s: float = 0.0
    img_s: float = 0.0
    flops_per_image: float | None = None
    bytes_per_image: float | None = None
    bound_img_s: float | None = None
    hlo: dict[str, int] = dataclasses.field(default_factory=dict)
    top: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    top_note: str = ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--octaves", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--depthwise", default="auto", choices=("auto", "grouped", "shifted"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth in GB/s (default: known cards, else none)")
    parser.add_argument("--no-profile", action="store_true", help="time and count only")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--label", default=None, help="file name label (default: depthwise form)")
    return parser.parse_args()


def main() -> None:  # noqa: C901 (one linear script)
    args = parse_args()
    if args.depthwise != "auto":
        os.environ["JAXDREAM_DEPTHWISE"] = args.depthwise
    import jax

    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import Engine, ItemParams, _jitted
    from jaxdream.models import load_model
    from jaxdream.models.layers import depthwise_impl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_dream import loop_bodies_multiplied

    device = jax.devices()[0]
    label = args.label or depthwise_impl()
    bandwidth = args.bandwidth or next((gbs for name, gbs in KNOWN_BANDWIDTH_GBS.items()
                                        if name in device.device_kind), None)
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = [
        f"machine: {machine_line()}",
        f"device: {device.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        f"workload: EfficientNet-Lite0 to block10, classic dream ({args.octaves} octaves x "
        f"{args.steps} steps), {args.size}x{args.size}, {args.dtype}, depthwise form "
        f"{depthwise_impl()}; batches {batches}; memory bandwidth "
        f"{'unknown' if bandwidth is None else f'{bandwidth:.0f} GB/s'}",
    ]
    for line in header:
        say(line)

    model = load_model("efficientnet_lite0")
    settings = StaticSettings(("block10",), octaves=args.octaves, steps=args.steps)
    compute = None if args.dtype == "float32" else args.dtype
    rng = np.random.default_rng(0)
    pool = rng.uniform(0, 255, (max(batches), args.size, args.size, 3)).astype(np.float32)
    item_params = [ItemParams(1.5, 32, seed, (1.0,)) for seed in range(max(batches))]

    # Lower every program first, then compile them in threads (XLA releases the GIL).
    built: dict[int, tuple[Any, Any, Any, Any]] = {}
    for batch in batches:
        engine = Engine(model, settings, batch, bucket=1, compute_dtype=compute)
        buffer, sample = engine._stack(list(pool[:batch]), item_params[:batch],
                                       (args.size, args.size))
        images, params = engine._place((buffer, sample))
        lowered = _jitted(engine._graphdef, settings, engine.compute_dtype).lower(
            engine._state, images, params)
        built[batch] = (lowered, engine._state, images, params)
    rows = {batch: Row(batch) for batch in batches}

    def compile_one(batch: int) -> Any:
        start = time.perf_counter()
        program = built[batch][0].compile()
        rows[batch].compile_s = time.perf_counter() - start
        return program

    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool_:
        programs = dict(zip(batches, pool_.map(compile_one, batches), strict=True))
    multiplied = loop_bodies_multiplied(args.steps)
    hlo_texts: dict[str, str] = {}

    for batch in batches:
        row, program = rows[batch], programs[batch]
        _, state, images, params = built[batch]

        def call(program: Any = program, state: Any = state, images: Any = images,
                 params: Any = params) -> None:
            jax.block_until_ready(program(state, images, params))

        row.img_s = batch / median_seconds(call, args.repeats)
        try:
            analysis = program.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            # XLA's analysis may count each step loop's body once: then the count is one
            # step per octave (plus the resizes), and the loops' trips complete it.
            factor = 1.0 if multiplied else float(args.steps)
            if analysis.get("flops"):
                row.flops_per_image = float(analysis["flops"]) * factor / batch
            if analysis.get("bytes accessed"):
                row.bytes_per_image = float(analysis["bytes accessed"]) * factor / batch
        except Exception as error:  # reported, not fatal
            row.top_note = f"no cost analysis: {type(error).__name__}: {error}"
        if row.bytes_per_image and bandwidth:
            row.bound_img_s = bandwidth * 1e9 / row.bytes_per_image
        text = program.as_text()
        hlo_texts[f"batch{batch}.hlo.txt"] = text
        row.hlo = hlo_counts(text)
        if not args.no_profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    call()
                    call()
                row.top, row.top_note = top_ops(trace_dir)
        say(f"batch {batch:>3}: {row.img_s:8.2f} img/s, compiled in {row.compile_s:5.1f} s"
            + (f"; XLA per image {row.flops_per_image / 1e9:.1f} GFLOP"
               if row.flops_per_image else "")
            + (f", {row.bytes_per_image / 1e9:.2f} GB accessed" if row.bytes_per_image else "")
            + (f" -> memory-bound limit {row.bound_img_s:.0f} img/s "
               f"({row.img_s / row.bound_img_s:.1%} of it)" if row.bound_img_s else ""))

    lines = header + ["", "optimised HLO, operation kinds (per program):"]
    kinds = sorted({k for row in rows.values() for k in row.hlo})
    lines.append(f"{'kind':28s}" + "".join(f"{'batch ' + str(b):>12s}" for b in batches))
    for kind in kinds:
        lines.append(f"{kind:28s}" + "".join(f"{rows[b].hlo.get(kind, 0):>12d}"
                                             for b in batches))
    for batch in batches:
        row = rows[batch]
        lines += ["", f"batch {batch}: {row.img_s:.2f} img/s; top operations ({row.top_note}):"]
        lines += [f"  {r['share']:6.1%} {r['us'] / 1e3:9.2f} ms  {r['op']}" for r in row.top]
    report = "\n".join(lines) + "\n"
    say("\n".join(lines[len(header):]))
    (out / f"profile_{label}.txt").write_text(report)
    (out / f"profile_{label}.json").write_text(json.dumps(
        {"header": header, "label": label, "loop_bodies_multiplied": multiplied,
         "rows": [dataclasses.asdict(r) for r in rows.values()]}, indent=2) + "\n")
    with tarfile.open(out / f"hlo_{label}.tar.gz", "w:gz") as archive:
        for name, text in hlo_texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
