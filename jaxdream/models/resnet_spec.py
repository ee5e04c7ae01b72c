"""ResNet-50's configuration, endpoints, key map and catalogue entry (no JAX; the network is
:mod:`jaxdream.models.resnet`)."""

from __future__ import annotations

import dataclasses

from jaxdream.models.keys import KeyMapEntry, conv_bn_entries, linear_entries, training_only
from jaxdream.models.registry import register_torchvision

#: Bottleneck output channels are ``planes * EXPANSION``.
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A bottleneck ResNet: blocks per stage, base width, classes."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    stem_channels: int = 64
    #: Bottleneck width of the first stage; doubles with every stage.
    base_planes: int = 64
    num_classes: int = 1000

    def stage_planes(self) -> list[int]:
        return [self.base_planes * 2 ** i for i in range(len(self.layers))]

    def stage_strides(self) -> list[int]:
        return [1] + [2] * (len(self.layers) - 1)


RESNET50 = ResNetConfig(layers=(3, 4, 6, 3))


def endpoint_table(config: ResNetConfig = RESNET50) -> dict[str, tuple[int, int]]:
    """Endpoint name -> (channels, stride relative to the input); stride 0 for ``logits``.

    A stage's name follows its last block, with the same entry (it is the same array).
    """
    table: dict[str, tuple[int, int]] = {"conv1": (config.stem_channels, 2),
                                         "maxpool": (config.stem_channels, 4)}
    stride = 4
    for s, (planes, stage_stride, blocks) in enumerate(
            zip(config.stage_planes(), config.stage_strides(), config.layers), 1):
        stride *= stage_stride
        for b in range(blocks):
            table[f"layer{s}.{b}"] = (planes * EXPANSION, stride)
        table[f"layer{s}"] = (planes * EXPANSION, stride)
    table["logits"] = (config.num_classes, 0)
    return table


def key_map(config: ResNetConfig = RESNET50) -> list[KeyMapEntry]:
    """(target parameter path, checkpoint key, transpose) for every parameter of the model."""
    entries: list[KeyMapEntry] = []

    def conv_bn(target: tuple[str | int, ...], conv: str, bn: str) -> None:
        entries.extend(conv_bn_entries(target, conv, bn))

    conv_bn(("conv1",), "conv1", "bn1")
    channels = config.stem_channels
    for s, (planes, stride, blocks) in enumerate(
            zip(config.stage_planes(), config.stage_strides(), config.layers), 1):
        for b in range(blocks):
            prefix, target = f"layer{s}.{b}", (f"layer{s}", b)
            for i in (1, 2, 3):
                conv_bn((*target, f"conv{i}"), f"{prefix}.conv{i}", f"{prefix}.bn{i}")
            if b == 0 and (stride != 1 or channels != planes * EXPANSION):
                conv_bn((*target, "downsample"), f"{prefix}.downsample.0",
                        f"{prefix}.downsample.1")
            channels = planes * EXPANSION
    entries.extend(linear_entries("fc", "fc"))
    return entries


#: Layer to dream on by default: ``layer3``, the mid-level stage that pytorch-deepdream uses
#: for its ResNet-50 images (its README exposes layer1..layer4 and calls ResNet-50 "nice for
#: mid-level features"; its showcase and video settings use ``layer3``).
DEFAULT_LAYERS = "layer3"


#: One line for the model catalogue.
PREPROCESSING = ("(x / 255 - mean) / std on RGB 0..255, ImageNet mean (0.485, 0.456, 0.406) "
                 "std (0.229, 0.224, 0.225); PyTorch symmetric padding")


#: torchvision's ResNet50_Weights.IMAGENET1K_V1 (the classic 76.13% top-1 weights) and the
#: hash prefix in its file name.
OFFICIAL_WEIGHTS = ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61")

ignored_key = training_only

register_torchvision(
    "resnet50", "ResNet-50 (torchvision v1.5, IMAGENET1K_V1, 25.6 M parameters)",
    module="jaxdream.models.resnet", key_map=key_map(), ignore_key=ignored_key,
    endpoints=endpoint_table(), default_layers=DEFAULT_LAYERS, preprocessing=PREPROCESSING,
    official_weights=OFFICIAL_WEIGHTS)
