"""Caffe's GoogLeNet, the network of the original DeepDream: BVLC's ImageNet model and MIT's
Places205 and Places365 scene models, built as their ``deploy.prototxt`` defines them.

This is not torchvision's GoogLeNet (:mod:`jaxdream.models.googlenet`): no batch norm, real
5x5 convolutions in the inception blocks, local response normalisation after ``pool1/3x3_s2``
and ``conv2/3x3``, and Caffe's input: BGR pixels on the 0..255 scale minus a per-channel mean.

Endpoints carry the prototxt's blob names (``conv2/3x3``, ``inception_3b/5x5_reduce``,
``inception_4c/output``, ``loss3/classifier``), so the notebook's layer names work as written.
A convolution's endpoint is its output *before* the ReLU that follows it: Caffe's ReLUs run in
place, and the notebook's ``net.forward(end=name)`` stops at the named layer, so that is what
its objective saw. Inception outputs concatenate rectified branches, as in Caffe.

Beyond 224 x 224, Caffe's ``pool5/7x7_s1`` (average, 7x7, stride 1) leaves a map larger than
1x1 that its ``loss3/classifier`` refuses; here the classifier is applied to the mean of that map
(equal to averaging the class scores of every 7x7 window), and a map smaller than 7 is pooled
whole. At 224 x 224 both are exactly Caffe's.

Weights load from Caffe's ``.caffemodel`` (:mod:`jaxdream.models.caffemodel`) or from the
PyTorch files neural-dream publishes (``bvlc_googlenet.pth``, ``googlenet_places205.pth``,
``googlenet_places365.pth``: the same tensors under ``conv1_7x7_s2.weight``-style names, without
``loss3/classifier``, so those load without a classifier).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.errors import ConfigError, ConversionError
from jaxdream.models.caffe_googlenet_spec import (  # noqa: F401  (part of this module's API)
    CLASSIFIER, DEFAULT_LAYERS, ENDPOINTS, IMAGENET_MEAN_BGR, LAYERS, LRN_ALPHA, LRN_BETA,
    LRN_K, LRN_SIZE, PLACES205_MEAN_BGR, PLACES365_MEAN_BGR, CaffeGoogLeNetConfig, Layer,
    _attribute, _BY_NAME, endpoint_table, ignored_key, key_map)
from jaxdream.models.convert import load_state_dict_into
from jaxdream.models.layers import Conv, Linear, build_abstract, cast_to_compute_dtype
from jaxdream.models.pooling import max_pool


def caffe_lrn(x: jax.Array, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
              beta: float = LRN_BETA, k: float = LRN_K) -> jax.Array:
    """Caffe's ACROSS_CHANNELS LRN on NHWC: ``x / (k + alpha / size * sum x^2) ** beta``, the
    sum over the ``size`` channels centred on each channel (zeros beyond the ends). Caffe
    divides alpha by the window size; AlexNet's paper formula does not."""
    channels = x.shape[-1]
    before = (size - 1) // 2
    squares = jnp.pad(x * x, ((0, 0),) * (x.ndim - 1) + ((before, size - 1 - before),))
    window = sum(squares[..., i:i + channels] for i in range(size))
    return x * jnp.power(k + (alpha / size) * window, -beta)


def caffe_avg_pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """``pool5/7x7_s1``: average pool without padding; a side shorter than the window is
    pooled whole (Caffe would refuse such an input)."""
    kh, kw = min(kernel, x.shape[1]), min(kernel, x.shape[2])
    total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, kh, kw, 1),
                                  (1, stride, stride, 1), "VALID")
    return total / (kh * kw)


class CaffeGoogLeNet(nnx.Module):
    """Returns a dict of endpoints; input NHWC RGB pixels on the 0..255 scale."""

    def __init__(self, config: CaffeGoogLeNetConfig = CaffeGoogLeNetConfig(), *,
                 rngs: nnx.Rngs):
        self.config = config
        for layer in LAYERS:
            if layer.kind == "conv":
                cin = _BY_NAME[layer.bottom].channels if layer.bottom != "data" else 3
                setattr(self, _attribute(layer.name),
                        Conv(cin, layer.channels, layer.kernel, layer.stride, activation=None,
                             padding=layer.pad, rngs=rngs))
        if config.classifier:
            self.loss3_classifier = Linear(_BY_NAME["pool5/7x7_s1"].channels,
                                           config.num_classes, rngs=rngs)

    def endpoint_names(self) -> list[str]:
        return list(ENDPOINTS)

    def _layer(self, layer: Layer, blobs: dict[str, jax.Array]) -> jax.Array:
        if layer.kind == "concat":
            return jnp.concatenate([blobs[b] for b in layer.bottom], axis=-1)
        x = blobs[layer.bottom]  # type: ignore[index]
        if layer.kind == "conv":
            return getattr(self, _attribute(layer.name))(x)
        if layer.kind == "maxpool":
            return max_pool(x, layer.kernel, layer.stride, padding=layer.pad, ceil_mode=True)
        if layer.kind == "lrn":
            return caffe_lrn(x)
        if layer.kind == "avgpool":
            return caffe_avg_pool(x, layer.kernel, layer.stride)
        if not self.config.classifier:
            raise ConfigError(f"{CLASSIFIER}: these weights carry no classifier "
                              "(neural-dream's .pth files leave it out); load the .caffemodel "
                              "to use it")
        return self.loss3_classifier(jnp.mean(x, axis=(1, 2)))

    def __call__(self, pixels: jax.Array,
                 endpoints: Collection[str] | None = None) -> dict[str, jax.Array]:
        """Runs the prototxt's layers up to the deepest requested endpoint (all that these
        weights have if None)."""
        if endpoints is None:
            endpoints = [n for n in ENDPOINTS if n != CLASSIFIER or self.config.classifier]
        wanted = set(endpoints)
        unknown = wanted - set(ENDPOINTS)
        if unknown:
            raise KeyError(f"unknown endpoint(s) {sorted(unknown)}; this model has "
                           f"{list(ENDPOINTS)}")
        deepest = max(ENDPOINTS.index(name) for name in wanted)
        mean = jnp.asarray(self.config.mean_bgr, pixels.dtype)
        # Caffe's input: BGR, mean subtracted, no scaling.
        blobs = {"data": cast_to_compute_dtype(pixels[..., ::-1] - mean)}
        out: dict[str, jax.Array] = {}
        for layer in LAYERS[:deepest + 1]:
            value = self._layer(layer, blobs)
            out[layer.name] = value
            # Caffe's ReLUs run in place after every convolution: later layers see the
            # rectified blob, the endpoint keeps what forward(end=name) leaves (see above).
            blobs[layer.name] = jax.nn.relu(value) if layer.kind == "conv" else value
        return {name: out[name] for name in ENDPOINTS if name in wanted}


def _check_class_count(state: dict[str, np.ndarray], config: CaffeGoogLeNetConfig,
                       source: str, model: str) -> None:
    """The auxiliary classifiers are ignored, but their width still tells ImageNet (1000)
    from Places (205, 365) weights: the convolutions alone look alike."""
    for key in ("loss1/classifier.weight", "loss1_classifier_1.weight", f"{CLASSIFIER}.weight"):
        if key in state and np.ndim(state[key]) >= 2:
            # (classes, 1024); a V1 file pads it to (1, 1, classes, 1024).
            classes = int(np.shape(state[key])[-2])
            if classes != config.num_classes:
                raise ConversionError(f"{source} holds a {classes}-class network ({key}), but "
                                      f"{model} has {config.num_classes} classes: these are "
                                      f"another model's weights")


def load(path: str | Path, config: CaffeGoogLeNetConfig, model: str = "model") -> nnx.Module:
    """Builds the network for ``config`` and fills it from a .caffemodel or a neural-dream
    .pth (decided by the file's content, not its name), strictly (see convert.py)."""
    from jaxdream.models.caffemodel import is_torch_file, read_caffemodel, state_dict
    from jaxdream.models.checkpoint import load_state_dict

    source = f"weights file {path}"
    if is_torch_file(path):
        state, naming = load_state_dict(path), "pth"
        # neural-dream's files leave loss3/classifier out; a file that has it must fit it.
        config = dataclasses.replace(config, classifier=f"{_attribute(CLASSIFIER)}.weight"
                                     in state)
    else:
        ranks = {key: len(t) if t else 1 for _, key, t in key_map(config, "caffe")}
        state, naming = state_dict(read_caffemodel(path), ranks), "caffe"
    _check_class_count(state, config, source, model)
    module = build_abstract(lambda rngs: CaffeGoogLeNet(config, rngs=rngs))
    load_state_dict_into(module, state, key_map(config, naming), ignore=ignored_key,
                         source=source)
    return module


def loader(config: CaffeGoogLeNetConfig, model: str) -> Callable[[str], nnx.Module]:
    return lambda path: load(path, config, model)
