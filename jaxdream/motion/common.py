"""What animations and videos share: dream settings per frame, engines, and frame folders.

A frame folder holds ``frame_000000.png``, ... (each PNG carries its frame's recipe) and
``animation.json``, the whole recipe of the clip, schedules included. Frames are written
atomically as they finish, so after a crash or Ctrl-C every PNG present is complete and the
same command continues from the first missing one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdream.engine import ItemParams, default_batch_size, item_params
from jaxdream.errors import ConfigError, JaxdreamError
from jaxdream.images import load_rgb, save_png, to_uint8
from jaxdream.models import LoadedModel, load_model
from jaxdream.motion.schedules import DREAM_KEYS, Bounds, Schedule, check_bounds, parse_schedule
from jaxdream.motion.videoio import frame_name
from jaxdream.recipe import Recipe
from jaxdream.tiles import engine_key, make_engine


ANIMATION_FILE = "animation.json"


@dataclasses.dataclass(frozen=True)
class DreamSchedules:
    """The recipe of every frame: a base recipe, some of whose values follow schedules."""

    recipe: Recipe
    #: Schedules of DREAM_KEYS entries; keys left out keep the recipe's value.
    values: Mapping[str, Schedule] = dataclasses.field(default_factory=dict)
    #: Per layer of the recipe, a schedule of its weight.
    layer_weights: Mapping[str, Schedule] = dataclasses.field(default_factory=dict)
    #: True: frame t dreams with seed + t (fresh jitter each frame, as every peer does).
    seed_per_frame: bool = True

    def __post_init__(self) -> None:
        assert self.recipe.layers is not None, "resolve the recipe's layers first"
        names = [name for name, _ in self.recipe.layers]
        unknown = sorted(set(self.layer_weights) - set(names))
        if unknown:
            raise ConfigError(f"layer weight schedules for {unknown}, which are not among the "
                              f"dream's layers {names}")

    def at(self, frame: int) -> Recipe:
        values: dict[str, Any] = {}
        for key, schedule in self.values.items():
            value = schedule.at(frame)
            values[key] = round(value) if DREAM_KEYS[key].integer else value
        if self.layer_weights:
            values["layers"] = tuple(
                (name, self.layer_weights[name].at(frame) if name in self.layer_weights
                 else weight) for name, weight in self.recipe.layers or ())
        if self.seed_per_frame:
            values["seed"] = (self.recipe.seed + frame) % 2**32
        return dataclasses.replace(self.recipe, **values)

    def to_json(self) -> dict[str, Any]:
        return {"schedules": {key: s.to_json() for key, s in self.values.items()},
                "layer_weights": {key: s.to_json() for key, s in self.layer_weights.items()},
                "seed_per_frame": self.seed_per_frame}


def parse_layer_weights(data: Mapping[str, Any], source: str) -> dict[str, Schedule]:
    """``{layer: schedule}`` with weights of at least 0."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of layer: schedule")
    return {str(name): check_bounds(parse_schedule(value, f"{source}: {name}"),
                                    Bounds(0.0, 1e6), f"{source}: {name}")
            for name, value in data.items()}


class Engines:
    """One engine per (model, static settings): frames whose steps differ need their own
    program, frames that agree share one."""

    def __init__(self, model: LoadedModel, batch_size: int | None = None):
        self.model = model
        self.batch_size = batch_size or default_batch_size()
        self._engines: dict[Any, Any] = {}
        #: Images dreamed so far (tests count these to prove resume renders nothing twice).
        self.rendered = 0

    @classmethod
    def load(cls, recipe: Recipe, weights: str | None, batch_size: int | None = None
             ) -> Engines:
        return cls(load_model(recipe.model, weights), batch_size)

    def render(self, starts: Sequence[np.ndarray], recipes: Sequence[Recipe]
               ) -> list[np.ndarray]:
        """Dreams each start image with its recipe; same settings go through one call."""
        results: list[np.ndarray | None] = [None] * len(starts)
        groups: dict[Any, list[int]] = {}
        for index, recipe in enumerate(recipes):
            groups.setdefault(engine_key(recipe), []).append(index)
        for key, members in groups.items():
            engine = self._engines.get(key)
            if engine is None:  # tiles > 0: the tile engine, as `jaxdream dream` chooses it
                engine = self._engines[key] = make_engine(
                    self.model, key, min(self.batch_size, len(members)))
            params: list[ItemParams] = [item_params(recipes[i]) for i in members]
            for slot, out in enumerate(engine.render([starts[i] for i in members], params)):
                results[members[slot]] = out
        self.rendered += len(starts)
        return results  # type: ignore[return-value]

    def stats(self) -> str:
        from jaxdream.engine import CompileStats

        total = CompileStats()
        for engine in self._engines.values():
            total.add(engine.stats)
        return total.describe()


def frames_folder(output: Path) -> Path:
    """``out.mp4`` / ``out.gif`` keep their frames in ``out_frames/``; any other output is
    the frame folder itself."""
    if output.suffix.lower() in (".mp4", ".gif"):
        return output.with_name(f"{output.stem}_frames")
    return output


def prepare_folder(folder: Path, identity: Mapping[str, Any], full: Mapping[str, Any],
                   overwrite: bool) -> None:
    """Creates ``folder`` with ``animation.json``, or checks that the frames already there
    were rendered by the same recipe (so that a resume continues the same clip).

    ``identity`` is what must match; ``full`` is what is written (identity plus e.g. the
    frame count, which may grow between runs).
    """
    if folder.exists() and not folder.is_dir():
        raise JaxdreamError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    # A process killed while writing a frame leaves its hidden temporary file (the frame
    # itself is never partial): clear those before continuing.
    for stale in folder.glob(".frame_*.tmp"):
        stale.unlink(missing_ok=True)
    saved = folder / ANIMATION_FILE
    if saved.exists() and not overwrite:
        try:
            before = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise JaxdreamError(f"{saved}: unreadable ({error}); pass --overwrite to start "
                                f"again") from None
        if not isinstance(before, dict) or before.get("identity") != json.loads(
                json.dumps(identity)):
            raise JaxdreamError(f"{folder}: holds frames of a different recipe; pass "
                                f"--overwrite to replace them, or choose another output")
    elif overwrite:
        for path in folder.glob("frame_*.png"):
            path.unlink()
    text = json.dumps({"identity": identity, **full}, indent=1, sort_keys=True)
    tmp = saved.with_name(f".{saved.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, saved)


def first_missing(folder: Path, count: int, start: int = 0) -> int:
    """The first frame in ``start..count-1`` without a PNG (``count`` when all are there)."""
    for index in range(start, count):
        if not (folder / frame_name(index)).exists():
            return index
    return count


def load_frame(folder: Path, index: int) -> np.ndarray:
    return load_rgb(folder / frame_name(index)).astype(np.float32)


def write_frame(folder: Path, index: int, image: np.ndarray, recipe: Recipe,
                model: LoadedModel, extra: Mapping[str, Any]) -> Path:
    path = folder / frame_name(index)
    save_png(path, to_uint8(image), recipe.to_json(
        weights_sha256=model.weights_sha256,
        extra={"weights": model.weights_path.name, "frame": index, **extra}))
    return path
