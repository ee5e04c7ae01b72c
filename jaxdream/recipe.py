"""A dream's full recipe: its settings, their defaults and kinds, presets, validation, and the
JSON stored in every output PNG.

A recipe holds every value that decides the pixels (model, weights identity, layers, octaves,
steps, step size, jitter, seed, max side), so ``jaxdream dream INPUT --recipe OUT.png``
reproduces an output exactly. Values are checked here, once, with errors that name the key.

This is the settings vocabulary of the whole package and imports nothing heavy (no JAX): the
CLI generates its options from the :class:`Recipe` fields, configs are checked against them in
milliseconds, and the engine turns a recipe into compiled-program settings and per-image arrays.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdream import __version__
from jaxdream.errors import ConfigError

MAX_SEED = 2**32 - 1

#: The kinds of each choice, with the help text the CLI shows; every other module reads these.
OBJECTIVES = {
    "l2": "the layers' energy (classic)",
    "channel": "the mean activation of --channels",
    "neuron": "--channels at the feature map's centre",
    "guide": "the features of --guide, matched as in the original notebook",
}
NORMALISERS = {
    "mean": "divide by the mean |gradient| (classic)",
    "laplacian": "normalise each of 4 Laplacian-pyramid bands (TF 2016 lapnorm)",
    "gaussian": "smooth by Gaussians of growing width (pytorch-deepdream)",
}
UPDATES = {
    "ascent": "normalised gradient ascent (classic)",
    "adam": "Adam, lucid-style",
}

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
        if not math.isfinite(weight):
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides a dream's pixels, apart from the input image itself."""

    model: str = "efficientnet_lite0"
    #: (endpoint, weight) pairs; ``None`` means the model's default layer.
    layers: tuple[tuple[str, float], ...] | None = None
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10
    step_size: float = 1.5
    jitter: int = 32
    seed: int = 0
    #: Longer side of the image the dream runs at; ``None`` keeps the input's size.
    max_side: int | None = 1024
    preset: str = "classic"
    #: What to amplify at each layer: "l2" (the energy, classic), "channel" (mean activation of
    #: ``channels``), "neuron" (``channels`` at the feature map's centre), "guide" (features
    #: of the ``guide`` image, matched as in the original notebook).
    objective: str = "l2"
    channels: tuple[int, ...] = ()
    guide: str | None = None
    #: How the raw gradient is shaped before the step: "mean" (classic: divided by its mean
    #: |g|), "laplacian" (each of 4 Laplacian-pyramid bands normalised), "gaussian" (smoothed
    #: by Gaussians of growing width). The step size always sets the mean |change| per step.
    normaliser: str = "mean"
    #: "ascent" (classic normalised gradient ascent) or "adam" (lucid-style).
    update: str = "ascent"
    #: Octaves whose longer side exceeds ``tile_above`` pixels compute their gradient in
    #: ``tile_size`` tiles (with a fresh random roll each step); 0 never tiles.
    tile_size: int = 512
    tile_above: int = 1280

    def validate(self, source: str = "recipe") -> Recipe:
        """Returns self if every value is possible, else raises ConfigError naming the key."""

        def bad(key: str, reason: str) -> ConfigError:
            return ConfigError(f"{source}: {key}: {reason}")

        checks: list[tuple[str, Any, type | tuple[type, ...]]] = [
            ("octaves", self.octaves, int), ("steps", self.steps, int),
            ("jitter", self.jitter, int), ("seed", self.seed, int),
            ("octave_scale", self.octave_scale, (int, float)),
            ("step_size", self.step_size, (int, float)),
        ]
        for key, value, kind in checks:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise bad(key, f"expected a number, got {value!r}")
        if self.octaves < 1 or self.octaves > 12:
            raise bad("octaves", f"must be between 1 and 12, got {self.octaves}")
        if not (math.isfinite(self.octave_scale) and 1.0 < self.octave_scale <= 4.0):
            raise bad("octave_scale", f"must be above 1 and at most 4, got {self.octave_scale}")
        if self.steps < 1 or self.steps > 10_000:
            raise bad("steps", f"must be between 1 and 10000, got {self.steps}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise bad("step_size", f"must be a positive number, got {self.step_size}")
        if self.jitter < 0 or self.jitter > 4096:
            raise bad("jitter", f"must be between 0 and 4096 pixels, got {self.jitter}")
        if self.seed < 0 or self.seed > MAX_SEED:
            raise bad("seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.max_side is not None and (isinstance(self.max_side, bool)
                                          or not isinstance(self.max_side, int)
                                          or self.max_side < 16):
            raise bad("max_side", f"must be an integer of at least 16 (or 0 for the "
                                  f"input's own size), got {self.max_side!r}")
        if self.layers is not None and not self.layers:
            raise bad("layers", "is empty")
        for key, value, choices in (("objective", self.objective, OBJECTIVES),
                                    ("normaliser", self.normaliser, NORMALISERS),
                                    ("update", self.update, UPDATES)):
            if value not in choices:
                raise bad(key, f"unknown value {value!r}; choose one of {', '.join(choices)}")
        if not isinstance(self.channels, tuple) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.channels):
            raise bad("channels", f"expected a list of channel indices (integers >= 0), got "
                                  f"{self.channels!r}")
        if self.objective in ("channel", "neuron") and not self.channels:
            raise bad("channels", f"objective {self.objective!r} needs at least one channel")
        if self.objective not in ("channel", "neuron") and self.channels:
            raise bad("channels", f"only the channel and neuron objectives use channels, "
                                  f"not {self.objective!r}")
        if self.objective == "guide" and not (isinstance(self.guide, str) and self.guide):
            raise bad("guide", "objective 'guide' needs a guide image path")
        if self.objective != "guide" and self.guide is not None:
            raise bad("guide", "a guide image is only used by objective 'guide'")
        for key, value in (("tile_size", self.tile_size), ("tile_above", self.tile_above)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(key, f"expected an integer >= 0, got {value!r}")
        if self.tile_above and self.tile_size < 64:
            raise bad("tile_size", f"must be at least 64 pixels when tiling, got "
                                   f"{self.tile_size}")
        return self

    def with_layers(self, text: str, known: list[str]) -> Recipe:
        try:
            layers = parse_layers(text, known)
        except ConfigError as error:
            raise ConfigError(f"{error} (model {self.model})") from None
        return dataclasses.replace(self, layers=tuple(layers.items()))

    def to_json(self, *, weights_sha256: str, extra: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """The JSON object embedded in output PNGs."""
        assert self.layers is not None
        data: dict[str, Any] = {
            "jaxdream": __version__,
            "model": self.model,
            "weights_sha256": weights_sha256,
            "layers": {name: float(weight) for name, weight in self.layers},
            "octaves": self.octaves,
            "octave_scale": float(self.octave_scale),
            "steps": self.steps,
            "step_size": float(self.step_size),
            "jitter": self.jitter,
            "seed": self.seed,
            "max_side": self.max_side,
            "preset": self.preset,
            "objective": self.objective,
            "channels": list(self.channels),
            "guide": self.guide,
            "normaliser": self.normaliser,
            "update": self.update,
            "tile_size": self.tile_size,
            "tile_above": self.tile_above,
        }
        if extra:
            data.update(extra)
        return data

    @property
    def layers_text(self) -> str:
        return format_layers(dict(self.layers or ()))


#: Well-known looks. ``classic`` is google/deepdream's dream.ipynb, value for value;
#: ``lapnorm`` swaps in the TensorFlow 2016 notebook's Laplacian-pyramid normalisation (richer
#: colour, larger forms); ``smooth`` smooths the gradient with growing Gaussians as
#: pytorch-deepdream does; ``intense`` is lapnorm pushed twice as far (20 steps of 2.0 per
#: octave): animal faces everywhere. Chosen by looking at the sample cat (docs/presets.jpg).
PRESETS: dict[str, Recipe] = {
    "classic": Recipe(preset="classic"),
    "lapnorm": Recipe(preset="lapnorm", normaliser="laplacian"),
    "smooth": Recipe(preset="smooth", normaliser="gaussian"),
    "intense": Recipe(preset="intense", normaliser="laplacian", steps=20, step_size=2.0),
}

#: Keys of a recipe JSON that describe where it came from rather than the dream itself.
_META_KEYS = {"jaxdream", "weights_sha256", "weights", "input", "id", "grid"}
_FIELDS = {field.name for field in dataclasses.fields(Recipe)}


def recipe_from_json(data: Mapping[str, Any], source: str) -> tuple[Recipe, str | None]:
    """Parses a recipe JSON (as stored in a PNG); returns it and its weights SHA-256."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: recipe is not a JSON object")
    unknown = sorted(set(data) - _FIELDS - _META_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown recipe key(s) {unknown}")
    preset_name = data.get("preset", "classic")
    if preset_name not in PRESETS:
        raise ConfigError(f"{source}: preset: unknown preset {preset_name!r}")
    values = {key: data[key] for key in _FIELDS if key in data}
    layers = values.pop("layers", None)
    if layers is not None:
        if (not isinstance(layers, Mapping) or not layers
                or not all(isinstance(k, str) for k in layers)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in layers.values())):
            raise ConfigError(f"{source}: layers: expected an object of endpoint -> weight")
        values["layers"] = tuple((name, float(weight)) for name, weight in layers.items())
    if "channels" in values:
        channels = values["channels"]
        if not isinstance(channels, list):
            raise ConfigError(f"{source}: channels: expected a list of channel indices")
        values["channels"] = tuple(channels)
    if not isinstance(values.get("model", ""), str):
        raise ConfigError(f"{source}: model: expected a name")
    recipe = dataclasses.replace(PRESETS[preset_name], **values).validate(source)
    sha = data.get("weights_sha256")
    return recipe, sha if isinstance(sha, str) else None
