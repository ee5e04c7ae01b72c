"""Every frame of a clip dreamed, coherently.

Frame t's dream starts from ``raw[t] + blend * mask * warp(detail[t-1])``, where ``detail[t-1]``
is what the dream added to frame t-1 (dreamed minus raw), ``warp`` carries it along the optical
flow from frame t-1 to t, and ``mask`` drops it where the flow is not trusted (occlusions, a
scene cut). ``independent`` dreams each frame on its own, for comparison.

Dreams run at the recipe's ``max_side``; the detail is then scaled up onto the full-size frame,
so the output keeps the input's size and frame rate.

**Segments.** A clip can be cut into segments rendered as parallel streams (one frame of each
per engine call here, or one segment per worker on a cluster): a segment starts ``warmup``
frames before its first frame and throws those away, so the carried detail has settled by the
time its frames are kept. :func:`plan_segments` and :func:`render_segments` are pure of any
cluster; a Ray task can call :func:`render_segments` with one segment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from jaxdream import __version__
from jaxdream.errors import ImageError
from jaxdream.images import _fit_longer_side
from jaxdream.motion.common import DreamSchedules, Engines, first_missing, load_frame, \
    write_frame
from jaxdream.motion.flow import Flicker, carried_start, flicker, motion_between, \
    pair_change
from jaxdream.motion.schedules import VIDEO_KEYS, Schedule
from jaxdream.recipe import Recipe
from jaxdream.motion.videoio import VideoInfo, frame_name, read_frames

DEFAULT_BLEND = 0.8
DEFAULT_REFRESH = 0.3


@dataclasses.dataclass(frozen=True)
class VideoDream:
    dream: DreamSchedules
    #: How much of the previous frame's carried detail frame t starts from (a schedule).
    blend: Schedule = Schedule.constant(DEFAULT_BLEND)
    independent: bool = False
    #: False: carry the detail in place, without optical flow (plain blending).
    use_flow: bool = True
    #: Step size factor for frames that start from carried detail. Most of the flicker of
    #: frame-by-frame dreams is the fresh detail each frame grows with its own jitter; with
    #: the detail carried, a frame only needs to refresh it. Measured on the test clip
    #: (128x96, block3): blend 0.8 with refresh 0.3 kept the detail as strong as independent
    #: frames (mean |dream - raw| 4.3 against 4.6) with 0.6x their flicker.
    refresh: float = DEFAULT_REFRESH

    def carried_recipe(self, frame: int) -> Recipe:
        recipe = self.dream.at(frame)
        return dataclasses.replace(recipe, step_size=recipe.step_size * self.refresh)

    def identity(self, info: VideoInfo, input_sha256: str, weights_sha256: str
                 ) -> dict[str, Any]:
        return {"kind": "video", "jaxdream": __version__, "input_sha256": input_sha256,
                "size": [info.width, info.height], "fps": str(info.fps),
                "recipe": self.dream.recipe.to_json(weights_sha256=weights_sha256),
                **self.dream.to_json(), "blend": self.blend.to_json(),
                "independent": self.independent, "use_flow": self.use_flow,
                "refresh": self.refresh}


def dream_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) the frames are dreamed at: the input's, or fitted into max_side."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    return _fit_longer_side(width, height, max_side)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return np.asarray(image, np.float32)
    shrink = size[0] < image.shape[1]
    return cv2.resize(np.asarray(image, np.float32), size,
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclasses.dataclass(frozen=True)
class Segment:
    first: int  # first frame kept
    end: int  # one past the last frame kept
    warm: int  # first frame dreamed (first - warm-up, at least 0)


def plan_segments(frames: int, segments: int, warmup: int) -> list[Segment]:
    """``segments`` nearly equal runs of frames, each dreamed from ``warmup`` frames early."""
    segments = max(1, min(segments, frames))
    bounds = [round(i * frames / segments) for i in range(segments + 1)]
    return [Segment(a, b, max(0, a - warmup)) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclasses.dataclass
class _Run:
    """A segment being rendered: its frame reader and what it carries from frame to frame."""

    segment: Segment
    frames: Iterator[np.ndarray]
    next_frame: int
    raw: np.ndarray | None = None  # previous raw frame at the dream size
    detail: np.ndarray | None = None  # previous dream detail at the dream size


def _open_run(segment: Segment, info: VideoInfo, size: tuple[int, int], folder: Path,
              video: VideoDream) -> _Run | None:
    """Where a segment resumes: its first missing frame, carrying the saved frame before it
    (no warm-up needed), or its warm-up start when none of it is saved."""
    missing = first_missing(folder, segment.end, segment.first)
    if missing >= segment.end:
        return None
    if video.independent:
        return _Run(segment, read_frames(info.path, missing), missing)
    # Inside a segment the saved frame before the gap carries on; at a segment's start the
    # warm-up does, even when the previous segment is already saved, so that a segment's
    # frames never depend on which worker finished first.
    if missing == 0 or (missing > segment.first
                        and (folder / frame_name(missing - 1)).exists()):
        start = max(missing - 1, 0)
        frames = read_frames(info.path, start)
        run = _Run(segment, frames, missing)
        if missing > 0:
            first = next(frames, None)
            if first is None:
                raise ImageError(f"{info.path}: frame {missing - 1} is missing")
            run.raw = _resize(first, size)
            run.detail = _resize(load_frame(folder, missing - 1), size) - run.raw
        return run
    return _Run(segment, read_frames(info.path, segment.warm), segment.warm)


@dataclasses.dataclass
class VideoReport:
    rendered: int
    skipped: int
    seconds_per_frame: list[float]
    compile: str
    cuts: list[int]


def render_segments(info: VideoInfo, segments: Sequence[Segment], video: VideoDream,
                    engines: Engines, folder: Path, input_sha256: str, *,
                    on_frame: Callable[[int, Path], None] | None = None) -> VideoReport:
    """Dreams the frames of ``segments`` into ``folder``, one frame of each segment per
    engine call; frames already saved are kept, and the render continues after them."""
    size = dream_size(info.width, info.height, video.dream.recipe.max_side)
    runs = [run for s in segments if (run := _open_run(s, info, size, folder, video))]
    # Frames kept that are already there (a run may start in its warm-up, before its first).
    skipped = sum(s.end - s.first for s in segments) - sum(
        r.segment.end - max(r.next_frame, r.segment.first) for r in runs)
    rendered, seconds, cuts = 0, [], []
    while runs:
        begin = time.perf_counter()
        fulls, raws, starts, recipes = [], [], [], []
        for run in runs:
            frame = next(run.frames, None)
            if frame is None:  # the file changed since it was checked
                raise ImageError(f"{info.path}: frame {run.next_frame} is missing")
            full = frame.astype(np.float32)
            raw = _resize(full, size)
            t = run.next_frame
            start, recipe = raw, video.dream.at(t)
            if not video.independent and run.detail is not None and run.raw is not None:
                motion = motion_between(run.raw, raw) if video.use_flow else None
                if motion is not None and motion.is_cut:
                    if t >= run.segment.first:
                        cuts.append(t)
                else:
                    start = carried_start(raw, run.detail, motion, video.blend.at(t))
                    recipe = video.carried_recipe(t)
            fulls.append(full)
            raws.append(raw)
            starts.append(start)
            recipes.append(recipe)
        dreamed = engines.render(starts, recipes)
        kept = 0
        for run, full, raw, image, recipe in zip(runs, fulls, raws, dreamed, recipes,
                                                 strict=True):
            t = run.next_frame
            output = image if full.shape == raw.shape else np.clip(
                full + _resize(image - raw, (info.width, info.height)), 0, 255)
            # Carry what a saved frame holds (8 bits), warm-up frames too: a resumed render
            # then continues as the whole one did, and a segment warming up from frame 0
            # dreams exactly the frames of one stream.
            run.raw = raw
            run.detail = _resize(np.rint(np.clip(output, 0, 255)), size) - raw
            if t >= run.segment.first:
                path = write_frame(folder, t, output, recipe, engines.model, {
                    "input": {"name": Path(info.path).name, "sha256": input_sha256,
                              "width": info.width, "height": info.height},
                    "motion": {"kind": "independent" if video.independent else "video",
                               "blend": video.blend.at(t), "use_flow": video.use_flow}})
                rendered += 1
                kept += 1
                if on_frame is not None:
                    on_frame(t, path)
            run.next_frame += 1
        runs = [run for run in runs if run.next_frame < run.segment.end]
        seconds.append((time.perf_counter() - begin) / max(kept, 1))
    return VideoReport(rendered, skipped, seconds, engines.stats(), sorted(set(cuts)))


def _pairs_source(info: VideoInfo, folder: Path, max_side: int
                  ) -> tuple[Iterator[np.ndarray], Iterator[np.ndarray]]:
    size = dream_size(info.width, info.height, max_side)
    inputs = (_resize(frame, size) for frame in read_frames(info.path))
    outputs = (_resize(load_frame(folder, t), size) for t in range(info.frames))
    return outputs, inputs


def clip_flicker(info: VideoInfo, folder: Path, max_side: int = 256) -> Flicker:
    """The flicker metric of the rendered frames against the input (both shrunk so the longer
    side is at most ``max_side``: flow on full-size frames would cost more than it tells)."""
    return flicker(*_pairs_source(info, folder, max_side))


def joint_flicker(info: VideoInfo, folder: Path, segments: Sequence[Segment],
                  max_side: int = 256) -> tuple[float, float]:
    """Output flicker across segment joints, and across every other pair of frames."""
    joints = {s.first for s in segments if s.first > 0}
    at_joints, elsewhere = [], []
    previous = None
    for t, pair in enumerate(zip(*_pairs_source(info, folder, max_side), strict=True)):
        if previous is not None:
            change, _ = pair_change((previous[0], pair[0]), (previous[1], pair[1]))
            (at_joints if t in joints else elsewhere).append(change)
        previous = pair
    return float(np.mean(at_joints)) if at_joints else 0.0, float(np.mean(elsewhere))
