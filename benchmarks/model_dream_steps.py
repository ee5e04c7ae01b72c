"""Per-model CPU dream-step time, jaxdream against eager PyTorch on the same weights, same run.

    python benchmarks/model_dream_steps.py [--models googlenet,vgg16] [--steps 5]

For every registered model: one classic dream step (roll jitter up to 32 px, gradient of
0.5*mean(act^2) at the model's default layer, step normalised to 1.5 by this image's mean
|grad|, clip) on a 512x384 image at batch 1. jaxdream runs ``--steps`` steps inside one
compiled program per call; PyTorch runs the same step eagerly, stopping its forward pass at the
same layer. EfficientNet-Lite uses its shipped weights (the PyTorch side is a direct port, see
_common.py); torchvision models use random weights written to a checkpoint and loaded
by both sides (timing does not depend on the values). The layer's activations are compared
before timing, so both sides compute the same thing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, median_seconds, torch_lite, torch_steps  # noqa: E402


class _Stop(Exception):
    pass


def torchvision_forward(model: Any, layer: str):  # type: ignore[no-untyped-def]
    """Runs a torchvision model until ``layer``'s module has produced its output."""
    target = dict(model.named_modules())[_module_name(model, layer)]
    captured: dict[str, Any] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured["out"] = output
        raise _Stop

    target.register_forward_hook(hook)

    def forward(pixels):  # type: ignore[no-untyped-def]
        import torch

        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        try:
            model((pixels / 255.0 - mean) / std)
        except _Stop:
            pass
        return captured.pop("out")

    return forward


_VGG_LAYERS = {"conv4_3": "features.22"}


def _module_name(model: Any, layer: str) -> str:
    if type(model).__name__ == "VGG":
        return _VGG_LAYERS[layer]
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    from jaxdream.ascent import StaticSettings
    from jaxdream.engine import Engine, ItemParams
    from jaxdream.models import MODELS, load_model
    from jaxdream.models.checkpoint import load_state_dict
    from jaxdream.models.efficientnet_lite import LITE0, LITE1, LITE2

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"machine: {machine_line()}")
    print(f"versions: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}"
          f", torchvision {torchvision.__version__}")
    print(f"workload: classic dream step at the default layer, 512x384, batch 1, "
          f"{args.steps} steps per timed call, median of {args.repeats}")
    names = args.models.split(",") if args.models else list(MODELS)
    lite_configs = {"efficientnet_lite0": LITE0, "efficientnet_lite1": LITE1,
                    "efficientnet_lite2": LITE2}
    rng = np.random.default_rng(0)
    photo = rng.uniform(0, 255, (384, 512, 3)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            spec = MODELS[name]
            layer = spec.default_layers
            if name not in lite_configs and not hasattr(torchvision.models, name):
                print(f"{name:20s} {layer:12s} skipped: no eager PyTorch model of it here "
                      f"(torchvision has none; the Caffe networks' parity test has its own "
                      f"transcription)", flush=True)
                continue
            if name in lite_configs:
                model = load_model(name)
                forward = torch_lite(load_state_dict(model.weights_path), lite_configs[name],
                                     int(layer.removeprefix("block")))
            else:
                torch.manual_seed(0)
                kwargs = ({"aux_logits": False, "init_weights": True, "transform_input": True}
                          if name == "googlenet" else {})
                reference = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
                # Frozen, as pytorch-deepdream freezes them: a dream needs the input's
                # gradient only, and weights that require grad make backward() compute every
                # kernel's gradient too (VGG16's eager step ran 1.6x slower that way).
                reference.requires_grad_(False)
                path = Path(scratch) / f"{name}.pth"
                torch.save(reference.state_dict(), path)
                model = load_model(name, path)
                forward = torchvision_forward(reference, layer)
            with torch.no_grad():
                ref = forward(torch.from_numpy(photo.transpose(2, 0, 1)[None].copy())).numpy()
            ours = np.asarray(model.module(jnp.asarray(photo[None]), [layer])[layer])
            error = float(np.abs(ours.transpose(0, 3, 1, 2) - ref).max()
                          / (np.abs(ref).max() + 1e-12))
            assert error < 1e-3, f"{name}: jax and torch disagree at {layer} ({error:.1e})"

            torch_s = median_seconds(lambda: torch_steps(forward, photo[None], args.steps),
                                      args.repeats) / args.steps
            settings = StaticSettings((layer,), octaves=1, steps=args.steps)
            engine = Engine(model, settings, batch_size=1)
            images, params = engine._place(engine._stack(
                [photo], [ItemParams(1.5, 32, 0, (1.0,))], photo.shape[:2]))
            program = engine._program(images, params)
            jax_s = median_seconds(
                lambda: program(engine._state, images, params).block_until_ready(),
                args.repeats) / args.steps
            rows.append((name, layer, jax_s, torch_s, error))
            print(f"{name:20s} {layer:12s} jaxdream {jax_s * 1000:8.1f} ms/step   "
                  f"torch eager {torch_s * 1000:8.1f} ms/step   ratio torch/jax "
                  f"{torch_s / jax_s:5.2f}   (parity {error:.1e})", flush=True)


if __name__ == "__main__":
    main()
