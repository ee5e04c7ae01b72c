"""Key maps: how a checkpoint's tensors name the parameters of a network here (no JAX).

A key map is a list of (target parameter path, checkpoint key, transpose) entries; every
architecture writes one with these helpers, and :mod:`jaxdream.models.convert` applies it
strictly. Layout changes are named constants, so a transpose reads as what it converts.
"""

from __future__ import annotations

from collections.abc import Sequence

KeyMapEntry = tuple[tuple[str | int, ...], str, tuple[int, ...] | None]
KeyMap = Sequence[KeyMapEntry]

#: PyTorch conv weight OIHW -> JAX HWIO (also right for depthwise (C,1,k,k) -> (k,k,1,C)).
OIHW_TO_HWIO = (2, 3, 1, 0)
#: PyTorch Linear weight (out, in) -> (in, out).
OUT_IN_TO_IN_OUT = (1, 0)


def conv_bn_entries(target: tuple[str | int, ...], conv: str, bn: str) -> list[KeyMapEntry]:
    """Key-map entries of a :class:`~jaxdream.models.layers.ConvBN` from a PyTorch conv
    (``{conv}.weight``) and BatchNorm (``{bn}.weight/bias/running_mean/running_var``)."""
    return [((*target, "kernel"), f"{conv}.weight", OIHW_TO_HWIO),
            ((*target, "scale"), f"{bn}.weight", None),
            ((*target, "bias"), f"{bn}.bias", None),
            ((*target, "mean"), f"{bn}.running_mean", None),
            ((*target, "var"), f"{bn}.running_var", None)]


def linear_entries(target: str, key: str) -> list[KeyMapEntry]:
    """Key-map entries of a linear layer from a PyTorch ``nn.Linear`` named ``key``."""
    return [((target, "kernel"), f"{key}.weight", OUT_IN_TO_IN_OUT),
            ((target, "bias"), f"{key}.bias", None)]


def training_only(key: str, prefixes: tuple[str, ...] = ()) -> bool:
    """Checkpoint entries with no inference parameter: BatchNorm's update counter, and any
    key under ``prefixes`` (e.g. GoogLeNet's auxiliary classifiers, trained and thrown away)."""
    return key.endswith(".num_batches_tracked") or key.startswith(prefixes)
