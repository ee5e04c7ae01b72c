"""GoogLeNet's block widths, endpoints, key map and catalogue entry (no JAX; the network is
:mod:`jaxdream.models.googlenet`)."""

from __future__ import annotations

import dataclasses
import functools

from jaxdream.models.keys import KeyMapEntry, conv_bn_entries, linear_entries, training_only
from jaxdream.models.registry import register_torchvision

DEFAULT_LAYERS = "inception4c"


PREPROCESSING = ("x / 127.5 - 1 on RGB 0..255 (ImageNet mean/std then torchvision's "
                 "transform_input); ceil-mode max pools")


#: torchvision's download URL and the SHA-256 prefix in its file name.
OFFICIAL_WEIGHTS = ("https://download.pytorch.org/models/googlenet-1378be20.pth", "1378be20")


@dataclasses.dataclass(frozen=True)
class InceptionSpec:
    """Widths of one inception block, in torchvision's argument order."""

    in_channels: int
    ch1x1: int
    ch3x3_reduce: int
    ch3x3: int
    ch5x5_reduce: int
    #: Output of the "5x5" branch, whose convolution is 3x3 in torchvision.
    ch5x5: int
    pool_proj: int

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


#: The nine inception blocks of GoogLeNet (the paper's Table 1, torchvision's arguments).
_INCEPTIONS: dict[str, InceptionSpec] = {
    "inception3a": InceptionSpec(192, 64, 96, 128, 16, 32, 32),
    "inception3b": InceptionSpec(256, 128, 128, 192, 32, 96, 64),
    "inception4a": InceptionSpec(480, 192, 96, 208, 16, 48, 64),
    "inception4b": InceptionSpec(512, 160, 112, 224, 24, 64, 64),
    "inception4c": InceptionSpec(512, 128, 128, 256, 24, 64, 64),
    "inception4d": InceptionSpec(512, 112, 144, 288, 32, 64, 64),
    "inception4e": InceptionSpec(528, 256, 160, 320, 32, 128, 128),
    "inception5a": InceptionSpec(832, 256, 160, 320, 32, 128, 128),
    "inception5b": InceptionSpec(832, 384, 192, 384, 48, 128, 128),
}


#: The stem's BasicConv2d layers: (in, out, kernel, stride, padding).
_STEM: dict[str, tuple[int, int, int, int, int]] = {
    "conv1": (3, 64, 7, 2, 3),
    "conv2": (64, 64, 1, 1, 0),
    "conv3": (64, 192, 3, 1, 1),
}


#: The stride-2 max pools between stages (window, stride); all use ceil_mode=True.
_POOLS: dict[str, tuple[int, int]] = {
    "maxpool1": (3, 2),
    "maxpool2": (3, 2),
    "maxpool3": (3, 2),
    "maxpool4": (2, 2),
}


#: Every endpoint, in the order the network computes them.
ENDPOINTS: tuple[str, ...] = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
    "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b", "logits",
)


@dataclasses.dataclass(frozen=True)
class GoogLeNetConfig:
    """Class count and block widths; the block names are the fixed endpoint names."""

    num_classes: int = 1000
    inceptions: tuple[tuple[str, InceptionSpec], ...] = tuple(_INCEPTIONS.items())


DEFAULT_CONFIG = GoogLeNetConfig()


def endpoint_table(config: GoogLeNetConfig = DEFAULT_CONFIG) -> dict[str, tuple[int, int]]:
    """Endpoint name -> (channels, stride relative to the input; 0 for logits).

    Strides are nominal: with ceil-mode pooling a side that is not a multiple of the stride can
    come out one pixel smaller than ``ceil(side / stride)``.
    """
    inceptions = dict(config.inceptions)
    table: dict[str, tuple[int, int]] = {}
    channels, stride = 3, 1
    for name in ENDPOINTS:
        if name in _STEM:
            channels, stride = _STEM[name][1], stride * _STEM[name][3]
        elif name in _POOLS:
            stride *= _POOLS[name][1]
        elif name == "logits":
            channels, stride = config.num_classes, 0
        else:
            channels = inceptions[name].out_channels
        table[name] = (channels, stride)
    return table


def key_map(config: GoogLeNetConfig = DEFAULT_CONFIG) -> list[KeyMapEntry]:
    """(target parameter path, checkpoint key, transpose) for every parameter of the model,
    in torchvision's ``state_dict`` naming."""
    entries: list[KeyMapEntry] = []

    def basic_conv(target: tuple[str | int, ...], prefix: str) -> None:
        entries.extend(conv_bn_entries(target, f"{prefix}.conv", f"{prefix}.bn"))

    for name in _STEM:
        basic_conv((name,), name)
    # torchvision's branches 2-4 are nn.Sequential; branch4.0 is the parameter-free max pool.
    branches = (("branch1", "branch1"), ("branch2_reduce", "branch2.0"), ("branch2", "branch2.1"),
                ("branch3_reduce", "branch3.0"), ("branch3", "branch3.1"),
                ("branch4_proj", "branch4.1"))
    for name, _ in config.inceptions:
        for attribute, torch_name in branches:
            basic_conv((name, attribute), f"{name}.{torch_name}")
    entries.extend(linear_entries("fc", "fc"))
    return entries

#: Besides BN's counters, the two auxiliary classifiers (``aux1.*``, ``aux2.*``) that
#: torchvision's checkpoint carries for training only.
ignored_key = functools.partial(training_only, prefixes=("aux1.", "aux2."))

register_torchvision(
    "googlenet", "GoogLeNet / Inception v1 (torchvision, 6.6 M parameters): the classic DeepDream",
    module="jaxdream.models.googlenet", key_map=key_map(), ignore_key=ignored_key,
    endpoints=endpoint_table(), default_layers=DEFAULT_LAYERS, preprocessing=PREPROCESSING,
    official_weights=OFFICIAL_WEIGHTS)
