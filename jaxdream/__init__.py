"""jaxdream: batched, jit-compiled DeepDream in JAX/Flax."""

from __future__ import annotations

__version__ = "0.2.0"
