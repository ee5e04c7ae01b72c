"""The ``animate:`` and ``video:`` sections of a job config: clips dreamed by ``jaxdream run``.

A config with ``animate:`` turns each input image into a feedback-zoom animation; one with
``video:`` dreams each input video, cut into ``segments`` that the job's workers dream in
parallel. ``dream:`` (and ``max_side``) set the recipe as for stills; the section adds what
changes from frame to frame, as keyframed schedules (data, never code)::

    video:  {blend: 0.8, refresh: 0.3, independent: false, flow: true, segments: 4,
             warmup: 12, format: mp4, step_size: {0: 1.5, 48: 1.0}, layer_weights: {...}}
    animate: {frames: 48, fps: 12, format: gif, zoom: {0: 1.3, 48: 1.1}, angle: 0,
              translate_x: 0, translate_y: 0, steps: ..., layer_weights: {...}}

Checked as strictly as the rest of the config (:mod:`jaxdream.config` calls :func:`read_motion`),
and as lightly: no JAX here. Errors name the key path (``job.yaml: video.blend: ...``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jaxdream.motion.schedules import DREAM_KEYS, MOTION_KEYS, VIDEO_KEYS, Bounds, Schedule, \
    check_bounds, parse_schedule

if TYPE_CHECKING:
    from jaxdream.config import Variant, _Reader

FORMATS = ("gif", "mp4", "png")
#: The most frames an animation may have (as ``jaxdream animate --frames``).
MAX_FRAMES = 1_000_000
#: Warm-up frames of a segment when the config says nothing: carried detail fades as
#: blend^frames, so 12 at blend 0.8 leaves under 7% of where a segment started.
DEFAULT_WARMUP = 12

_COMMON = ("format", *DREAM_KEYS, "layer_weights")
SECTION_KEYS = {
    "animate": ("frames", "fps", *MOTION_KEYS, *_COMMON),
    "video": (*VIDEO_KEYS, "refresh", "independent", "flow", "segments", "warmup", *_COMMON),
}


@dataclasses.dataclass(frozen=True)
class MotionJob:
    """What a config's ``animate:`` or ``video:`` section asks for; None: the default."""

    kind: str  #: "animate" or "video"
    format: str  #: what each input becomes: gif, mp4 (+ its frames) or a folder of PNGs
    dream: Mapping[str, Schedule]  #: DREAM_KEYS schedules over the recipe's values
    layer_weights: Mapping[str, Schedule]
    #: animate: MOTION_KEYS schedules (per second); video: the blend schedule.
    values: Mapping[str, Schedule]
    frames: int | None = None
    fps: float | None = None
    independent: bool = False
    flow: bool = True
    refresh: float | None = None
    segments: int = 1
    warmup: int = DEFAULT_WARMUP


def _schedule(reader: _Reader, value: Any, path: str, bounds: Bounds) -> Schedule:
    where = reader.label(path)
    return check_bounds(parse_schedule(value, where), bounds, where)


def _number(reader: _Reader, section: Mapping[str, Any], kind: str, key: str, hint: type,
            low: float, high: float) -> Any:
    if key not in section:
        return None
    value = reader.typed(section[key], hint, f"{kind}.{key}")
    if not low <= value <= high:
        raise reader.fail(f"{kind}.{key}", f"must be between {low:g} and {high:g}, got {value}")
    return value


def _flag(reader: _Reader, section: Mapping[str, Any], kind: str, key: str, default: bool
          ) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        reader.expected(f"{kind}.{key}", "true or false", value)
    return value


def read_motion(reader: _Reader, data: Mapping[Any, Any], where: Mapping[str, str],
                variants: tuple[Variant, ...]) -> MotionJob | None:
    """The checked ``animate:`` or ``video:`` section of a config; None when it has neither.

    ``where`` maps the recipe fields the config set to their key paths; ``variants`` are the
    config's recipes (a clip dreams with one: a grid is refused).
    """
    kinds = [kind for kind in SECTION_KEYS if data.get(kind) is not None]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise reader.fail("video", "a config dreams images into animations (animate:) or "
                                   "videos (video:), not both; give one")
    kind = kinds[0]
    section = reader.section(dict(data), kind, SECTION_KEYS[kind])
    if data.get("grid"):
        raise reader.fail("grid", f"cannot be combined with {kind}: (a clip dreams with one "
                                  f"recipe; vary it with schedules in {kind}:)")
    for key in DREAM_KEYS:
        if key in section and key in where:
            raise reader.fail(f"{kind}.{key}", f"set in both {kind} and {where[key]}; give one")
    layers = [name for name, _ in variants[0].recipe.layers or ()]
    weights = section.get("layer_weights") or {}
    if not isinstance(weights, dict):
        reader.expected(f"{kind}.layer_weights", "a mapping of layer: schedule", weights)
    for name in weights:
        if name not in layers:
            raise reader.fail(f"{kind}.layer_weights.{name}",
                              f"not among the dream's layers {layers} (set them in dream.layers)")
    fmt = section.get("format", "gif" if kind == "animate" else "mp4")
    if fmt not in FORMATS:
        reader.expected(f"{kind}.format", f"one of {', '.join(FORMATS)}", fmt)
    refresh = _number(reader, section, kind, "refresh", float, 0.0, 1.0)
    if refresh == 0:
        raise reader.fail(f"{kind}.refresh", "must be above 0 (a share of the step size)")
    warmup = _number(reader, section, kind, "warmup", int, 0, MAX_FRAMES)
    return MotionJob(
        kind=kind, format=fmt,
        dream={key: _schedule(reader, section[key], f"{kind}.{key}", DREAM_KEYS[key])
               for key in DREAM_KEYS if key in section},
        layer_weights={str(name): _schedule(reader, value, f"{kind}.layer_weights.{name}",
                                            Bounds(0.0, 1e6))
                       for name, value in weights.items()},
        values={key: _schedule(reader, section[key], f"{kind}.{key}", bounds)
                for key, bounds in {**MOTION_KEYS, **VIDEO_KEYS}.items() if key in section},
        frames=_number(reader, section, kind, "frames", int, 1, MAX_FRAMES),
        fps=_number(reader, section, kind, "fps", float, 0.1, 1000.0),
        independent=_flag(reader, section, kind, "independent", False),
        flow=_flag(reader, section, kind, "flow", True), refresh=refresh,
        segments=_number(reader, section, kind, "segments", int, 1, MAX_FRAMES) or 1,
        warmup=DEFAULT_WARMUP if warmup is None else warmup)
