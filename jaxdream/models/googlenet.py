"""GoogLeNet (Inception v1; Szegedy et al., 2014) in Flax NNX, laid out as torchvision builds it.

The module returns named endpoints (``conv1``, ``maxpool1``, ``conv2``, ``conv3``, ``maxpool2``,
``inception3a`` ... ``inception5b``, ``logits``) and stops at the deepest one that was asked
for, so a dream on ``inception4c`` (the classic DeepDream layer) never computes the rest.

torchvision's layout, which its ImageNet weights (``googlenet-1378be20.pth``) fit, differs from
the paper in two places that matter here:

* every convolution is ``BasicConv2d``: a bias-free conv, BatchNorm (eps=0.001) and ReLU; the
  paper's network had no batch norm;
* the "5x5" branch of every inception block uses a 3x3 convolution (a long-standing quirk kept
  for the sake of the published weights, pytorch/vision#906). We follow torchvision, because
  its weights are what users load.

All max pools use ``ceil_mode=True``; the four stride-2 ones have no padding, so a feature map
is not always ``ceil(side / stride)`` when the side is not a multiple of 32: a 171-pixel side
goes 86, 43, 21, 10, 5 where ``ceil(171 / 32)`` would be 6.

The checkpoint also holds the two auxiliary classifiers (``aux1.*``, ``aux2.*``) used only in
training; they are not part of this module and :func:`ignored_key` names them explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Block widths, endpoints and the key map live in the light spec module.
from jaxdream.models.googlenet_spec import (  # noqa: F401  (part of this module's API)
    _POOLS, _STEM, DEFAULT_CONFIG, DEFAULT_LAYERS, ENDPOINTS, OFFICIAL_WEIGHTS, PREPROCESSING,
    GoogLeNetConfig, InceptionSpec, endpoint_table, ignored_key, key_map,
)
from jaxdream.models.layers import IMAGENET_MEAN, IMAGENET_STD, ConvBN, Linear, run_stages
from jaxdream.models.pooling import max_pool


#: BatchNorm epsilon of torchvision's BasicConv2d.
BN_EPS = 1e-3


def _input_affine() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (scale, shift) taking 0..255 pixels to what the first convolution expects.

    Users of torchvision's weights feed ``n = (p / 255 - mean) / std``; with
    ``transform_input=True`` (how the weights are used) the model then computes
    ``n * (std / 0.5) + (mean - 0.5) / 0.5``. Composing the two affine maps gives
    ``p * (1 / 255) / 0.5 - 1``: torchvision hard-codes the ImageNet mean and std in
    ``transform_input``, so they cancel and every channel ends up as ``p / 127.5 - 1`` (inputs in
    [-1, 1], the scaling of the ported original weights). The composition is written out here
    rather than hard-coded so that the reasoning is checkable.
    """
    scales, shifts = [], []
    for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True):
        # normalise: p * a1 + b1
        a1, b1 = 1.0 / (255.0 * std), -mean / std
        # transform_input: n * a2 + b2
        a2, b2 = std / 0.5, (mean - 0.5) / 0.5
        scales.append(a1 * a2)
        shifts.append(b1 * a2 + b2)
    return tuple(scales), tuple(shifts)


_INPUT_SCALE, _INPUT_SHIFT = _input_affine()
assert np.allclose(_INPUT_SCALE, 1 / 127.5) and np.allclose(_INPUT_SHIFT, -1.0)


def _basic_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *,
                rngs: nnx.Rngs) -> ConvBN:
    """torchvision's BasicConv2d: bias-free conv, BatchNorm(eps=1e-3), ReLU."""
    return ConvBN(cin, cout, kernel, stride, activation="relu", eps=BN_EPS, padding=padding,
                  rngs=rngs)


class Inception(nnx.Module):
    """Four parallel branches concatenated on channels, in this order: 1x1; 1x1 -> 3x3;
    1x1 -> 3x3 (the paper's 5x5); 3x3 max pool (stride 1, pad 1, ceil mode) -> 1x1."""

    def __init__(self, spec: InceptionSpec, *, rngs: nnx.Rngs):
        cin = spec.in_channels
        self.branch1 = _basic_conv(cin, spec.ch1x1, 1, rngs=rngs)
        self.branch2_reduce = _basic_conv(cin, spec.ch3x3_reduce, 1, rngs=rngs)
        self.branch2 = _basic_conv(spec.ch3x3_reduce, spec.ch3x3, 3, padding=1, rngs=rngs)
        self.branch3_reduce = _basic_conv(cin, spec.ch5x5_reduce, 1, rngs=rngs)
        # kernel_size=3 where the paper has 5, exactly as in torchvision (pytorch/vision#906).
        self.branch3 = _basic_conv(spec.ch5x5_reduce, spec.ch5x5, 3, padding=1, rngs=rngs)
        self.branch4_proj = _basic_conv(cin, spec.pool_proj, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1(x),
            self.branch2(self.branch2_reduce(x)),
            self.branch3(self.branch3_reduce(x)),
            self.branch4_proj(max_pool(x, 3, 1, padding=1, ceil_mode=True)),
        ], axis=-1)


class GoogLeNet(nnx.Module):
    """GoogLeNet returning a dict of endpoints; input NHWC RGB pixels on the 0..255 scale."""

    def __init__(self, config: GoogLeNetConfig = DEFAULT_CONFIG, *, rngs: nnx.Rngs):
        self.config = config
        for name, (cin, cout, kernel, stride, padding) in _STEM.items():
            setattr(self, name, _basic_conv(cin, cout, kernel, stride, padding, rngs=rngs))
        for name, spec in config.inceptions:
            setattr(self, name, Inception(spec, rngs=rngs))
        last = config.inceptions[-1][1].out_channels
        # torchvision applies Dropout(0.2) before fc: the identity at inference.
        self.fc = Linear(last, config.num_classes, rngs=rngs)

    def endpoint_names(self) -> list[str]:
        return list(ENDPOINTS)

    def __call__(self, pixels: jax.Array,
                 endpoints: Collection[str] | None = None) -> dict[str, jax.Array]:
        """Runs up to the deepest requested endpoint (all of them if ``endpoints`` is None)."""
        # ImageNet mean/std normalisation followed by transform_input, folded into one affine
        # map (see _input_affine): it comes out as pixels / 127.5 - 1 on every channel.
        x = (pixels * jnp.asarray(_INPUT_SCALE, pixels.dtype)
             + jnp.asarray(_INPUT_SHIFT, pixels.dtype))
        return run_stages(self._stages(), x, self.endpoint_names(), endpoints)

    def _stages(self) -> Iterator[tuple[str, Callable[[jax.Array], jax.Array]]]:
        for name in ENDPOINTS:
            if name in _POOLS:
                window, stride = _POOLS[name]
                yield name, lambda h, w=window, s=stride: max_pool(h, w, s, ceil_mode=True)
            elif name == "logits":
                yield name, lambda h: self.fc(jnp.mean(h, axis=(1, 2)))
            else:
                yield name, getattr(self, name)


def build(rngs: nnx.Rngs) -> nnx.Module:
    """torchvision's GoogLeNet with 1000 ImageNet classes (random until weights are loaded)."""
    return GoogLeNet(DEFAULT_CONFIG, rngs=rngs)
