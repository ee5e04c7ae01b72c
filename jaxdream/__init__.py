"""jaxdream: batched, jit-compiled DeepDream in JAX/Flax.

From Python (see the README's "From Python")::

    import jaxdream
    dreamed = jaxdream.dream("examples/chelsea.jpg", layers="block10", seed=1)
    dreamed.save("chelsea_dream.png")          # the PNG carries the recipe

Names are loaded on first use, so ``import jaxdream.config`` (validating a job file) does not
pull in JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "dream": "jaxdream.api", "dream_many": "jaxdream.api", "Dreamer": "jaxdream.api",
    "DreamImage": "jaxdream.api", "GridResult": "jaxdream.api",
    "layer": "jaxdream.objectives", "channel": "jaxdream.objectives",
    "neuron": "jaxdream.objectives", "guide": "jaxdream.objectives",
    "JaxdreamError": "jaxdream.errors", "ConfigError": "jaxdream.errors",
    "ImageError": "jaxdream.errors", "CheckpointError": "jaxdream.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from jaxdream.api import Dreamer, DreamImage, GridResult, dream, dream_many
    from jaxdream.errors import CheckpointError, ConfigError, ImageError, JaxdreamError
    from jaxdream.objectives import channel, guide, layer, neuron


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxdream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
