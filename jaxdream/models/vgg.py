"""VGG16 (Simonyan & Zisserman, 2014; configuration "D", no batch norm) in Flax NNX.

The network is torchvision's ``vgg16``: thirteen 3x3 convolutions with padding 1 and a bias,
each followed by a ReLU, in five stages closed by a 2x2/2 max pool; an adaptive average pool to
7x7 (so any input of at least 32x32 pixels works); and three fully connected layers. Endpoints
carry the Caffe names people know (``conv1_1`` ... ``conv5_3``, ``pool1`` ... ``pool5``,
``fc6``, ``fc7``, ``logits``). As in Caffe, where the ReLU works in place, a ``convX_Y``
endpoint is the activation *after* its ReLU (pytorch-deepdream calls the same tensor
``reluX_Y``), and so are ``fc6`` and ``fc7``; ``logits`` is the last layer's raw output.
Dropout is the identity at inference and has no parameters, so it is left out. The forward pass
stops at the deepest endpoint asked for: a dream on ``conv4_3`` never runs ``conv5_1`` or the
120 M parameters of the classifier.

Input is NHWC RGB on the 0..255 scale; the ImageNet normalisation torchvision's weights were
trained with, ``(x / 255 - mean) / std``, happens inside the forward pass.

The flatten before ``fc6``: torchvision flattens the pooled NCHW (512, 7, 7) map, so column
``c * 49 + h * 7 + w`` of its (4096, 25088) weight multiplies channel ``c`` at ``(h, w)``. Here
the pooled NHWC map is transposed to NCHW before flattening, which is one 25088-element
transpose per image, and ``fc6`` is an ordinary linear layer whose kernel is the checkpoint's
weight transposed like every other linear layer's. That keeps the key map inside what
``convert.py`` does (a plain transpose) and the flatten order visibly the same as torchvision's;
permuting the weight's rows at load time instead would save nothing measurable and hide the
layout in a reshape.

Weights: torchvision's ImageNet checkpoint (``features.N.*`` / ``classifier.N.*``); ``key_map``
maps every one of its 32 tensors to exactly one parameter here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

# The layer table, endpoints and key map live in the light spec module.
from jaxdream.models.vgg_spec import (  # noqa: F401  (part of this module's API)
    _CONFIG_D, DEFAULT_LAYERS, ENDPOINTS, FC_WIDTH, NUM_CLASSES, OFFICIAL_WEIGHTS, POOLED_SIZE,
    PREPROCESSING, _layers, endpoint_table, ignored_key, key_map,
)
from jaxdream.models.layers import IMAGENET_MEAN, IMAGENET_STD, Conv, Linear, run_stages
from jaxdream.models.pooling import adaptive_avg_pool, max_pool


#: ImageNet statistics torchvision's weights were trained with (RGB, 0..1 scale).


class VGG16(nnx.Module):
    """VGG16 returning a dict of endpoints; input NHWC pixels on the 0..255 scale.

    Parameters: ``convs[i]`` is the i-th convolution in forward order (``conv1_1`` is
    ``convs[0]``, ``conv5_3`` is ``convs[12]``); ``fc6``, ``fc7`` and ``fc8`` (which gives the
    ``logits`` endpoint) are the classifier's three linear layers.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        convs = []
        in_channels = 3
        for _, _, channels in _layers():
            if channels is not None:
                convs.append(Conv(in_channels, channels, 3, activation="relu", padding=1,
                                  rngs=rngs))
                in_channels = channels
        self.convs = nnx.List(convs)
        flat = in_channels * POOLED_SIZE[0] * POOLED_SIZE[1]
        self.fc6 = Linear(flat, FC_WIDTH, rngs=rngs)
        self.fc7 = Linear(FC_WIDTH, FC_WIDTH, rngs=rngs)
        self.fc8 = Linear(FC_WIDTH, NUM_CLASSES, rngs=rngs)

    def endpoint_names(self) -> list[str]:
        return list(ENDPOINTS)

    def __call__(self, pixels: jax.Array,
                 endpoints: Collection[str] | None = None) -> dict[str, jax.Array]:
        """Runs up to the deepest requested endpoint (all of them if ``endpoints`` is None)."""
        mean = jnp.asarray(IMAGENET_MEAN, pixels.dtype)
        std = jnp.asarray(IMAGENET_STD, pixels.dtype)
        x = (pixels / 255.0 - mean) / std
        return run_stages(self._stages(), x, self.endpoint_names(), endpoints)

    def _stages(self) -> Iterator[tuple[str, Callable[[jax.Array], jax.Array]]]:
        convs = iter(self.convs)
        for name, _, channels in _layers():
            if channels is None:
                yield name, lambda h: max_pool(h, 2, 2)
            else:
                yield name, next(convs)
        yield "fc6", lambda h: jax.nn.relu(self.fc6(_flatten_nchw(h)))
        yield "fc7", lambda h: jax.nn.relu(self.fc7(h))
        yield "logits", self.fc8


def _flatten_nchw(x: jax.Array) -> jax.Array:
    """Adaptive-pools NHWC ``x`` to 7x7 and flattens it in PyTorch's (C, H, W) order."""
    pooled = adaptive_avg_pool(x, POOLED_SIZE)
    return jnp.transpose(pooled, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def build(rngs: nnx.Rngs) -> nnx.Module:
    """A VGG16 with fresh random parameters (build it under ``nnx.eval_shape`` to load weights)."""
    return VGG16(rngs=rngs)
