"""ResNet (He et al., 2015) as torchvision builds it, in Flax NNX: bottleneck blocks, "v1.5".

torchvision's bottleneck puts the stride of a downsampling block on its 3x3 convolution
(``conv2``) rather than on the first 1x1 as the paper did; this is the variant called ResNet
v1.5, and it is what torchvision's checkpoints were trained with, so it is what is built here.
The shortcut of the first block of each stage is a 1x1 convolution (with the same stride) and a
batch norm whenever the shape changes.

The module takes NHWC pixels on the 0..255 RGB scale and applies torchvision's ImageNet
normalisation itself. It returns named endpoints: ``conv1`` (after bn1 and ReLU), ``maxpool``,
every block ``layerS.B``, every stage ``layerS`` (the same array as the stage's last block, so
both names can be asked for), and ``logits``; it stops at the deepest endpoint requested.

Parameter paths mirror torchvision's keys (``layer2.0.conv2`` -> ``("layer2", 0, "conv2")``),
with each convolution and its batch norm merged into one :class:`ConvBN`; ``key_map`` maps every
tensor of a torchvision ``state_dict`` to exactly one parameter here.

Only ResNet-50 is exported; ResNet-101 and -152 differ only in ``ResNetConfig.layers``
((3, 4, 23, 3) and (3, 8, 36, 3)).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

# The configuration, endpoints and key map live in the light spec module.
from jaxdream.models.resnet_spec import (  # noqa: F401  (part of this module's API)
    DEFAULT_LAYERS, EXPANSION, OFFICIAL_WEIGHTS, PREPROCESSING, RESNET50, ResNetConfig,
    endpoint_table, ignored_key, key_map,
)
from jaxdream.models.layers import IMAGENET_MEAN, IMAGENET_STD, ConvBN, Linear, run_stages
from jaxdream.models.pooling import max_pool


#: torchvision's BatchNorm2d default.
BN_EPS = 1e-5


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand; projection shortcut when shapes change."""

    def __init__(self, in_channels: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        out_channels = planes * EXPANSION
        self.conv1 = ConvBN(in_channels, planes, 1, activation="relu", eps=BN_EPS, padding=0,
                            rngs=rngs)
        self.conv2 = ConvBN(planes, planes, 3, stride, activation="relu", eps=BN_EPS,
                            padding=1, rngs=rngs)
        self.conv3 = ConvBN(planes, out_channels, 1, activation=None, eps=BN_EPS, padding=0,
                            rngs=rngs)
        # The shortcut is built with stride 1 and fed every ``stride``-th pixel instead: a 1x1
        # convolution with stride s and no padding reads exactly x[:, ::s, ::s] (output size
        # floor((H - 1) / s) + 1 = ceil(H / s) = len(range(0, H, s))), and at stride 1 ConvBN
        # computes it as one matrix product. tests/test_parity_resnet.py checks the two agree.
        self.downsample = (ConvBN(in_channels, out_channels, 1, 1, activation=None, eps=BN_EPS,
                                  padding=0, rngs=rngs)
                           if stride != 1 or in_channels != out_channels else None)
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv3(self.conv2(self.conv1(x)))
        if self.downsample is None:
            shortcut = x
        else:
            s = self.stride
            shortcut = self.downsample(x[:, ::s, ::s, :] if s != 1 else x)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """Bottleneck ResNet returning a dict of endpoints; input NHWC pixels on the 0..255 scale."""

    def __init__(self, config: ResNetConfig = RESNET50, *, rngs: nnx.Rngs):
        if len(config.layers) != 4:
            raise ValueError(f"a ResNet has 4 stages, got layers={config.layers}")
        self.config = config
        self.conv1 = ConvBN(3, config.stem_channels, 7, 2, activation="relu", eps=BN_EPS,
                            padding=3, rngs=rngs)
        channels = config.stem_channels
        stages = []
        for planes, stride, blocks in zip(config.stage_planes(), config.stage_strides(),
                                          config.layers):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(channels, planes, stride if b == 0 else 1, rngs=rngs))
                channels = planes * EXPANSION
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = Linear(channels, config.num_classes, rngs=rngs)

    def endpoint_names(self) -> list[str]:
        return list(endpoint_table(self.config))

    def __call__(self, pixels: jax.Array,
                 endpoints: Collection[str] | None = None) -> dict[str, jax.Array]:
        """Runs up to the deepest requested endpoint (all of them if ``endpoints`` is None)."""
        x = pixels / 255.0
        x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
        return run_stages(self._stages(), x, self.endpoint_names(), endpoints)

    def _stages(self) -> Iterator[tuple[str, Callable[[jax.Array], jax.Array]]]:
        yield "conv1", self.conv1
        yield "maxpool", lambda h: max_pool(h, 3, 2, padding=1)
        for s, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1):
            for b, block in enumerate(stage):
                yield f"layer{s}.{b}", block
            # The stage's output is its last block's: an alias, computed once.
            yield f"layer{s}", lambda h: h
        yield "logits", lambda h: self.fc(jnp.mean(h, axis=(1, 2)))


def build(rngs: nnx.Rngs) -> nnx.Module:
    """torchvision's ``resnet50``."""
    return ResNet(RESNET50, rngs=rngs)
