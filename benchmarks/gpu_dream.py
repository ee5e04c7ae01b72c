"""GPU benchmark of the classic dream: jaxdream against eager PyTorch on the same GPU, same run.

    PYTHONPATH=. python3 benchmarks/gpu_dream.py --weights efficientnet-lite0-57934424.pth \\
        --json gpu_dream.json

On an H200 (2026-11-28) XLA's convolution autotuning made the six programs take 5-6 minutes
to compile, three at a time; with ``XLA_FLAGS=--xla_gpu_autotune_level=0`` each took about
30 s and the whole run 4 minutes (benchmarks/results/gpu_dream_h200.json).

Workload (defaults): EfficientNet-Lite0 to its default dream layer (block10), the classic dream
(4 octaves x 10 steps, octave scale 1.4, step 1.5, jitter 32: 40 gradient evaluations per
image), 512x512 random-but-fixed images, batch 1, 8 and 32, with the network in float32 and in
bfloat16 (the image, the accumulator of the ascent, stays float32 on both sides).

jaxdream: one compiled program per (size, batch, dtype), as the engine builds it; only the
compiled program is timed (a warm-up call, then the median of a few calls, each waited on).
Compile time is reported per program. Programs are compiled up front, a few at a time in
threads (``--compile-workers``; XLA releases the GIL while it compiles), before anything is
timed. Achieved TFLOP/s is XLA's own count of the work (``cost_analysis()`` of the compiled
executable) divided by the measured time; where XLA's count takes each while-loop body once
(the step loop of every octave runs ``steps`` times) the script completes it with XLA's count
of one step, and says so.

PyTorch: the same classic dream in eager mode on the same device with the same weights (a
direct port of the network, checked against jaxdream's block10 activations in float32 at the
highest precision before anything is timed), bfloat16 through ``torch.autocast``, cuDNN
autotuning on (``cudnn.benchmark``). One jitter roll per step serves the whole batch there
(jaxdream rolls each image on its own), which if anything favours PyTorch. float32 runs at
each library's default precision: both let cuDNN/XLA use TF32 for float32 convolutions.

Compiling several programs at once lets XLA's autotuners share the GPU for a while (they time
candidate kernels); ``--compile-workers 1`` compiles one after another. JAX's backend is
started before torch is imported.

A global time guard (``--budget``) skips what would not finish in time, with a message;
results are printed as they come and the JSON file (``--json``) is rewritten after each one.
Everything runs without a network and without installing jaxdream (``PYTHONPATH=.``); nothing
imports Ray. CPU check of every code path:

    python benchmarks/gpu_dream.py --sizes 64 --batches 1,2 --octaves 2 --steps 2 --quick
"""

from __future__ import annotations

import os
import time

_T0 = time.perf_counter()
# Before jax is imported: JAX would otherwise take 75% of the GPU's memory at start, leaving
# PyTorch (the baseline, same process) the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, torch_dream, torch_lite  # noqa: E402

#: Relative tolerance of the float32 activation check (max |jax - torch| / max |torch|),
#: computed at the highest precision (no TF32) on both sides.
PARITY_TOLERANCE = 1e-3


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def elapsed() -> float:
    return time.perf_counter() - _T0


def flops_of(analysis: Any) -> float | None:
    """'flops' from a cost analysis (a dict, or a list of dicts on some versions)."""
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):
        values = [flops_of(item) for item in analysis]
        values = [v for v in values if v is not None]
        return sum(values) if values else None
    value = analysis.get("flops") if hasattr(analysis, "get") else None
    return float(value) if value is not None and value >= 0 else None


def timed(fn: Any, repeats: int, deadline: float) -> tuple[float, int]:
    """(median seconds, calls timed): one warm-up call, then up to ``repeats`` timed calls,
    fewer (at least one) if the script's ``deadline`` (seconds since start) comes first."""
    fn()
    times: list[float] = []
    while len(times) < max(1, repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if elapsed() + times[-1] > deadline:
            break
    return statistics.median(times), len(times)


@dataclasses.dataclass
class Config:
    size: int
    batch: int
    dtype: str  # "float32" or "bfloat16"
    # filled in as the run goes
    compile_s: float | None = None
    program: Any = None
    compile_error: str | None = None
    lowered: Any = None
    images: Any = None
    params: Any = None
    state: Any = None
    xla_flops_raw: float | None = None
    step_flops: float | None = None  # XLA's count of one step, summed over the octaves
    flops: float | None = None
    flops_method: str = ""
    grouped_convs: int | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return f"{self.size}x{self.size} batch {self.batch:>2} {self.dtype:8s}"


# ------------------------------------------------------------------------------ compiling
class Compiler:
    """Daemon threads that compile lowered programs in submission order (daemons, so a
    compile still running when the time is up does not keep the script alive)."""

    def __init__(self, workers: int):
        self.jobs: queue.Queue[Config | None] = queue.Queue()
        self.cancelled = False
        for _ in range(max(1, workers)):
            threading.Thread(target=self._work, daemon=True).start()

    def submit(self, config: Config) -> None:
        self.jobs.put(config)

    def _work(self) -> None:
        while True:
            config = self.jobs.get()
            if config is None:
                return
            if self.cancelled:
                config.compile_error = "skipped: out of time before it could compile"
                config.done.set()
                continue
            start = time.perf_counter()
            try:
                config.program = config.lowered.compile()
                config.compile_s = time.perf_counter() - start
            except Exception as error:  # reported, the other configurations go on
                config.compile_error = f"compile failed: {type(error).__name__}: {error}"
            config.lowered = None
            config.done.set()


def loop_bodies_multiplied(steps: int) -> bool:
    """Whether this backend's cost analysis multiplies a while loop's body by its trip count
    (XLA's HloCostAnalysis has counted it once). A small loop may be unrolled by XLA, which
    also reads as multiplied, so this is only one of two tests (see the caller)."""
    import jax
    import jax.numpy as jnp

    def count(trips: int) -> float | None:
        def body(i: Any, x: Any) -> Any:
            return jnp.tanh(x @ x) * i.astype(x.dtype)

        program = jax.jit(lambda x: jax.lax.fori_loop(0, trips, body, x)).lower(
            jnp.ones((128, 128), jnp.float32)).compile()
        return flops_of(program.cost_analysis())

    try:
        few, many = count(max(2, steps)), count(2 * max(2, steps))
    except Exception:
        return True
    return few is None or many is None or many > 1.5 * few


def cost_flops(program: Any) -> float | None:
    try:
        return flops_of(program.cost_analysis())
    except Exception:
        return None


def grouped_conv_count(program: Any) -> int | None:
    """How many convolutions with feature_group_count > 1 the compiled program holds."""
    try:
        text = program.as_text()
    except Exception:
        return None
    return sum(1 for value in re.findall(r"feature_group_count=(\d+)", text) if int(value) > 1)


# ------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None,
                        help="EfficientNet-Lite0 checkpoint (efficientnet-lite0-57934424.pth); "
                             "default: the installed package's")
    parser.add_argument("--sizes", default="512", help="square image sides, comma-separated")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--octaves", type=int, default=4)
    parser.add_argument("--octave-scale", type=float, default=1.4)
    parser.add_argument("--steps", type=int, default=10, help="steps per octave")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="2 timed calls per measurement")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds for the whole script; what would not fit is skipped")
    parser.add_argument("--compile-workers", type=int, default=3,
                        help="programs compiled at once (1: one after another)")
    parser.add_argument("--torch-device", default="auto",
                        help="auto (the GPU when JAX runs on one), cpu, cuda, or none")
    parser.add_argument("--depthwise", default="auto", choices=("auto", "grouped", "shifted"),
                        help="jaxdream's depthwise form; auto: the backend's (TPU: grouped)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    return args


def main() -> None:  # noqa: C901 (one linear script)
    args = parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    dtypes = [v.strip() for v in args.dtypes.split(",")]
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            raise SystemExit(f"unknown dtype {dtype!r}: float32 or bfloat16")

    if args.depthwise == "auto":
        forced = os.environ.pop("JAXDREAM_DEPTHWISE", None)
        if forced:
            say(f"note: ignoring JAXDREAM_DEPTHWISE={forced} (use --depthwise to force a form)")
    else:
        os.environ["JAXDREAM_DEPTHWISE"] = args.depthwise

    import flax
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdream.ascent import StaticSettings, octave_shapes
    from jaxdream.engine import Engine, ItemParams, _jitted
    from jaxdream.models import load_model
    from jaxdream.models.checkpoint import load_state_dict
    from jaxdream.models.efficientnet_lite import LITE0
    from jaxdream.models.layers import depthwise_impl

    backend = jax.default_backend()
    device = jax.devices()[0]
    depthwise = depthwise_impl()
    say(f"machine: {machine_line()}")
    say(f"jax device: {device.device_kind} ({backend}, {len(jax.devices())} device(s)); "
        f"jax {jax.__version__}, flax {flax.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}")
    if os.environ.get("XLA_FLAGS"):
        say(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    say(f"jaxdream depthwise convolutions: {depthwise}"
        + (" (XLA's grouped convolution, cuDNN on GPU)" if depthwise == "grouped"
           else " (written forms: shifted slices, hand-written gradients)"))

    # ---------------------------------------------------------------- torch, if any
    torch: Any = None
    torch_device: Any = None
    torch_note = ""
    if args.torch_device != "none":
        try:
            import torch  # type: ignore[no-redef]
        except ImportError:
            torch_note = "PyTorch is not installed: no baseline"
    else:
        torch_note = "--torch-device none: no baseline"
    if torch is not None:
        wanted = args.torch_device
        if wanted == "auto":
            wanted = "cpu" if backend == "cpu" else "cuda"
        if wanted == "cuda" and not torch.cuda.is_available():
            torch_note = "PyTorch has no CUDA device here: no baseline (--torch-device cpu forces one)"
            torch = None
        else:
            torch_device = torch.device(wanted)
    if torch is not None:
        if torch_device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            name = torch.cuda.get_device_name(torch_device)
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            name = f"CPU, {torch.get_num_threads()} threads"
        say(f"torch device: {name}; torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
               f"cudnn.benchmark on, TF32 for float32 convolutions "
               f"{'allowed' if torch.backends.cudnn.allow_tf32 else 'off'}"
               if torch_device.type == "cuda" else ""))
    else:
        say(f"torch: {torch_note}")
    say(f"jax float32 precision: "
        f"{getattr(jax.config, 'jax_default_matmul_precision', None) or 'DEFAULT'} "
        f"(library default; on recent NVIDIA GPUs it lets float32 convolutions use TF32)")

    def sync() -> None:
        if torch_device is not None and torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    # ---------------------------------------------------------------- model and workload
    model = load_model("efficientnet_lite0", args.weights)
    layer = model.spec.default_layers
    layer_index = int(layer.removeprefix("block"))
    settings = StaticSettings((layer,), octaves=args.octaves, octave_scale=args.octave_scale,
                              steps=args.steps)
    say(f"workload: EfficientNet-Lite0 to {layer}, classic dream ({args.octaves} octaves x "
        f"{args.steps} steps, octave scale {args.octave_scale}, step 1.5, jitter 32), "
        f"random fixed images {', '.join(f'{s}x{s}' for s in sizes)}, batches {batches}, "
        f"{', '.join(dtypes)} (image accumulator float32); median of {args.repeats} calls "
        f"after a warm-up; budget {args.budget:.0f} s")
    rng = np.random.default_rng(0)
    pools = {size: rng.uniform(0, 255, (max(batches), size, size, 3)).astype(np.float32)
             for size in sizes}
    item_params = [ItemParams(1.5, 32, seed, (1.0,)) for seed in range(max(batches))]

    configs = [Config(size, batch, dtype) for size in sizes for batch in batches
               for dtype in dtypes]
    results: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_dream.py", "machine": machine_line(),
        "jax_device": device.device_kind, "backend": backend,
        "torch_device": None if torch is None else str(torch_device),
        "torch_device_name": None if torch is None or torch_device.type != "cuda"
        else torch.cuda.get_device_name(torch_device),
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "torch": None if torch is None else torch.__version__,
                     "python": platform.python_version()},
        "workload": {"model": "efficientnet_lite0", "layer": layer, "octaves": args.octaves,
                     "steps": args.steps, "octave_scale": args.octave_scale, "step_size": 1.5,
                     "jitter": 32, "sizes": sizes, "batches": batches, "dtypes": dtypes,
                     "repeats": args.repeats},
        "depthwise": depthwise,
        "flops_source": "XLA cost_analysis() of the compiled jaxdream program (XLA's count); "
                        "torch TFLOP/s divide the same count by torch's time",
        "parity": None, "rows": [], "skipped": [], "notes": [],
    }

    def write_json() -> None:
        if args.json:
            results["elapsed_s"] = round(elapsed(), 1)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    # ---------------------------------------------------------------- compile, up front
    compiler = Compiler(args.compile_workers)
    for config in configs:
        engine = Engine(model, settings, config.batch, bucket=1,
                        compute_dtype=None if config.dtype == "float32" else config.dtype)
        buffer, sample = engine._stack(list(pools[config.size][:config.batch]),
                                       item_params[:config.batch], (config.size, config.size))
        config.images, config.params = engine._place((buffer, sample))
        config.state = engine._state
        config.lowered = _jitted(engine._graphdef, settings, engine.compute_dtype).lower(
            engine._state, config.images, config.params)
        compiler.submit(config)
    for _ in range(max(1, args.compile_workers)):
        compiler.submit(None)  # type: ignore[arg-type]
    say(f"[{elapsed():5.1f} s] {len(configs)} programs traced; compiling "
        f"{min(len(configs), args.compile_workers)} at a time")

    # While XLA compiles: how XLA counts loops, the activation check, XLA's count of a step.
    multiplied = loop_bodies_multiplied(args.steps)
    size0 = sizes[0]
    photo = pools[size0][0]
    graphdef, state = nnx.split(model.module)

    def jax_features(dtype: Any) -> np.ndarray:
        cast = state if dtype is None else jax.tree.map(
            lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating)
            else leaf, state)
        run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, [layer])[layer])
        x = jnp.asarray(photo[None])
        out = run(cast, x if dtype is None else x.astype(dtype))
        return np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)

    parity: dict[str, Any] = {"tolerance": PARITY_TOLERANCE, "image": f"{size0}x{size0}"}
    forward = None
    if torch is not None:
        forward = torch_lite(load_state_dict(model.weights_path), LITE0, layer_index,
                             torch_device)
        pixels = torch.from_numpy(photo.transpose(2, 0, 1)[None].copy()).to(torch_device)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                ref = forward(pixels).float().cpu().numpy()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        with jax.default_matmul_precision("highest"):
            ours = jax_features(None)
        scale = float(np.abs(ref).max()) + 1e-12
        error = float(np.abs(ours - ref).max()) / scale
        parity["float32"] = error
        parity["ok"] = bool(error < PARITY_TOLERANCE)
        say(f"[{elapsed():5.1f} s] parity at {layer} on one {size0}x{size0} image, float32 at "
            f"highest precision: max |jax - torch| / max |torch| = {error:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e}) -> {'ok' if parity['ok'] else 'FAILED'}")
        if not parity["ok"]:
            say("WARNING: the two networks disagree; the timings below are not comparable")
        if "bfloat16" in dtypes:
            with torch.no_grad(), torch.autocast(device_type=torch_device.type,
                                                 dtype=torch.bfloat16):
                ref16 = forward(pixels).float().cpu().numpy()
            ours16 = jax_features(jnp.bfloat16)
            parity["bfloat16_jax_vs_float32"] = float(np.abs(ours16 - ref).max()) / scale
            parity["bfloat16_torch_vs_float32"] = float(np.abs(ref16 - ref).max()) / scale
            say(f"          bfloat16 (information, against the float32 reference): jax "
                f"{parity['bfloat16_jax_vs_float32']:.2e}, torch "
                f"{parity['bfloat16_torch_vs_float32']:.2e}")
        del pixels
    results["parity"] = parity

    # XLA's count of one step at each octave (a one-octave, one-step program at that size,
    # batch 1; lowered only, not compiled), to complete a count that takes each loop body
    # once. Counts grow linearly with the batch (checked on CPU: batch 2 counts 1.99x batch
    # 1), so one probe per size and dtype serves every batch.
    one_step = dataclasses.replace(settings, octaves=1, steps=1)
    step_counts: dict[tuple[int, str], float | str] = {}
    for config in configs:
        key = (config.size, config.dtype)
        if key not in step_counts:
            if elapsed() > 0.6 * args.budget:
                step_counts[key] = "skipped: out of time"
                continue
            try:
                engine = Engine(model, one_step, 1, bucket=1, compute_dtype=None
                                if config.dtype == "float32" else config.dtype)
                total = 0.0
                for shape in octave_shapes(config.size, config.size, args.octaves,
                                           args.octave_scale):
                    buffer, sample = engine._stack([np.zeros((*shape, 3), np.float32)],
                                                   item_params[:1], shape)
                    lowered = _jitted(engine._graphdef, one_step, engine.compute_dtype).lower(
                        engine._state, *engine._place((buffer, sample)))
                    count = flops_of(lowered.cost_analysis())
                    if count is None:
                        # XLA's GPU backend counts only compiled programs (seen on an H200:
                        # the lowered program's analysis had no flops).
                        count = cost_flops(lowered.compile())
                    if count is None:
                        raise ValueError("no flops in XLA's cost analysis")
                    total += count
                step_counts[key] = total
            except Exception as error:
                step_counts[key] = f"{type(error).__name__}: {error}"
    for config in configs:
        count = step_counts.get((config.size, config.dtype), "skipped: out of time")
        if isinstance(count, float):
            config.step_flops = count * config.batch
    for (size, dtype), count in step_counts.items():
        if not isinstance(count, float):
            results["notes"].append(f"{size}x{size} {dtype}: no XLA count of one step ({count})")
    say(f"[{elapsed():5.1f} s] XLA's count of one step taken")

    # ---------------------------------------------------------------- wait for compiles
    compile_deadline = args.budget - 45.0
    for config in configs:
        while not config.done.wait(timeout=1.0):
            if elapsed() > compile_deadline and not compiler.cancelled:
                compiler.cancelled = True
                say(f"[{elapsed():5.1f} s] out of compile time: programs not started are "
                    f"skipped, those compiling are waited for until {args.budget - 15:.0f} s")
            if elapsed() > args.budget - 15.0:
                break
        if not config.done.is_set():
            config.compile_error = "skipped: still compiling when the time ran out"
            say(f"[{elapsed():5.1f} s] {config.name}: {config.compile_error}")
            continue
        if config.compile_error:
            say(f"[{elapsed():5.1f} s] {config.name}: {config.compile_error}")
            continue
        raw = cost_flops(config.program)
        config.xla_flops_raw = raw
        config.grouped_convs = grouped_conv_count(config.program)
        if raw is None:
            config.flops_method = "no flop count from XLA"
        elif args.steps <= 1:
            config.flops, config.flops_method = raw, "XLA count as reported"
        elif config.step_flops is None:
            if multiplied:
                config.flops, config.flops_method = raw, "XLA count as reported (unchecked)"
            else:
                config.flops_method = ("none: XLA counts each step loop once and the count of "
                                       "one step is missing")
        elif multiplied and raw > (args.steps + 1) / 2 * config.step_flops:
            # Were each loop body counted once, raw would be about one step's count plus
            # the octave resizes: far below steps x one step's count.
            config.flops, config.flops_method = raw, "XLA count as reported (loops counted)"
        else:
            config.flops = raw + (args.steps - 1) * config.step_flops
            config.flops_method = ("XLA count + (steps-1) x XLA's count of one step (XLA "
                                   "counts each step loop's body once)")
        say(f"[{elapsed():5.1f} s] compiled {config.name} in {config.compile_s:6.1f} s; "
            f"grouped convolutions in it: {config.grouped_convs}; XLA flops/call "
            f"{'n/a' if raw is None else f'{raw / 1e9:.1f} G'}"
            + ("" if config.flops is None or config.flops == raw else
               f" -> {config.flops / 1e9:.1f} G with the step loops counted"))
    methods = sorted({c.flops_method for c in configs if c.flops_method})
    if methods:
        say(f"TFLOP/s below: {'; '.join(methods)}")
        results["flops_method"] = methods

    # ---------------------------------------------------------------- timing
    header = (f"{'config':34s} {'jax img/s':>10s} {'TFLOP/s':>8s} {'compile':>8s} "
              f"{'torch img/s':>12s} {'TFLOP/s':>8s} {'jax/torch':>10s}")
    say("")
    say("timings (XLA's flop count; torch TFLOP/s use the same count, the work being the same)")
    say(header)
    per_image: dict[tuple[int, str, str], float] = {}  # (size, dtype, side) -> s/image seen

    def estimate(config: Config, side: str) -> float:
        """Seconds a measurement will take, from the nearest one done (0 when none)."""
        seen = per_image.get((config.size, config.dtype, side)) or per_image.get(
            (config.size, "float32", side))
        return 0.0 if seen is None else seen * config.batch * (args.repeats + 1)

    for config in configs:
        row: dict[str, Any] = {"size": config.size, "batch": config.batch,
                               "dtype": config.dtype, "compile_s": config.compile_s,
                               "xla_flops_per_call_raw": config.xla_flops_raw,
                               "flops_per_call": config.flops,
                               "flops_method": config.flops_method,
                               "grouped_convs": config.grouped_convs}
        if config.program is None:
            results["skipped"].append({**row, "why": config.compile_error})
            write_json()
            continue
        deadline = args.budget - 5.0
        if elapsed() + estimate(config, "jax") > deadline:
            why = "skipped: out of time"
            say(f"{config.name:34s} {why}")
            results["skipped"].append({**row, "why": why})
            write_json()
            continue
        program, state_c, images, params = config.program, config.state, config.images, \
            config.params
        seconds, calls = timed(lambda: program(state_c, images, params).block_until_ready(),
                               args.repeats, deadline)
        per_image[(config.size, config.dtype, "jax")] = seconds / config.batch
        row.update(jax_s_per_call=seconds, jax_calls=calls, jax_img_s=config.batch / seconds,
                   jax_tflops=None if config.flops is None else config.flops / seconds / 1e12)
        config.program = None  # free the executable once measured

        if forward is not None:
            if elapsed() + estimate(config, "torch") > deadline:
                row["torch_skipped"] = "out of time"
            else:
                batch = torch.from_numpy(np.ascontiguousarray(
                    pools[config.size][:config.batch].transpose(0, 3, 1, 2))).to(torch_device)
                autocast = torch.bfloat16 if config.dtype == "bfloat16" else None

                def run_torch() -> None:
                    torch_dream(forward, batch, octaves=args.octaves,
                                octave_scale=args.octave_scale, steps=args.steps,
                                autocast_dtype=autocast)
                    sync()

                try:
                    t_seconds, t_calls = timed(run_torch, args.repeats, deadline)
                    per_image[(config.size, config.dtype, "torch")] = t_seconds / config.batch
                    row.update(torch_s_per_call=t_seconds, torch_calls=t_calls,
                               torch_img_s=config.batch / t_seconds,
                               torch_tflops=None if config.flops is None
                               else config.flops / t_seconds / 1e12,
                               ratio_img_s=t_seconds / seconds)
                except Exception as error:  # e.g. out of memory: reported, the run goes on
                    row["torch_skipped"] = f"{type(error).__name__}: {error}"[:300]
                del batch
                if torch_device.type == "cuda":
                    torch.cuda.empty_cache()

        def cell(value: Any, fmt: str) -> str:
            width = int(fmt.split(".")[0])
            return "-".rjust(width) if value is None else format(value, fmt)

        say(f"{config.name:34s} {cell(row.get('jax_img_s'), '10.2f')} "
            f"{cell(row.get('jax_tflops'), '8.2f')} {cell(config.compile_s, '7.1f')}s "
            f"{cell(row.get('torch_img_s'), '12.2f')} {cell(row.get('torch_tflops'), '8.2f')} "
            f"{cell(row.get('ratio_img_s'), '10.2f')}"
            + (f"  (torch: {row['torch_skipped']})" if "torch_skipped" in row else ""))
        results["rows"].append(row)
        write_json()

    # ---------------------------------------------------------------- summary
    say("")
    say(f"summary ({device.device_kind}; jaxdream {depthwise} depthwise; img/s = images "
        f"dreamed per second, {args.octaves}x{args.steps} steps each; TFLOP/s from XLA's "
        f"count; jax/torch = throughput ratio)")
    say("| size | batch | dtype | jaxdream img/s | jaxdream TFLOP/s | compile s | "
        "PyTorch img/s | PyTorch TFLOP/s | jaxdream / PyTorch |")
    say("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def md(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in results["rows"]:
        say(f"| {row['size']}x{row['size']} | {row['batch']} | {row['dtype']} | "
            f"{md(row.get('jax_img_s'), '.2f')} | {md(row.get('jax_tflops'), '.2f')} | "
            f"{md(row.get('compile_s'), '.1f')} | {md(row.get('torch_img_s'), '.2f')} | "
            f"{md(row.get('torch_tflops'), '.2f')} | {md(row.get('ratio_img_s'), '.2f')} |")
    for row in results["skipped"]:
        say(f"| {row['size']}x{row['size']} | {row['batch']} | {row['dtype']} | "
            f"{row['why']} | | | | | |")
    for note in results["notes"]:
        say(f"note: {note}")
    if parity.get("ok") is False:
        say("WARNING: the activation check FAILED; see above")
    say(f"total {elapsed():.1f} s")
    write_json()
    if args.json:
        say(f"JSON written to {args.json}")
    sys.stdout.flush()
    sys.stderr.flush()
    # Compiles may still run in daemon threads if time ran out; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    main()
