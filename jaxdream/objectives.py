"""What to amplify: weighted layers, channels, neurons, a guide image's features.

Layers are named by model endpoint. The weights, channel masks and guide features are data
(arrays, vmapped per sample), so a sweep over them reuses one compiled program; the *set* of
terms is static because it decides how deep the forward pass runs and what it computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdream.errors import ConfigError, first_few
from jaxdream.recipe import OBJECTIVES


def weighted_l2(endpoints: Mapping[str, jax.Array], names: Sequence[str],
                weights: jax.Array) -> jax.Array:
    """sum_l w_l * 0.5 * mean(act_l^2) over whole feature maps (no padding mask).

    With one layer this is the original notebook's ``objective_L2`` up to a constant factor,
    which the gradient normalisation removes. Taking the mean rather than the sum makes the
    weights of several layers comparable whatever their sizes (as Keras's example does).
    """
    total = jnp.zeros((), jnp.float32)
    for index, name in enumerate(names):
        act = endpoints[name].astype(jnp.float32)
        total = total + weights[index] * 0.5 * jnp.mean(act * act)
    return total


# --------------------------------------------------------------------------------------------
# Composable objectives. The *structure* (which kind of term on which layer) is static: it
# decides how deep the forward pass runs and what is computed. Each term's weight, channel mask
# and guide features are per-sample arrays, so sweeping them reuses one compiled program.

@dataclasses.dataclass(frozen=True)
class Term:
    """One thing to amplify at one layer; combine terms with ``+`` and scale them with ``*``.

    ``l2``: the layer's energy 0.5*mean(act^2) (classic DeepDream). ``channel``: the mean
    activation of ``channels``. ``neuron``: those channels at the centre of the feature map.
    ``guide``: the features of a guide image, matched position by position to the most
    similar guide feature (the original notebook's ``objective_guide``).
    """

    kind: str
    layer: str
    weight: float = 1.0
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"objective: unknown kind {self.kind!r}; choose one of "
                              f"{', '.join(OBJECTIVES)}")

    def __mul__(self, factor: float) -> Term:
        return dataclasses.replace(self, weight=self.weight * float(factor))

    __rmul__ = __mul__

    def __add__(self, other: Term | Objective) -> Objective:
        return Objective((self,)) + other


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of terms, e.g. ``layer("block8") + 2 * channel("block10", 3)``."""

    terms: tuple[Term, ...]

    def __add__(self, other: Term | Objective) -> Objective:
        extra = other.terms if isinstance(other, Objective) else (other,)
        return Objective(self.terms + extra)

    def __mul__(self, factor: float) -> Objective:
        return Objective(tuple(term * factor for term in self.terms))

    __rmul__ = __mul__

    @property
    def structure(self) -> tuple[tuple[str, str], ...]:
        """The static part: (kind, layer) per term."""
        return tuple((term.kind, term.layer) for term in self.terms)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(term.layer for term in self.terms))


def layer(name: str, weight: float = 1.0) -> Term:
    return Term("l2", name, weight)


def channel(name: str, *channels: int, weight: float = 1.0) -> Term:
    return Term("channel", name, weight, tuple(channels))


def neuron(name: str, *channels: int, weight: float = 1.0) -> Term:
    return Term("neuron", name, weight, tuple(channels))


def guide(name: str, weight: float = 1.0) -> Term:
    return Term("guide", name, weight)


class TermParams(NamedTuple):
    """The per-sample arrays of one term (each gets a leading batch axis under vmap)."""

    weight: jax.Array  # float32 []
    mask: jax.Array  # float32 [C] channel selection (channel/neuron), else [0]
    guide: jax.Array  # float32 [N, C] guide features (guide), else [0, 0]


def term_params(term: Term, channels: int, guide_features: np.ndarray | None = None
                ) -> TermParams:
    """Arrays for one term at a layer of ``channels`` channels; checks channel indices."""
    mask = np.zeros((0,), np.float32)
    if term.kind in ("channel", "neuron"):
        bad = [c for c in term.channels if c >= channels]
        if bad:
            raise ConfigError(f"channels: {len(bad)} out of range for layer {term.layer}, "
                              f"which has {channels} channels (0..{channels - 1}): "
                              f"{first_few(list(bad))}")
        mask = np.zeros((channels,), np.float32)
        mask[list(term.channels)] = 1.0
    features = np.zeros((0, 0), np.float32)
    if term.kind == "guide":
        if guide_features is None:
            raise ConfigError(f"objective guide at {term.layer}: no guide image given")
        features = np.asarray(guide_features, np.float32)
    return TermParams(np.float32(term.weight), mask, features)


def _cell_centres(size: int, cells: int) -> np.ndarray:
    """Which pixel row sits at the centre of each of ``cells`` feature-map rows."""
    return np.minimum(((np.arange(cells) + 0.5) * size / cells).astype(np.int32), size - 1)


def feature_mask(pixel_mask: jax.Array, height: int, width: int) -> jax.Array:
    """The pixel validity mask (H x W) sampled at the centres of an ``height`` x ``width``
    feature map: a feature counts when the pixel it is centred on is real, not padding."""
    rows = _cell_centres(pixel_mask.shape[0], height)
    cols = _cell_centres(pixel_mask.shape[1], width)
    return pixel_mask[rows][:, cols]


def evaluate(structure: Sequence[tuple[str, str]], endpoints: Mapping[str, jax.Array],
             params: Sequence[TermParams], pixel_mask: jax.Array,
             centre: jax.Array | None = None, tiles: bool = False) -> jax.Array:
    """The objective of a batch of images (summed over the batch), counting only features
    centred on real pixels. ``endpoints`` are N x h x w x C; ``pixel_mask`` is N x H x W;
    ``centre`` (N x 2, pixels) is where the neuron objective looks: the real part's centre.

    Means are over the real features. For ``tiles`` (the batch holds tiles of one image) each
    tile's sum is divided by its full feature-map size instead, the same for every tile, so
    every real feature of the image weighs the same whichever tile and group it falls in.
    """
    total = jnp.zeros((), jnp.float32)
    for (kind, name), p in zip(structure, params, strict=True):
        act = endpoints[name].astype(jnp.float32)
        batch, height, width, chans = act.shape
        mask = jax.vmap(lambda m: feature_mask(m, height, width))(pixel_mask)[..., None]
        mask = mask.astype(jnp.float32)
        count = float(height * width) if tiles else jnp.maximum(jnp.sum(mask), 1.0)
        if kind == "l2":
            value = 0.5 * jnp.sum(mask * act * act) / (count * chans)
        elif kind == "channel":
            value = jnp.sum(mask * act * p.mask) / (count * jnp.maximum(jnp.sum(p.mask), 1.0))
        elif kind == "neuron":
            if centre is None:
                raise ValueError("the neuron objective needs the image centre")
            rows = centre[:, 0] * height // pixel_mask.shape[1]
            cols = centre[:, 1] * width // pixel_mask.shape[2]
            picked = act[jnp.arange(batch), rows, cols]  # N x C
            value = jnp.sum(picked * p.mask) / jnp.maximum(jnp.sum(p.mask), 1.0)
        else:  # guide: each feature is pulled towards the guide feature most like it
            flat = act.reshape(-1, chans)
            target = p.guide[jnp.argmax(flat @ p.guide.T, axis=1)]
            value = jnp.sum(mask.reshape(-1, 1) * flat * jax.lax.stop_gradient(target)) / count
        total = total + p.weight * value
    return total
