"""The Python API: dream images held in memory, from a notebook or a script.

    >>> import numpy as np, jaxdream
    >>> photo = np.full((48, 64, 3), 128, np.uint8)
    >>> dreamer = jaxdream.Dreamer()                     # loads the model once
    >>> out = dreamer.dream(photo, octaves=1, steps=2)   # an array in, an array out
    >>> out.shape, out.dtype
    ((48, 64, 3), dtype('uint8'))

Settings have the names, meanings and defaults of the recipe (the CLI's ``dream`` options and
a config's ``dream:`` section, underscores for dashes), so a setting found in a notebook can
be pasted into a config. A dreamed :class:`PIL.Image.Image` carries its recipe and writes it
into the PNG when saved, so ``jaxdream dream PHOTO --recipe SAVED.png`` renders it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from jaxdream.errors import ConfigError, ImageError
from jaxdream.images import RECIPE_KEY as _RECIPE_KEY
from jaxdream.objectives import Objective, Term

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]



class DreamImage(Image.Image):
    """A :class:`PIL.Image.Image` that remembers the recipe that made it.

    ``recipe`` is the JSON object jaxdream stores in its PNGs; :meth:`save` writes it as the
    PNG text chunk ``jaxdream`` (unless a ``pnginfo`` is given), so the file can be rendered
    again with ``jaxdream dream PHOTO --recipe FILE.png``. Images derived from it (resized,
    cropped) are plain PIL images: the recipe no longer describes them.
    """

    recipe: dict[str, Any]

    @classmethod
    def wrap(cls, image: Image.Image, recipe: dict[str, Any]) -> DreamImage:
        wrapped = cls.__new__(cls)
        wrapped.__dict__.update(image.__dict__)
        wrapped.recipe = recipe
        wrapped.info = {**image.info, _RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
        return wrapped

    def save(self, fp: Any, format: str | None = None, **params: Any) -> None:  # noqa: A002
        target = format or (Path(os.fspath(fp)).suffix.lstrip(".")
                            if isinstance(fp, (str, os.PathLike)) else "")
        if target.lower() == "png" and "pnginfo" not in params:
            info = PngImagePlugin.PngInfo()
            info.add_itxt(_RECIPE_KEY, json.dumps(self.recipe, sort_keys=True), zip=True)
            params["pnginfo"] = info
        super().save(fp, format, **params)


@dataclasses.dataclass(frozen=True)
class GridResult:
    """The dreams of a grid, row-major over its axes, and their labelled contact sheet."""

    images: list[Any]
    points: list[dict[str, Any]]
    sheet: Image.Image


def _layers_value(value: Any, objective: Any) -> tuple[Any, str | None, tuple[int, ...]]:
    """(layers text or mapping, objective kind, channels) from the ways a user names layers:
    ``"block8:1,block10:2"``, ``{"block8": 1}``, ``["block8", "block10"]``, or an objective
    value such as ``layer("block8") + 2 * layer("block10")``."""
    terms: tuple[Term, ...] | None = None
    if isinstance(objective, (Term, Objective)):
        terms = objective.terms if isinstance(objective, Objective) else (objective,)
    elif isinstance(value, (Term, Objective)):
        terms = value.terms if isinstance(value, Objective) else (value,)
    if terms is not None:
        kinds = {t.kind for t in terms}
        channel_sets = {t.channels for t in terms}
        if len(kinds) > 1 or len(channel_sets) > 1:
            raise ConfigError("objective: a recipe holds one kind of term with one channel "
                              f"list for all its layers; got kinds {sorted(kinds)} and "
                              f"channels {sorted(channel_sets)}")
        return ({t.layer: float(t.weight) for t in terms}, kinds.pop(), channel_sets.pop())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    return value, objective, ()


def resolve_recipe(model: str, settings: Mapping[str, Any], *, source: str = "settings"
                   ) -> Any:
    """A validated :class:`~jaxdream.recipe.Recipe` from keyword settings, through the one path
    that resolves configs and options (the recipe's defaults, the preset's, then each setting).
    Layers and objectives may also be given as Python values (see :func:`_layers_value`)."""
    from jaxdream.config import recipe_from_settings

    values = dict(settings)
    layers, objective, channels = _layers_value(values.pop("layers", None),
                                                values.pop("objective", None))
    if layers is not None:
        values["layers"] = layers
    if objective is not None:
        values["objective"] = objective
    if channels:
        values["channels"] = list(channels)
    if isinstance(values.get("channels"), tuple):
        values["channels"] = list(values["channels"])
    return recipe_from_settings(model, values, source)


def _rgb_of_pil(image: Image.Image, max_side: int | None) -> np.ndarray:
    """The image as jaxdream reads a file: EXIF rotation, 8-bit RGB, shrunk with Lanczos."""
    from jaxdream.images import _fit_longer_side, _to_rgb_image

    image = ImageOps.exif_transpose(image) or image
    rgb = _to_rgb_image(image)
    if max_side is not None and max(rgb.size) > max_side:
        rgb = rgb.resize(_fit_longer_side(*rgb.size, max_side), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)


def _prepare(image: ImageLike, max_side: int | None, max_pixels: int
             ) -> tuple[np.ndarray, dict[str, Any], str]:
    """(H x W x 3 pixels on 0..255, the recipe's ``input`` entry, what to return: "pil",
    "uint8" or "float")."""
    from jaxdream.images import load_rgb

    if isinstance(image, (str, os.PathLike)):
        from jaxdream.files import open_regular_file

        pixels = load_rgb(image, max_side=max_side, max_pixels=max_pixels)
        with open_regular_file(image) as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return pixels, {"name": Path(image).name, "sha256": digest}, "pil"
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "")
        if filename and getattr(image, "_im", True) is None and os.path.isfile(filename):
            # Opened but not decoded yet: read the file as the CLI does (a JPEG is decoded at
            # a reduced scale before shrinking), so a recipe renders the same pixels again.
            return _prepare(filename, max_side, max_pixels)
        if image.width * image.height > max_pixels:
            raise ImageError(f"image: {image.width}x{image.height} pixels exceeds the limit of "
                             f"{max_pixels} (max_pixels)")
        pixels = _rgb_of_pil(image, max_side)
        name = Path(getattr(image, "filename", "") or "image").name
        return pixels, {"name": name}, "pil"
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 16:
            raise ImageError(f"image: expected an H x W x 3 array of at least 16 x 16 pixels, "
                             f"got shape {image.shape}")
        if image.shape[0] * image.shape[1] > max_pixels:
            raise ImageError(f"image: {image.shape[1]}x{image.shape[0]} pixels exceeds the "
                             f"limit of {max_pixels} (max_pixels)")
        if image.dtype == np.uint8:
            kind, pixels = "uint8", image
        elif np.issubdtype(image.dtype, np.floating):
            if not np.all(np.isfinite(image)):
                raise ImageError("image: the array holds NaN or infinite values")
            kind, pixels = "float", np.clip(image, 0.0, 255.0).astype(np.float32)
        else:
            raise ImageError(f"image: expected a uint8 or float array (0..255), got "
                             f"{image.dtype}")
        if max_side is not None and max(pixels.shape[:2]) > max_side:
            size = _fit_longer_side_of(pixels, max_side)
            pixels = np.stack([np.asarray(Image.fromarray(pixels[..., c].astype(np.float32),
                                                          "F").resize(size, Image.Resampling
                                                                      .LANCZOS))
                               for c in range(3)], axis=-1)
            if kind == "uint8":
                pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels), {"name": "array"}, kind
    raise ImageError(f"image: expected a path, a PIL image or an H x W x 3 array, got "
                     f"{type(image).__name__}")


def _fit_longer_side_of(pixels: np.ndarray, max_side: int) -> tuple[int, int]:
    from jaxdream.images import _fit_longer_side

    return _fit_longer_side(pixels.shape[1], pixels.shape[0], max_side)


class Dreamer:
    """A model loaded once, with its compiled programs kept between calls.

    >>> import numpy as np, jaxdream
    >>> dreamer = jaxdream.Dreamer("efficientnet_lite0")
    >>> photo = np.full((40, 40, 3), 100, np.uint8)
    >>> first = dreamer.dream(photo, octaves=1, steps=1)
    >>> built = dreamer.stats.programs
    >>> second = dreamer.dream(photo, octaves=1, steps=1, seed=1)   # same shape: no compile
    >>> dreamer.stats.programs == built
    True
    """

    def __init__(self, model: str = "efficientnet_lite0",
                 weights: str | os.PathLike[str] | None = None, *, batch_size: int | None = None,
                 compute_dtype: str | None = None, max_pixels: int | None = None,
                 progress: bool = False, disk_cache: bool = True):
        from jaxdream.engine import CompileStats, use_disk_cache
        from jaxdream.images import DEFAULT_MAX_PIXELS
        from jaxdream.models import load_model

        if disk_cache:  # as the CLI does: programs compiled once here load from disk after
            use_disk_cache()

        self.model = load_model(model, None if weights is None else os.fspath(weights))
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.progress = progress
        self._engines: dict[Any, Any] = {}
        self._closed_stats = CompileStats()

    # ------------------------------------------------------------------------------ recipes
    def recipe(self, **settings: Any) -> Any:
        """The validated recipe these settings give with this model (see :func:`dream`)."""
        return resolve_recipe(self.model.spec.name, settings)

    @property
    def stats(self) -> Any:
        """Programs built so far by this dreamer (and how many came from the disk cache)."""
        from jaxdream.engine import CompileStats

        total = CompileStats()
        total.add(self._closed_stats)
        for engine in self._engines.values():
            total.add(engine.stats)
        return total

    def _engine(self, recipe: Any) -> Any:
        from jaxdream.engine import default_batch_size
        from jaxdream.tiles import engine_key, make_engine

        key = engine_key(recipe)
        if key not in self._engines:
            # tiles > 0: the tile engine (jaxdream.tiles), as `jaxdream dream` chooses it.
            self._engines[key] = make_engine(
                self.model, key, self.batch_size or default_batch_size(),
                compute_dtype=self.compute_dtype)
        return self._engines[key]

    # ------------------------------------------------------------------------------ dreaming
    def _render(self, jobs: Sequence[tuple[np.ndarray, Any]]) -> list[np.ndarray]:
        from tqdm.auto import tqdm

        from jaxdream.engine import item_params
        from jaxdream.tiles import engine_key

        groups: dict[Any, list[int]] = {}
        for index, (_, recipe) in enumerate(jobs):
            groups.setdefault(engine_key(recipe), []).append(index)
        results: list[np.ndarray | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), unit="img", desc="dreaming",
                  disable=not self.progress) as bar:
            for members in groups.values():
                engine = self._engine(jobs[members[0]][1])
                images = [jobs[i][0] for i in members]
                params = [item_params(jobs[i][1]) for i in members]
                for slot, out in engine.render_iter(images, params):
                    results[members[slot]] = out
                    bar.update(1)
        return results  # type: ignore[return-value]

    def _finish(self, out: np.ndarray, recipe: Any, source: dict[str, Any], kind: str,
                point: Mapping[str, Any] | None = None) -> Any:
        from jaxdream.images import to_uint8

        if kind == "float":
            return out.astype(np.float32)
        pixels = to_uint8(out)
        if kind == "uint8":
            return pixels
        extra: dict[str, Any] = {
            "input": {**source, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])},
            "weights": self.model.weights_path.name}
        if point:
            extra["grid"] = dict(point)
        data = recipe.to_json(weights_sha256=self.model.weights_sha256, extra=extra)
        return DreamImage.wrap(Image.fromarray(pixels), data)

    def dream(self, image: ImageLike, **settings: Any) -> Any:
        """Dreams one image; see :func:`jaxdream.dream` for the settings and return types."""
        return self.dream_many([image], **settings)[0]

    def dream_many(self, images: Iterable[ImageLike], **settings: Any) -> list[Any]:
        """Dreams several images with the same settings, batched through shared programs."""
        recipe = self.recipe(**settings)
        prepared = [_prepare(image, recipe.max_side, self.max_pixels) for image in images]
        outs = self._render([(pixels, recipe) for pixels, _, _ in prepared])
        return [self._finish(out, recipe, source, kind)
                for out, (_, source, kind) in zip(outs, prepared, strict=True)]

    def grid(self, image: ImageLike, *, base: Mapping[str, Any] | None = None,
             cell: int = 256, **axes: Sequence[Any]) -> GridResult:
        """Dreams ``image`` at every point of the grid ``axes`` (setting -> list of values),
        with ``base`` settings fixed; returns the dreams and a labelled contact sheet.

        Settings that only change per-image values (step size, jitter, seed, layer weights)
        share one compiled program, so a grid of them costs one compile.
        """
        from jaxdream.gallery import Tile, contact_sheet

        if not axes:
            raise ConfigError("grid: give at least one axis, e.g. step_size=[1.0, 2.0]")
        for name, values in axes.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"grid: {name}: expected a non-empty list of values")
        names = list(axes)
        points = [dict(zip(names, combo, strict=True))
                  for combo in itertools.product(*(axes[n] for n in names))]
        recipes = [self.recipe(**{**(base or {}), **point}) for point in points]
        # The photo is read once, at the largest max_side any point asks for.
        pixels_by_side: dict[Any, tuple[np.ndarray, dict[str, Any], str]] = {}
        for recipe in recipes:
            if recipe.max_side not in pixels_by_side:
                pixels_by_side[recipe.max_side] = _prepare(image, recipe.max_side,
                                                           self.max_pixels)
        outs = self._render([(pixels_by_side[r.max_side][0], r) for r in recipes])
        dreams = [self._finish(out, r, pixels_by_side[r.max_side][1],
                               pixels_by_side[r.max_side][2], point)
                  for out, r, point in zip(outs, recipes, points, strict=True)]
        from jaxdream.images import to_uint8

        with tempfile.TemporaryDirectory(prefix="jaxdream-grid-") as folder:
            tiles = []
            for index, (out, point) in enumerate(zip(outs, points, strict=True)):
                path = Path(folder) / f"{index}.png"
                Image.fromarray(to_uint8(out)).save(path)
                tiles.append(Tile(path, point, "done"))
            sheet_path = contact_sheet(tiles, [(n, list(axes[n])) for n in names],
                                       Path(folder) / "sheet.png",
                                       title=f"{self.model.spec.name}", cell=cell)
            with Image.open(sheet_path) as opened:
                sheet = opened.convert("RGB")
        return GridResult(dreams, points, sheet)

    def classify(self, image: ImageLike, top: int = 5) -> list[tuple[int, str, float]]:
        """The model's top-``top`` ImageNet classes for the image: (index, label, probability).
        """
        from jaxdream.classify import classify

        pixels, _, _ = _prepare(image, None, self.max_pixels)
        return classify(self.model, [np.asarray(pixels, np.uint8)], top=top)[0]


_DREAMERS: dict[tuple[str, str | None], Dreamer] = {}


def _dreamer(model: str, weights: str | os.PathLike[str] | None) -> Dreamer:
    key = (model, None if weights is None else os.fspath(weights))
    if key not in _DREAMERS:
        _DREAMERS[key] = Dreamer(model, weights)
    return _DREAMERS[key]


def dream(image: ImageLike, *, model: str = "efficientnet_lite0",
          weights: str | os.PathLike[str] | None = None, **settings: Any) -> Any:
    """Dreams one image with the recipe's settings; the model stays loaded for the next call.

    ``image`` is a path, a :class:`PIL.Image.Image` or an ``H x W x 3`` array (uint8, or float
    on the 0..255 scale). Settings are the recipe's: ``preset``, ``layers`` (``"block10"``,
    ``"block8:1,block10:2"``, a dict, or an objective such as ``layer("block8") +
    2 * layer("block10")``), ``octaves``, ``octave_scale``, ``steps``, ``step_size``,
    ``jitter``, ``seed``, ``max_side``, ``objective``, ``channels``, ``guide``,
    ``normaliser``, ``update``, ``tile_size``, ``tile_above``, ``tiles`` (the opt-in tile
    engine, :mod:`jaxdream.tiles`), ``shape_bucket`` (1: dream at the exact size, no padding).

    Returns a :class:`DreamImage` (a PIL image that saves its recipe into the PNG) for a path
    or PIL input, and an array of the input's dtype for an array.

    >>> import numpy as np, jaxdream
    >>> out = jaxdream.dream(np.zeros((32, 32, 3), np.float32), octaves=1, steps=1)
    >>> out.shape, out.dtype
    ((32, 32, 3), dtype('float32'))
    """
    return _dreamer(model, weights).dream(image, **settings)


def dream_many(images: Iterable[ImageLike], *, model: str = "efficientnet_lite0",
               weights: str | os.PathLike[str] | None = None, **settings: Any) -> list[Any]:
    """:func:`dream` for several images, batched through the engine's shape buckets."""
    return _dreamer(model, weights).dream_many(images, **settings)
