"""The model catalogue: what each model is, without importing JAX.

Each architecture has a light ``<family>_spec.py`` beside it that declares its models with
:func:`register`: name, endpoints, default layer, preprocessing, key map and where the weights
come from. Checking a config or listing models reads only this; the network itself (Flax, JAX)
is imported when a model is built (:func:`network`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxdream.errors import ConfigError
from jaxdream.models.keys import KeyMap
from jaxdream.models.weights import WeightsSource, locate

if TYPE_CHECKING:
    from flax import nnx

DEFAULT_MODEL = "efficientnet_lite0"


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
    #: Builds the network and fills it from a weights file, for models whose files need more
    #: than one key map (Caffe's .caffemodel and neural-dream's .pth); None: the generic path
    #: through ``build``, the PyTorch reader and ``key_map``.
    load: Callable[[str], nnx.Module] | None = None
    #: The endpoint holding class scores, and whose names they are ("imagenet"; None: numbered).
    logits: str = "logits"
    labels: str | None = "imagenet"

    def local_weights(self) -> Path | None:
        """The weights file on this machine (installed package or fetched), if any."""
        return locate(self.weights)


#: Every registered model by name, in registration order (the order ``jaxdream models`` lists).
MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds ``spec`` to :data:`MODELS`; a name registered twice is a programming error."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def _build_lazily(module: str, factory: str, args: tuple[Any, ...], rngs: nnx.Rngs
                  ) -> nnx.Module:
    return getattr(importlib.import_module(module), factory)(*args, rngs=rngs)


def network(module: str, factory: str, *args: Any) -> Callable[[nnx.Rngs], nnx.Module]:
    """A builder calling ``module.factory(*args, rngs=rngs)``, importing ``module`` (and so
    JAX and Flax) only when a model is built."""
    return functools.partial(_build_lazily, module, factory, args)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def register_torchvision(name: str, description: str, *, module: str, key_map: KeyMap,
                         ignore_key: Callable[[str], bool], endpoints: dict[str, tuple[int, int]],
                         default_layers: str, preprocessing: str,
                         official_weights: tuple[str, str]) -> ModelSpec:
    """Registers a torchvision architecture whose official checkpoint (URL, SHA-256 prefix)
    the user fetches or provides; ``module.build(rngs=...)`` builds its network."""
    url, prefix = official_weights
    return register(ModelSpec(
        name=name, description=description, build=network(module, "build"), key_map=key_map,
        ignore_key=ignore_key, endpoints=endpoints, default_layers=default_layers,
        preprocessing=preprocessing,
        # torchvision's evaluation view for these weights.
        resize_size=256, crop_size=224,
        weights=WeightsSource(url=url, sha256_prefix=prefix, licence="BSD-3-Clause"),
    ))
