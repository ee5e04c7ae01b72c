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
from jaxdream.errors import ConfigError, brief, first_few

MAX_SEED = 2**32 - 1

#: The whole-image engine's default shape bucket: at most 63 pixels of padding per side.
DEFAULT_SHAPE_BUCKET = 64

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

# Names may hold '.' and '/' (Caffe's blob names: inception_4c/output).
_LAYER_ITEM = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*(?::\s*([-+0-9.eE]+)\s*)?$")


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
            raise ConfigError(f"layers: cannot parse {brief(item.strip())}; expected NAME or "
                              f"NAME:WEIGHT, e.g. 'block8:1,block10:2'")
        name, weight_text = match.group(1), match.group(2)
        try:
            weight = float(weight_text) if weight_text is not None else 1.0
        except ValueError:
            raise ConfigError(f"layers: weight {brief(weight_text)} of {brief(name)} is not a "
                              f"number") from None
        if not math.isfinite(weight):
            raise ConfigError(f"layers: weight of {brief(name)} must be finite, got "
                              f"{brief(weight_text)}")
        if name in layers:
            raise ConfigError(f"layers: {brief(name)} is listed twice")
        if known is not None and name not in known:
            raise ConfigError(f"layers: unknown endpoint {brief(name)}; this model has: "
                              f"{', '.join(known)}")
        layers[name] = weight
    if all(w == 0 for w in layers.values()):
        raise ConfigError("layers: every weight is zero, so there is nothing to amplify")
    return layers


def format_layers(layers: Mapping[str, float]) -> str:
    """The inverse of :func:`parse_layers` (``repr`` of floats round-trips exactly)."""
    return ",".join(f"{name}:{weight!r}" for name, weight in layers.items())


def _setting(default: Any, help: str, *, metavar: str | None = None,
             choices: Mapping[str, str] | None = None, shown: str | None = None) -> Any:
    """A recipe field and what ``jaxdream dream --help`` says about it: the CLI's options are
    generated from these, so a new setting is one field. ``shown`` replaces the default in the
    help text; ``choices`` (name -> description) are offered and described."""
    return dataclasses.field(default=default, metadata={
        "help": help, "metavar": metavar, "choices": choices, "shown": shown})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides a dream's pixels, apart from the input image itself."""

    model: str = _setting("efficientnet_lite0", "model name",
                          shown="efficientnet_lite0, embedded weights")
    #: (endpoint, weight) pairs; ``None`` means the model's default layer.
    layers: tuple[tuple[str, float], ...] | None = _setting(
        None, "endpoints to amplify, optionally weighted: block10 or block8:1,block10:2",
        shown="the model's own")
    octaves: int = _setting(4, "number of scales")
    octave_scale: float = _setting(1.4, "size ratio between octaves")
    steps: int = _setting(10, "gradient steps per octave")
    step_size: float = _setting(1.5, "mean absolute pixel change per step, on the 0..255 scale")
    jitter: int = _setting(32, "largest random shift in pixels before each step")
    seed: int = _setting(0, "random seed for jitter")
    #: Longer side of the image the dream runs at; ``None`` keeps the input's size.
    max_side: int | None = _setting(
        1024, "downscale so the longer side is at most this; 0 keeps the input's size")
    preset: str = _setting("classic", "named look; the other settings start from it")
    #: What to amplify at each layer; the guide objective matches the ``guide`` image's
    #: features as in the original notebook.
    objective: str = _setting("l2", "what to amplify at the layers", choices=OBJECTIVES)
    channels: tuple[int, ...] = _setting(
        (), "channel indices for --objective channel or neuron, e.g. 3,17", metavar="C[,C...]",
        shown="none")
    guide: str | None = _setting(None, "guide photo for --objective guide", metavar="IMAGE",
                                 shown="none")
    #: How the raw gradient is shaped before the step. The step size always sets the mean
    #: |change| per step.
    normaliser: str = _setting("mean", "gradient shaping", choices=NORMALISERS)
    update: str = _setting("ascent", "update rule", choices=UPDATES)
    #: Octaves whose longer side exceeds ``tile_above`` pixels compute their gradient in
    #: ``tile_size`` tiles (with a fresh random roll each step); 0 never tiles.
    tile_size: int = _setting(512, "tile side for big images")
    tile_above: int = _setting(1280, "tile octaves whose longer side exceeds this; 0 never")
    #: ``T > 0`` dreams with the tile engine (:mod:`jaxdream.tiles`): one compiled T x T tile
    #: program for every image size, the rest in NumPy; 0 is the whole-image engine.
    tiles: int = _setting(0, "tile engine: one compiled TILES x TILES program for every image "
                             "size (64..512, a multiple of 32; l2 or channel objective, mean "
                             "normaliser, ascent); 0: the whole-image engine")
    #: The whole-image engine dreams each image in a buffer whose sides are rounded up to a
    #: multiple of ``shape_bucket`` (the padding copies the edge and is masked out), so photos
    #: of nearby sizes share a compiled program. The jitter roll wraps at the buffer's edge, so
    #: the value decides pixels; 1 dreams every image at its exact size, as the 2015 notebook
    #: rolls the image itself. The tile engine always works at the exact size.
    shape_bucket: int = _setting(
        DEFAULT_SHAPE_BUCKET, "whole-image engine: pad each side to a multiple of this so "
                              "nearby sizes share a compiled program; 1 dreams each image at "
                              "its exact size (no padding: fewer pixels, one program per "
                              "distinct size)")

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
        if (isinstance(self.shape_bucket, bool) or not isinstance(self.shape_bucket, int)
                or not 1 <= self.shape_bucket <= 512):
            raise bad("shape_bucket", f"expected a side multiple of 1..512 pixels (1: each "
                                      f"image at its exact size), got {brief(self.shape_bucket)}")
        self._validate_tiles(bad)
        return self

    def _validate_tiles(self, bad: Any) -> None:
        """The tile engine's size and what it can dream (see :mod:`jaxdream.tiles`)."""
        if isinstance(self.tiles, bool) or not isinstance(self.tiles, int) or (
                self.tiles and not (64 <= self.tiles <= 512 and self.tiles % 32 == 0)):
            raise bad("tiles", f"expected 0 (the whole-image engine) or a tile side of "
                               f"64..512 pixels, a multiple of 32, got {brief(self.tiles)}")
        if not self.tiles:
            return
        if self.objective not in ("l2", "channel"):
            why = ("a neuron sits at one place in the image, not once per tile"
                   if self.objective == "neuron" else
                   "the guide's features are matched over the whole image")
            raise bad("tiles", f"the tile engine cannot dream objective {self.objective!r} "
                               f"({why}); use l2 or channel, or tiles 0")
        if self.normaliser != "mean":
            raise bad("tiles", f"the tile engine cannot use normaliser {self.normaliser!r} "
                               f"(it shapes the gradient of the whole image); use mean, or "
                               f"tiles 0")
        if self.update != "ascent":
            raise bad("tiles", f"the tile engine cannot use update {self.update!r} (only "
                               f"normalised ascent); use ascent, or tiles 0")

    def with_layers(self, text: str, known: list[str], source: str | None = None) -> Recipe:
        """The recipe with ``text`` parsed as its layers; errors name ``source`` if given."""
        try:
            layers = parse_layers(text, known)
        except ConfigError as error:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}{error} (model {self.model})") from None
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
        if self.tiles:  # absent at 0: older recipes keep their JSON and their ids
            data["tiles"] = self.tiles
        if self.shape_bucket != DEFAULT_SHAPE_BUCKET:  # absent at 64, as every older recipe
            data["shape_bucket"] = self.shape_bucket
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
