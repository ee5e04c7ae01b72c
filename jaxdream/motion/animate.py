"""The feedback zoom of the original notebook: dream a frame, zoom / turn / move it a little,
dream the result again.

Motion is given per second (a zoom of 1.25 grows the picture by a quarter each second, an angle
of 6 turns it 6 degrees a second, translations are pixels a second) and divided among the frames
at the clip's frame rate, so a higher fps is smoother, not faster. Every value may be a keyframed
schedule (:mod:`jaxdream.motion.schedules`), keyed by frame number.

Frames of one stream depend on each other, so throughput comes from streams:
:func:`animate_streams` advances several animations (other photos, seeds or settings) together,
one frame of each per engine call, through one compiled program when their sizes and static
settings agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdream import __version__
from jaxdream.motion.common import DreamSchedules, Engines, first_missing, load_frame, \
    prepare_folder, write_frame
from jaxdream.motion.flow import per_frame, transform, zoom_matrix
from jaxdream.motion.schedules import MOTION_KEYS, Schedule

MOTION_DEFAULTS = {"zoom": 1.25, "angle": 0.0, "translate_x": 0.0, "translate_y": 0.0}

DEFAULT_FRAMES, DEFAULT_FPS = 48, 12.0
MAX_FRAMES = 1_000_000


@dataclasses.dataclass(frozen=True)
class Animation:
    """One feedback-zoom clip: what each frame dreams and how the picture moves."""

    dream: DreamSchedules
    frames: int = DEFAULT_FRAMES
    fps: float = DEFAULT_FPS
    #: Schedules of MOTION_KEYS entries (per second); missing ones take MOTION_DEFAULTS.
    motion: Mapping[str, Schedule] = dataclasses.field(default_factory=dict)

    def motion_at(self, frame: int) -> dict[str, float]:
        """Frame ``frame``'s own share of the motion (what moves frame-1 into frame)."""
        values = {key: (self.motion[key].at(frame) if key in self.motion
                        else MOTION_DEFAULTS[key]) for key in MOTION_KEYS}
        zoom, angle, x, y = per_frame(values["zoom"], values["angle"], values["translate_x"],
                                      values["translate_y"], self.fps)
        return {"zoom": zoom, "angle": angle, "translate_x": x, "translate_y": y}

    def identity(self, input_sha256: str, weights_sha256: str) -> dict[str, Any]:
        """What decides the frames' pixels (the frame count does not: a clip may grow)."""
        return {"kind": "animate", "jaxdream": __version__, "input_sha256": input_sha256,
                "recipe": self.dream.recipe.to_json(weights_sha256=weights_sha256),
                **self.dream.to_json(), "fps": self.fps,
                "motion": {key: s.to_json() for key, s in self.motion.items()}}


@dataclasses.dataclass
class Stream:
    """An animation being rendered: its start image and its frame folder."""

    animation: Animation
    image: np.ndarray  # the input photo, H x W x 3, 0..255
    folder: Path
    input_name: str
    input_sha256: str
    next_frame: int = 0
    previous: np.ndarray | None = None


@dataclasses.dataclass
class AnimateReport:
    rendered: int
    skipped: int
    seconds_per_frame: list[float]
    compile: str


def open_stream(animation: Animation, image: np.ndarray, folder: Path, input_name: str,
                input_bytes: bytes, weights_sha256: str, overwrite: bool = False) -> Stream:
    """Prepares ``folder`` (or checks the frames already in it) and finds where to resume."""
    digest = hashlib.sha256(input_bytes).hexdigest()
    identity = animation.identity(digest, weights_sha256)
    prepare_folder(folder, identity, {"frames": animation.frames, "input": input_name},
                   overwrite)
    stream = Stream(animation, image.astype(np.float32), folder, input_name, digest)
    stream.next_frame = first_missing(folder, animation.frames)
    if 0 < stream.next_frame < animation.frames:
        stream.previous = load_frame(folder, stream.next_frame - 1)
    return stream


def _start_image(stream: Stream) -> tuple[np.ndarray, dict[str, float]]:
    frame = stream.next_frame
    if frame == 0 or stream.previous is None:
        return stream.image, {"zoom": 1.0, "angle": 0.0, "translate_x": 0.0,
                              "translate_y": 0.0}
    moves = stream.animation.motion_at(frame)
    height, width = stream.previous.shape[:2]
    matrix = zoom_matrix(height, width, moves["zoom"], moves["angle"], moves["translate_x"],
                         moves["translate_y"])
    return transform(stream.previous, matrix), moves


def animate_streams(streams: Sequence[Stream], engines: Engines, *,
                    on_frame: Callable[[Stream, int, Path], None] | None = None
                    ) -> AnimateReport:
    """Renders every stream to its last frame, one frame of each stream per engine call.

    Each frame is written (atomically, with its recipe) before the next one is dreamed.
    """
    import time

    skipped = sum(stream.next_frame for stream in streams)
    rendered = 0
    seconds: list[float] = []
    while True:
        active = [s for s in streams if s.next_frame < s.animation.frames]
        if not active:
            break
        begin = time.perf_counter()
        starts, recipes, moves = [], [], []
        for stream in active:
            start, move = _start_image(stream)
            starts.append(start)
            moves.append(move)
            recipes.append(stream.animation.dream.at(stream.next_frame))
        dreamed = engines.render(starts, recipes)
        for stream, image, recipe, move in zip(active, dreamed, recipes, moves, strict=True):
            frame = stream.next_frame
            path = write_frame(stream.folder, frame, image, recipe, engines.model, {
                "input": {"name": stream.input_name, "sha256": stream.input_sha256,
                          "width": int(image.shape[1]), "height": int(image.shape[0])},
                "motion": {"kind": "animate", "fps": stream.animation.fps, **move}})
            # The next frame grows from what was saved (rounded to 8 bits), so a resumed
            # render continues exactly as an uninterrupted one would.
            stream.previous = np.rint(np.clip(image, 0, 255)).astype(np.float32)
            stream.next_frame += 1
            rendered += 1
            if on_frame is not None:
                on_frame(stream, frame, path)
        seconds.append((time.perf_counter() - begin) / len(active))
    return AnimateReport(rendered, skipped, seconds, engines.stats())


def progress_printer(total: int) -> Callable[[Stream, int, Path], None]:
    """A one-line-per-frame report on stderr (frames take seconds each, a bar adds little)."""
    done = [0]

    def report(stream: Stream, frame: int, path: Path) -> None:
        done[0] += 1
        print(f"frame {frame + 1}/{stream.animation.frames}: {path}  [{done[0]}/{total}]",
              file=sys.stderr)

    return report


def motion_schedules(values: Mapping[str, Any], source: str) -> dict[str, Schedule]:
    from jaxdream.motion.schedules import parse_schedules

    return parse_schedules(values, MOTION_KEYS, source)
