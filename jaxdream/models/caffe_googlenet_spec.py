"""Caffe's GoogLeNet as BVLC's deploy.prototxt defines it: layer table, endpoints, key maps,
means and catalogue entries (no JAX; the network is :mod:`jaxdream.models.caffe_googlenet`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from jaxdream.models.keys import OIHW_TO_HWIO, OUT_IN_TO_IN_OUT, KeyMap
from jaxdream.models.registry import ModelSpec, network, register
from jaxdream.models.weights import WeightsSource

if TYPE_CHECKING:
    from flax import nnx

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



def _load_lazily(config: CaffeGoogLeNetConfig, model: str, path: str) -> nnx.Module:
    from jaxdream.models.caffe_googlenet import load

    return load(path, config, model)


def _register(name: str, description: str, classes: int, mean: tuple[float, float, float],
              weights: WeightsSource) -> ModelSpec:
    """A Caffe GoogLeNet (the original DeepDream's network family), from a .caffemodel or
    neural-dream's .pth."""
    config = CaffeGoogLeNetConfig(num_classes=classes, mean_bgr=mean)
    return register(ModelSpec(
        name=name, description=description,
        build=network("jaxdream.models.caffe_googlenet", "CaffeGoogLeNet", config),
        key_map=key_map(config, "caffe"), ignore_key=ignored_key,
        endpoints=endpoint_table(config), default_layers=DEFAULT_LAYERS,
        preprocessing=f"BGR 0..255 minus mean {mean} (Caffe); LRN; ceil-mode pools",
        resize_size=256, crop_size=224, weights=weights,
        load=functools.partial(_load_lazily, config, name), logits=CLASSIFIER,
        labels="imagenet" if classes == 1000 else None))


_register("bvlc_googlenet", "BVLC GoogLeNet (Caffe, 7 M parameters): the original DeepDream's "
          "network and look", 1000, IMAGENET_MEAN_BGR,
          WeightsSource(url="http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel",
                        sha1="405fc5acd08a3bb12de8ee5e23a96bec22f08204",
                        licence="unrestricted"))
_register("googlenet_places205", "GoogLeNet trained on MIT Places205 (Caffe): landscapes, "
          "buildings, arches", 205, PLACES205_MEAN_BGR,
          WeightsSource(url="https://github.com/ProGamerGov/pytorch-places/raw/master/"
                            "googlenet_places205.pth"))
_register("googlenet_places365", "GoogLeNet trained on MIT Places365 (Caffe): scenes", 365,
          PLACES365_MEAN_BGR,
          WeightsSource(url="http://places2.csail.mit.edu/models_places365/"
                            "googlenet_places365.caffemodel"))
