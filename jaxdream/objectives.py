"""What to amplify: a weighted sum of layer activations' energies.

Layers are named by model endpoint. The weights are data (an array, vmapped per sample), so a
sweep over weights reuses one compiled program; the *set* of layers is static because it decides
how deep the forward pass runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxdream.errors import ConfigError

_LAYER_ITEM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?::\s*([-+0-9.eE]+)\s*)?$")


def parse_layers(text: str, known: Sequence[str] | None = None) -> dict[str, float]:
    """Parses ``"block10"`` or ``"block8:1,block10:2"`` into {endpoint: weight}.

    A layer without a weight gets 1. Unknown endpoints (when ``known`` is given), duplicates,
    non-numbers and an all-zero weighting are errors that name the offending item.
    """
    if not text or not text.strip():
        raise ConfigError("layers: empty; give an endpoint name such as 'block10'")
    layers: dict[str, float] = {}
    for item in text.split(","):
        match = _LAYER_ITEM.match(item)
        if not match:
            raise ConfigError(f"layers: cannot parse {item.strip()!r}; expected NAME or "
                              f"NAME:WEIGHT, e.g. 'block8:1,block10:2'")
        name, weight_text = match.group(1), match.group(2)
        try:
            weight = float(weight_text) if weight_text is not None else 1.0
        except ValueError:
            raise ConfigError(f"layers: weight {weight_text!r} of {name} is not a number") from None
        if not jnp.isfinite(weight):
            raise ConfigError(f"layers: weight of {name} must be finite, got {weight_text}")
        if name in layers:
            raise ConfigError(f"layers: {name} is listed twice")
        if known is not None and name not in known:
            raise ConfigError(f"layers: unknown endpoint {name!r}; this model has: "
                              f"{', '.join(known)}")
        layers[name] = weight
    if all(w == 0 for w in layers.values()):
        raise ConfigError("layers: every weight is zero, so there is nothing to amplify")
    return layers


def format_layers(layers: Mapping[str, float]) -> str:
    """The inverse of :func:`parse_layers` (``repr`` of floats round-trips exactly)."""
    return ",".join(f"{name}:{weight!r}" for name, weight in layers.items())


def weighted_l2(endpoints: Mapping[str, jax.Array], names: Sequence[str],
                weights: jax.Array) -> jax.Array:
    """sum_l w_l * 0.5 * mean(act_l^2).

    With one layer this is the original notebook's ``objective_L2`` up to a constant factor,
    which the gradient normalisation removes. Taking the mean rather than the sum makes the
    weights of several layers comparable whatever their sizes (as Keras's example does).
    """
    total = jnp.zeros((), jnp.float32)
    for index, name in enumerate(names):
        act = endpoints[name].astype(jnp.float32)
        total = total + weights[index] * 0.5 * jnp.mean(act * act)
    return total
