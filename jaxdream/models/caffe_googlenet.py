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
from jaxdream.models.convert import OIHW_TO_HWIO, OUT_IN_TO_IN_OUT, KeyMap, load_state_dict_into
from jaxdream.models.layers import Conv, cast_to_compute_dtype, max_pool

#: The original notebook's mean (google/deepdream ``dream.ipynb``: "ImageNet mean, training set
#: dependent"), BGR. Caffe's ``ilsvrc_2012_mean.npy`` averages to (104.0, 116.7, 122.7); the
#: notebook rounds down, and the classic preset follows the notebook value for value.
IMAGENET_MEAN_BGR = (104.0, 116.0, 122.0)
#: Per-channel means of the Places mean images, BGR, as neural-dream uses them
#: (``dream_auto.auto_mean``). Places365's agrees with ``places365CNN_mean.binaryproto`` of
#: CSAILVision/places365 averaged per channel.
PLACES205_MEAN_BGR = (105.417, 113.753, 116.047)
PLACES365_MEAN_BGR = (104.051, 112.514, 116.676)

#: Caffe's LRN of this prototxt: ACROSS_CHANNELS, local_size 5, alpha 1e-4, beta 0.75, k 1.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 1.0

DEFAULT_LAYERS = "inception_4c/output"
CLASSIFIER = "loss3/classifier"

#: Inception widths from the prototxt: 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj.
_INCEPTIONS: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
#: The stride-2 max pools (3x3, Caffe's ceil rounding) that open the 4th and 5th stages.
_STAGE_POOLS = {"4a": "pool3/3x3_s2", "5a": "pool4/3x3_s2"}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One prototxt layer with a name we expose: kind, input blob, and its geometry."""

    name: str
    kind: str  # conv | maxpool | lrn | concat | avgpool | fc
    bottom: str | tuple[str, ...]
    channels: int
    kernel: int = 1
    stride: int = 1
    pad: int = 0


def _prototxt() -> list[Layer]:
    """The deploy.prototxt's layers in order (ReLUs are folded in, dropout is the identity)."""
    net = [Layer("conv1/7x7_s2", "conv", "data", 64, 7, 2, 3),
           Layer("pool1/3x3_s2", "maxpool", "conv1/7x7_s2", 0, 3, 2),
           Layer("pool1/norm1", "lrn", "pool1/3x3_s2", 0),
           Layer("conv2/3x3_reduce", "conv", "pool1/norm1", 64),
           Layer("conv2/3x3", "conv", "conv2/3x3_reduce", 192, 3, 1, 1),
           Layer("conv2/norm2", "lrn", "conv2/3x3", 0),
           Layer("pool2/3x3_s2", "maxpool", "conv2/norm2", 0, 3, 2)]
    bottom = "pool2/3x3_s2"
    for block, (c1, c3r, c3, c5r, c5, proj) in _INCEPTIONS.items():
        if block in _STAGE_POOLS:
            pool = _STAGE_POOLS[block]
            net.append(Layer(pool, "maxpool", bottom, 0, 3, 2))
            bottom = pool
        p = f"inception_{block}/"
        net += [Layer(p + "1x1", "conv", bottom, c1),
                Layer(p + "3x3_reduce", "conv", bottom, c3r),
                Layer(p + "3x3", "conv", p + "3x3_reduce", c3, 3, 1, 1),
                Layer(p + "5x5_reduce", "conv", bottom, c5r),
                Layer(p + "5x5", "conv", p + "5x5_reduce", c5, 5, 1, 2),
                Layer(p + "pool", "maxpool", bottom, 0, 3, 1, 1),
                Layer(p + "pool_proj", "conv", p + "pool", proj),
                Layer(p + "output", "concat", (p + "1x1", p + "3x3", p + "5x5", p + "pool_proj"),
                      c1 + c3 + c5 + proj)]
        bottom = p + "output"
    net.append(Layer("pool5/7x7_s1", "avgpool", bottom, 0, 7, 1))
    net.append(Layer(CLASSIFIER, "fc", "pool5/7x7_s1", 0))
    # Pools and LRNs keep their input's width (written 0 above).
    widths: dict[str, int] = {"data": 3}
    filled = []
    for layer in net:
        if layer.kind in ("maxpool", "lrn", "avgpool"):
            layer = dataclasses.replace(layer, channels=widths[layer.bottom])  # type: ignore
        widths[layer.name] = layer.channels
        filled.append(layer)
    return filled


LAYERS: tuple[Layer, ...] = tuple(_prototxt())
ENDPOINTS: tuple[str, ...] = tuple(layer.name for layer in LAYERS)
_BY_NAME = {layer.name: layer for layer in LAYERS}


@dataclasses.dataclass(frozen=True)
class CaffeGoogLeNetConfig:
    num_classes: int = 1000
    mean_bgr: tuple[float, float, float] = IMAGENET_MEAN_BGR
    #: False for weights without ``loss3/classifier`` (neural-dream's .pth files).
    classifier: bool = True


def _attribute(name: str) -> str:
    """Module attribute of a prototxt layer: ``inception_4c/1x1`` -> ``inception_4c_1x1``
    (also neural-dream's key prefix)."""
    return name.replace("/", "_")


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
            self.loss3_classifier = nnx.Linear(_BY_NAME["pool5/7x7_s1"].channels,
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


def endpoint_table(config: CaffeGoogLeNetConfig = CaffeGoogLeNetConfig()
                   ) -> dict[str, tuple[int, int]]:
    """Endpoint -> (channels, nominal stride; 0 for the classifier). ``pool5/7x7_s1`` is
    spatial but 6 smaller than the input / 32 on each side."""
    strides = {"data": 1}
    table: dict[str, tuple[int, int]] = {}
    for layer in LAYERS:
        bottom = layer.bottom if isinstance(layer.bottom, str) else layer.bottom[0]
        strides[layer.name] = strides[bottom] * layer.stride
        if layer.kind == "fc":
            table[layer.name] = (config.num_classes, 0)
        else:
            table[layer.name] = (layer.channels, strides[layer.name])
    return table


def key_map(config: CaffeGoogLeNetConfig, naming: str) -> KeyMap:
    """(target, key, transpose) for every parameter. ``naming`` is "caffe" (keys
    ``{layer}.weight``/``{layer}.bias`` from a .caffemodel) or "pth" (neural-dream's
    ``{layer with / as _}.weight``). Caffe's conv blobs are OIHW and its InnerProduct weight
    is (out, in), as PyTorch's."""
    entries = []
    names = [layer.name for layer in LAYERS if layer.kind == "conv"]
    if config.classifier:
        names.append(CLASSIFIER)
    for name in names:
        key = name if naming == "caffe" else _attribute(name)
        transpose = OUT_IN_TO_IN_OUT if name == CLASSIFIER else OIHW_TO_HWIO
        entries.append(((_attribute(name), "kernel"), f"{key}.weight", transpose))
        entries.append(((_attribute(name), "bias"), f"{key}.bias", None))
    return entries


def ignored_key(key: str) -> bool:
    """The training-only auxiliary classifiers (loss1/*, loss2/*) both files carry."""
    return key.startswith(("loss1/", "loss2/", "loss1_", "loss2_"))


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
    module = nnx.eval_shape(lambda: CaffeGoogLeNet(config, rngs=nnx.Rngs(0)))
    load_state_dict_into(module, state, key_map(config, naming), ignore=ignored_key,
                         source=source)
    return module


def loader(config: CaffeGoogLeNetConfig, model: str) -> Callable[[str], nnx.Module]:
    return lambda path: load(path, config, model)
