"""Keyframed schedules: a value per frame, given at a few frames and interpolated between.

A schedule is data, never code: a number (constant), a mapping ``{0: 1.3, 120: 1.1}`` (YAML, or
JSON with the frames as strings), or a string ``0:1.3,120:1.1`` (the command line; Deforum's
``0:(1.3), 120:(1.1)`` is read too). A mapping may add ``interpolation: smooth`` and a string
may start with ``smooth`` (``"smooth 0:1.3,120:1.1"``); the default is ``linear``. Before the
first keyframe the first value holds, after the last the last one does.

``smooth`` is a monotone cubic (Fritsch and Carlson): continuous velocity through the
keyframes, and never beyond the values it joins, so a schedule that stays inside a parameter's
range between keyframes also does in between (a plain cubic spline can overshoot a zoom of
1.0 into a zoom-out).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from jaxdream.errors import ConfigError

INTERPOLATIONS = ("linear", "smooth")

#: The frame at which a keyframe may sit at most (a day of video at 240 fps is 20.7 M frames).
MAX_FRAME = 100_000_000

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(r"^\s*(\S+?)\s*:\s*\(?\s*(\S+?)\s*\)?\s*$")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Values at keyframes (sorted, unique frames) and how to go between them."""

    keyframes: tuple[tuple[int, float], ...]
    interpolation: str = "linear"

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls(((0, float(value)),))

    @property
    def is_constant(self) -> bool:
        return len({value for _, value in self.keyframes}) == 1

    def at(self, frame: int) -> float:
        """The value at ``frame`` (frames before the first keyframe take its value)."""
        keys = self.keyframes
        if frame <= keys[0][0]:
            return keys[0][1]
        if frame >= keys[-1][0]:
            return keys[-1][1]
        right = next(i for i, (f, _) in enumerate(keys) if f > frame)
        (f0, v0), (f1, v1) = keys[right - 1], keys[right]
        t = (frame - f0) / (f1 - f0)
        if self.interpolation == "linear":
            return v0 + (v1 - v0) * t
        h = f1 - f0
        m0, m1 = self._slope(right - 1), self._slope(right)
        t2, t3 = t * t, t * t * t
        return ((2 * t3 - 3 * t2 + 1) * v0 + (t3 - 2 * t2 + t) * h * m0
                + (-2 * t3 + 3 * t2) * v1 + (t3 - t2) * h * m1)

    def _slope(self, index: int) -> float:
        """Fritsch-Carlson tangent at keyframe ``index``: zero at extremes and at the ends,
        a harmonic mean of the neighbouring secants elsewhere (no overshoot)."""
        keys = self.keyframes
        if index == 0 or index == len(keys) - 1:
            return 0.0
        (fa, va), (fb, vb), (fc, vc) = keys[index - 1], keys[index], keys[index + 1]
        left, right = (vb - va) / (fb - fa), (vc - vb) / (fc - fb)
        if left * right <= 0:
            return 0.0
        wl, wr = 2 * (fc - fb) + (fb - fa), (fc - fb) + 2 * (fb - fa)
        return (wl + wr) / (wl / left + wr / right)

    def to_json(self) -> float | dict[str, Any]:
        """A number for a constant; else ``{"0": v, "120": w, "interpolation": ...}``."""
        if len(self.keyframes) == 1:
            return self.keyframes[0][1]
        data: dict[str, Any] = {str(frame): value for frame, value in self.keyframes}
        data["interpolation"] = self.interpolation
        return data

    def values_between(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes (monotone: at keyframes)."""
        values = [value for _, value in self.keyframes]
        return min(values), max(values)


def _number(text: Any, where: str) -> float:
    if isinstance(text, bool):
        raise ConfigError(f"{where}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str) and re.fullmatch(_NUMBER, text.strip()):
        value = float(text)
    else:
        raise ConfigError(f"{where}: expected a number, got {text!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {text!r}")
    return value


def _frame(text: Any, where: str) -> int:
    if isinstance(text, bool):
        raise ConfigError(f"{where}: expected a frame number, got {text!r}")
    if isinstance(text, str) and re.fullmatch(r"\s*[-+]?\d+\s*", text):
        text = int(text)
    if not isinstance(text, int):
        raise ConfigError(f"{where}: expected a frame number (an integer), got {text!r}")
    if text < 0:
        raise ConfigError(f"{where}: frame {text} is negative; keyframes start at frame 0")
    if text > MAX_FRAME:
        raise ConfigError(f"{where}: frame {text} is beyond {MAX_FRAME}")
    return text


def _build(pairs: list[tuple[int, float]], interpolation: str, where: str) -> Schedule:
    if not pairs:
        raise ConfigError(f"{where}: no keyframes")
    frames = [frame for frame, _ in pairs]
    duplicates = sorted({frame for frame in frames if frames.count(frame) > 1})
    if duplicates:
        raise ConfigError(f"{where}: frame {duplicates[0]} is given twice")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"{where}: interpolation: unknown value {interpolation!r}; choose "
                          f"one of {', '.join(INTERPOLATIONS)}")
    return Schedule(tuple(sorted(pairs)), interpolation)


def parse_schedule(value: Any, where: str) -> Schedule:
    """A schedule from a number, a mapping or a string; ``where`` names it in errors."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, Mapping):
        interpolation = value.get("interpolation", "linear")
        pairs = [(_frame(key, f"{where}: key {key!r}"), _number(item, f"{where}: frame {key}"))
                 for key, item in value.items() if key != "interpolation"]
        return _build(pairs, interpolation, where)
    if isinstance(value, str):
        text = value.strip()
        interpolation = "linear"
        head, _, rest = text.partition(" ")
        if head in INTERPOLATIONS and rest:
            interpolation, text = head, rest
        if ":" not in text:
            return Schedule.constant(_number(text, where))
        pairs = []
        for part in text.split(","):
            match = _PAIR.match(part)
            if not match:
                raise ConfigError(f"{where}: expected FRAME:VALUE, got {part.strip()!r}")
            pairs.append((_frame(match[1], where), _number(match[2], f"{where}: frame "
                                                                     f"{match[1]}")))
        return _build(pairs, interpolation, where)
    return Schedule.constant(_number(value, where))


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a scheduled parameter may be: its range and whether it is a whole number."""

    low: float
    high: float
    integer: bool = False
    #: True: ``low`` itself is not allowed (a zoom of 0).
    open_low: bool = False


def check_bounds(schedule: Schedule, bounds: Bounds, where: str) -> Schedule:
    low, high = schedule.values_between()
    below = low <= bounds.low if bounds.open_low else low < bounds.low
    if below or high > bounds.high:
        side = "above" if bounds.open_low else "at least"
        raise ConfigError(f"{where}: values must be {side} {bounds.low:g} and at most "
                          f"{bounds.high:g}, got {low:g}..{high:g}")
    if bounds.integer and any(value != int(value) for _, value in schedule.keyframes):
        raise ConfigError(f"{where}: expected whole numbers at the keyframes")
    return schedule


def parse_schedules(data: Mapping[str, Any], known: Mapping[str, Bounds], source: str
                    ) -> dict[str, Schedule]:
    """Every entry of ``data`` as a checked schedule; unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of parameter: schedule")
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {', '.join(known)}")
    return {key: check_bounds(parse_schedule(value, f"{source}: {key}"), known[key],
                              f"{source}: {key}") for key, value in data.items()}


# Scheduled parameters and their ranges, here (no heavy import) so that a job config can be
# checked without loading JAX; common, animate and video take them from here.

#: Dream parameters that may change from frame to frame.
DREAM_KEYS: dict[str, Bounds] = {
    "step_size": Bounds(0.0, 1000.0, open_low=True),
    "steps": Bounds(1, 10_000, integer=True),
    "jitter": Bounds(0, 4096, integer=True),
}

#: Motion parameters of an animation, per second.
MOTION_KEYS: dict[str, Bounds] = {
    "zoom": Bounds(0.0, 100.0, open_low=True),
    "angle": Bounds(-36_000.0, 36_000.0),
    "translate_x": Bounds(-100_000.0, 100_000.0),
    "translate_y": Bounds(-100_000.0, 100_000.0),
}

#: Video parameters.
VIDEO_KEYS: dict[str, Bounds] = {"blend": Bounds(0.0, 1.0)}
