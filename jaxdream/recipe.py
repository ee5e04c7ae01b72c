"""A dream's full recipe: presets, validation, and the JSON stored in every output PNG.

A recipe holds every value that decides the pixels (model, weights identity, layers, octaves,
steps, step size, jitter, seed, max side), so ``jaxdream dream INPUT --recipe OUT.png``
reproduces an output exactly. Values are checked here, once, with errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxdream import __version__
from jaxdream.dream import StaticSettings
from jaxdream.engine import ItemParams
from jaxdream.errors import ConfigError, brief, first_few
from jaxdream.objectives import format_layers, parse_layers

MAX_SEED = 2**32 - 1
OBJECTIVES = ("l2", "channel", "neuron", "guide")
NORMALISERS = ("mean", "laplacian", "gaussian")
UPDATES = ("ascent", "adam")


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
                raise bad(key, f"expected a number, got {brief(value)}")
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
                                  f"input's own size), got {brief(self.max_side)}")
        if self.layers is not None and not self.layers:
            raise bad("layers", "is empty")
        for name, weight in self.layers or ():
            if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(
                    weight, (int, float)):
                raise bad("layers", f"expected endpoint -> weight, got {brief(name)}: "
                                    f"{brief(weight)}")
            if not math.isfinite(weight):
                raise bad("layers", f"the weight of {brief(name)} must be a finite number, "
                                    f"got {weight} (too large, or not a number)")
        for key, value, choices in (("objective", self.objective, OBJECTIVES),
                                    ("normaliser", self.normaliser, NORMALISERS),
                                    ("update", self.update, UPDATES)):
            if value not in choices:
                raise bad(key, f"unknown value {brief(value)}; choose one of {', '.join(choices)}")
        if not isinstance(self.channels, tuple):
            raise bad("channels", f"expected a list of channel indices (integers >= 0), got "
                                  f"{brief(self.channels)}")
        wrong = [c for c in self.channels
                 if not isinstance(c, int) or isinstance(c, bool) or c < 0]
        if wrong:
            raise bad("channels", f"expected channel indices (integers >= 0); {len(wrong)} of "
                                  f"{len(self.channels)} are not: {first_few(wrong)}")
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
                raise bad(key, f"expected an integer >= 0, got {brief(value)}")
        if self.tile_above and self.tile_size < 64:
            raise bad("tile_size", f"must be at least 64 pixels when tiling, got "
                                   f"{self.tile_size}")
        return self

    def with_layers(self, text: str, known: list[str], source: str | None = None) -> Recipe:
        """The recipe with ``text`` parsed as its layers; errors name ``source`` if given."""
        try:
            layers = parse_layers(text, known)
        except ConfigError as error:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}{error} (model {self.model})") from None
        return dataclasses.replace(self, layers=tuple(layers.items()))

    def static_settings(self) -> StaticSettings:
        assert self.layers is not None, "resolve the default layer first"
        return StaticSettings(layers=tuple(name for name, _ in self.layers),
                              octaves=self.octaves, octave_scale=float(self.octave_scale),
                              steps=self.steps, objective=self.objective,
                              normaliser=self.normaliser, update=self.update,
                              tile_size=self.tile_size, tile_above=self.tile_above)

    def item_params(self) -> ItemParams:
        assert self.layers is not None, "resolve the default layer first"
        return ItemParams(step_size=float(self.step_size), jitter=self.jitter, seed=self.seed,
                          layer_weights=tuple(float(w) for _, w in self.layers),
                          channels=self.channels, guide=self.guide)

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
        raise ConfigError(f"{source}: {len(unknown)} unknown recipe key(s): "
                          f"{first_few(list(unknown))}")
    preset_name = data.get("preset", "classic")
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        raise ConfigError(f"{source}: preset: unknown preset {brief(preset_name)}")
    values = {key: data[key] for key in _FIELDS if key in data}
    layers = values.pop("layers", None)
    if layers is not None:
        if (not isinstance(layers, Mapping) or not layers
                or not all(isinstance(k, str) for k in layers)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in layers.values())):
            raise ConfigError(f"{source}: layers: expected an object of endpoint -> weight")
        values["layers"] = tuple((name, float(weight)) for name, weight in layers.items())
        for name, weight in values["layers"]:
            if not math.isfinite(weight):  # JSON's 1e400 parses as infinity
                raise ConfigError(f"{source}: layers: the weight of {brief(name)} is too large "
                                  f"(it overflows to infinity); give a finite number")
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
