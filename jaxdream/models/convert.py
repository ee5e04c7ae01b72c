"""Strict state-dict conversion: never guess, report every problem at once.

Each model file gives a key map: (target parameter path, checkpoint key, transpose). Loading
checks that every checkpoint key is used exactly once (or explicitly ignored), every model
parameter is filled exactly once, and every shape matches after the layout change; all problems
are collected and raised together so a user with the wrong checkpoint sees the whole picture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.errors import ConversionError
from jaxdream.models.keys import KeyMap

_Path = tuple[str | int, ...]

_MAX_LISTED = 20


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): " + ", ".join(shown) + more


def load_state_dict_into(model: nnx.Module, state_dict: Mapping[str, np.ndarray],
                         key_map: KeyMap, *, ignore: Callable[[str], bool] = lambda k: False,
                         source: str = "checkpoint") -> None:
    """Fills ``model``'s parameters and batch statistics from ``state_dict`` in place.

    ``model`` may be abstract (built under ``nnx.eval_shape``): every leaf is replaced, and a
    leaf that would stay abstract is reported as unfilled.
    """
    leaves, filled = _match(model, state_dict, key_map, ignore, source)
    for path, array in filled.items():
        leaves[path].set_value(jnp.asarray(array, dtype=leaves[path].get_value().dtype))


def check_shapes_fit(model: nnx.Module,
                     shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], key_map: KeyMap, *,
                     ignore: Callable[[str], bool] = lambda k: False,
                     source: str = "checkpoint") -> None:
    """Raises the ConversionError :func:`load_state_dict_into` would, from names, shapes and
    dtypes alone, so a checkpoint's data need not be read (or inflated) to be refused."""
    # Zero-stride views: the right shape and dtype, one element of memory each.
    placeholders = {name: np.broadcast_to(np.zeros((), dtype), shape)
                    for name, (shape, dtype) in shapes.items()}
    _match(model, placeholders, key_map, ignore, source)


def _match(model: nnx.Module, state_dict: Mapping[str, np.ndarray], key_map: KeyMap,
           ignore: Callable[[str], bool], source: str
           ) -> tuple[dict[_Path, nnx.Variable], dict[_Path, np.ndarray]]:
    """The model's leaves and the (transposed) array for each, or every problem at once."""
    state = nnx.state(model)
    leaves = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    filled: dict[tuple[str | int, ...], np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    mis_shaped: list[str] = []
    problems: list[str] = []

    for target, key, transpose in key_map:
        if target in filled:
            problems.append(f"key map fills {'.'.join(map(str, target))} twice")
            continue
        if target not in leaves:
            problems.append(f"key map names {'.'.join(map(str, target))}, "
                            f"which this model does not have")
            continue
        if key in used:
            problems.append(f"key map uses checkpoint key {key} twice")
            continue
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        array = np.asarray(state_dict[key])
        source_shape = tuple(array.shape)
        if transpose is not None:
            if array.ndim != len(transpose):
                mis_shaped.append(f"{key} {tuple(array.shape)} (expected {len(transpose)} dims)")
                continue
            array = np.transpose(array, transpose)
        expected = tuple(leaves[target].get_value().shape)
        if tuple(array.shape) != expected:
            wanted = tuple(expected[i] for i in np.argsort(transpose)) if transpose else expected
            mis_shaped.append(f"{key} is {source_shape}, expected {wanted} "
                              f"(for {'.'.join(map(str, target))})")
            continue
        if not np.issubdtype(array.dtype, np.floating):
            mis_shaped.append(f"{key} has dtype {array.dtype}, expected floating point")
            continue
        filled[target] = array

    unexpected = [k for k in state_dict if k not in used and not ignore(k)]
    mapped = {target for target, _, _ in key_map}
    unfilled = [".".join(map(str, path)) for path in leaves if path not in mapped]
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if mis_shaped:
        problems.append(_listing("mis-shaped keys", mis_shaped))
    if unfilled:
        problems.append(_listing("model parameters with no checkpoint key", unfilled))
    if problems:
        raise ConversionError(f"{source} does not fit {type(model).__name__}:\n  "
                              + "\n  ".join(problems))
    return leaves, filled
