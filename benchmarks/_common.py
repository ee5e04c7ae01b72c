"""Shared by the benchmarks: machine description, median timing, and the eager PyTorch
EfficientNet-Lite reference (forward pass, classic dream step, classic dream with octaves).

Nothing here imports jaxdream, jax or torch at module level, so a benchmark can set
environment variables (e.g. XLA_PYTHON_CLIENT_PREALLOCATE) before those are imported.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    threads = os.cpu_count() or 1
    return f"{cpu_name()}, {threads} cores, {platform.system()} {platform.machine()}"


def median_seconds(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls.

    ``fn`` must block until its work is done (``block_until_ready``, a CUDA synchronise).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- PyTorch side
def torch_lite(state_dict: dict[str, np.ndarray], config: Any, layer_index: int,
               device: Any = "cpu"):  # type: ignore[no-untyped-def]
    """EfficientNet-Lite up to block ``layer_index`` in eager PyTorch, TF 'SAME' padding.

    A direct port of :mod:`jaxdream.models.efficientnet_lite` (the same checkpoint tensors);
    takes NCHW pixels on the 0..255 scale and returns that block's NCHW activations. Under
    ``torch.autocast`` the convolutions run in the autocast dtype.
    """
    import torch
    import torch.nn.functional as F

    weights = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
               for k, v in state_dict.items()}

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


def _classic_step(forward, x, generator, step_size: float, jitter: int,  # type: ignore[no-untyped-def]
                  autocast: Any = None):
    """One classic step on an NCHW float32 batch: one random roll for the whole batch, gradient
    of 0.5*mean(act^2) per image, step normalised by each image's own mean |grad|, clip."""
    import contextlib

    import torch

    oy, ox = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
    rolled = torch.roll(x, (oy, ox), (2, 3)).requires_grad_(True)
    with autocast if autocast is not None else contextlib.nullcontext():
        act = forward(rolled)
    act = act.float()
    (0.5 * act.pow(2).mean(dim=(1, 2, 3)).sum()).backward()
    grad = rolled.grad
    grad = grad * (step_size / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30))
    return torch.roll(rolled.detach() + grad, (-oy, -ox), (2, 3)).clamp_(0, 255)


def torch_steps(forward, images: np.ndarray, steps: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The classic step, eagerly, ``steps`` times on an NHWC batch (per-image normalisation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    for _ in range(steps):
        x = _classic_step(forward, x, generator, 1.5, 32)
    return x


def torch_dream(forward, images, *, octaves: int, octave_scale: float, steps: int,  # type: ignore[no-untyped-def]
                step_size: float = 1.5, jitter: int = 32, seed: int = 0,
                autocast_dtype: Any = None):
    """The classic dream (google/deepdream ``deepdream()``) of an NCHW float32 torch batch on
    the 0..255 scale, eagerly: octave pyramid by bilinear resizing (each octave from the
    previous one, sizes as jaxdream's ``octave_shapes``), smallest octave first, the detail
    carried up. Under ``autocast_dtype`` the network runs in that dtype under
    ``torch.autocast``; the image and its update stay float32.

    One jitter roll per step is shared by the batch (jaxdream rolls each image on its own;
    a shared roll is, if anything, cheaper for PyTorch).
    """
    import torch
    import torch.nn.functional as F

    from jaxdream.ascent import octave_shapes

    generator = torch.Generator().manual_seed(seed)
    autocast = (torch.autocast(device_type=images.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else None)
    shapes = octave_shapes(images.shape[2], images.shape[3], octaves, octave_scale)
    bases = [images]
    for shape in shapes[1:]:
        bases.append(F.interpolate(bases[-1], size=shape, mode="bilinear", align_corners=False))
    detail = torch.zeros_like(bases[-1])
    x = images
    for rank, base in enumerate(reversed(bases)):
        if rank > 0:
            detail = F.interpolate(detail, size=base.shape[2:], mode="bilinear",
                                   align_corners=False)
        x = base + detail
        for _ in range(steps):
            x = _classic_step(forward, x, generator, step_size, jitter, autocast)
        detail = x - base
    return x
