"""Optical flow, warps, occlusion masks, the feedback-zoom transform and the flicker metric.

Flow is OpenCV's DIS (Kroeger et al. 2016), a well-kept dense flow that runs at video rates on
a CPU. Images here are H x W x 3 float32 arrays on the 0..255 scale (numpy, not JAX: this is
per-frame bookkeeping around the compiled dream, not part of it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import cv2
import numpy as np

#: Forward-backward consistency (Sundaram et al. 2010, as used by Ruder et al. for video style
#: transfer): a pixel is trusted when |fw(p + bw(p)) + bw(p)|^2 <= ALPHA (|fw|^2 + |bw|^2) + BETA.
ALPHA, BETA = 0.01, 0.5
#: Pixels whose colour after warping differs by more than this (0..255, mean over channels)
#: are not trusted either: it catches what the flow cannot explain (lighting, cuts).
PHOTOMETRIC = 24.0
#: Below this share of trusted pixels, a frame is a new scene and its dream starts afresh.
SCENE_CUT = 0.25


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Flow ``f`` (H x W x 2, x then y) such that ``target[p] ~ source[p + f(p)]``.

    That is the *backward* flow of the motion from ``source`` to ``target``: it says where
    each target pixel came from, which is what :func:`warp` needs.
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_gray(target), _gray(source), None)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return xs, ys


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``out[p] = image[p + flow(p)]``, bilinear, edges replicated."""
    xs, ys = _grid(*flow.shape[:2])
    return cv2.remap(np.ascontiguousarray(image, np.float32), xs + flow[..., 0],
                     ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def consistency_mask(back: np.ndarray, forth: np.ndarray) -> np.ndarray:
    """Trust in [0, 1] per pixel of the later frame, from its flow ``back`` (later to earlier)
    and the earlier frame's flow ``forth`` (earlier to later).

    1 where following ``back`` and then ``forth`` returns to the start; fading to 0 where it
    does not (occluded or disoccluded: something moved apart) or where ``back`` leaves the
    frame. The fade is soft so that carried detail has no hard seams.
    """
    height, width = back.shape[:2]
    forth_there = warp(forth, back)
    error = np.sum((back + forth_there) ** 2, axis=-1)
    allowed = ALPHA * (np.sum(back ** 2, -1) + np.sum(forth_there ** 2, -1)) + BETA
    mask = np.clip(2.0 - error / allowed, 0.0, 1.0)  # 1 up to the threshold, 0 from twice it
    xs, ys = _grid(height, width)
    x, y = xs + back[..., 0], ys + back[..., 1]
    mask[(x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)] = 0.0
    return mask.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Motion:
    """How frame t-1 of a clip moves into frame t."""

    back: np.ndarray  # H x W x 2: where each pixel of frame t was in frame t-1
    mask: np.ndarray  # H x W in [0, 1]: how far to trust that

    @property
    def trusted(self) -> float:
        return float(self.mask.mean())

    @property
    def is_cut(self) -> bool:
        return self.trusted < SCENE_CUT


def motion_between(previous: np.ndarray, current: np.ndarray) -> Motion:
    """Flow both ways between two raw frames and the resulting trust mask (occlusions and
    colour changes the flow cannot explain fade to 0, softened by a small blur)."""
    back = optical_flow(previous, current)
    forth = optical_flow(current, previous)
    mask = consistency_mask(back, forth)
    colour = np.abs(warp(previous, back) - current).mean(axis=-1)
    mask *= np.clip(2.0 - colour / PHOTOMETRIC, 0.0, 1.0)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.5)
    return Motion(back, mask)


def carried_start(raw: np.ndarray, previous_detail: np.ndarray, motion: Motion | None,
                  blend: float) -> np.ndarray:
    """Where frame t's dream starts: ``raw + blend * mask * warp(detail of t-1)``.

    Without motion (``None``: no flow wanted) the detail is blended in place, as
    pytorch-deepdream does; on a scene cut the dream starts from the raw frame.
    """
    if motion is None:
        carried = previous_detail
    elif motion.is_cut:
        return raw.astype(np.float32)
    else:
        carried = warp(previous_detail, motion.back) * motion.mask[..., None]
    return np.clip(raw + blend * carried, 0.0, 255.0).astype(np.float32)


def zoom_matrix(height: int, width: int, zoom: float, angle: float, shift_x: float,
                shift_y: float) -> np.ndarray:
    """The 2 x 3 affine that zooms by ``zoom`` and turns by ``angle`` degrees (counter-
    clockwise) about the centre, then moves the picture by (shift_x, shift_y) pixels."""
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, zoom)
    matrix[0, 2] += shift_x
    matrix[1, 2] += shift_y
    return matrix


def transform(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Applies :func:`zoom_matrix`'s affine, bilinear, mirroring at the borders (a zoom out
    or a turn shows the picture continued rather than a black edge)."""
    height, width = image.shape[:2]
    return cv2.warpAffine(np.ascontiguousarray(image, np.float32), matrix, (width, height),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def per_frame(zoom: float, angle: float, shift_x: float, shift_y: float, fps: float
              ) -> tuple[float, float, float, float]:
    """Motion given per second, as one frame's share at ``fps``: changing the frame rate
    changes smoothness, not speed."""
    return zoom ** (1.0 / fps), angle / fps, shift_x / fps, shift_y / fps


@dataclasses.dataclass(frozen=True)
class Flicker:
    """Mean absolute change between consecutive frames once the input's motion is undone."""

    output: float
    input: float

    @property
    def ratio(self) -> float:
        return self.output / self.input if self.input > 0 else math.inf

    def describe(self) -> str:
        return (f"flicker {self.output:.2f} (input {self.input:.2f}, {self.ratio:.2f}x), mean "
                f"|frame t - frame t-1 moved along the input's flow| on 0..255")


def pair_change(outputs: tuple[np.ndarray, np.ndarray], inputs: tuple[np.ndarray, np.ndarray]
                ) -> tuple[float, float]:
    """For one consecutive pair: the trusted-pixel mean of |out[t] - warp(out[t-1])| with the
    flow of the *input*, and the same for the input itself."""
    motion = motion_between(inputs[0], inputs[1])
    weight = motion.mask[..., None]
    total = float(weight.sum()) * 3 + 1e-6
    changes = []
    for earlier, later in (outputs, inputs):
        moved = warp(np.asarray(earlier, np.float32), motion.back)
        changes.append(float((np.abs(np.asarray(later, np.float32) - moved) * weight).sum())
                       / total)
    return changes[0], changes[1]


def flicker(outputs: Iterable[np.ndarray], inputs: Iterable[np.ndarray]) -> Flicker:
    """The flicker metric: :func:`pair_change` averaged over consecutive pairs. What remains
    for the input is what its flow cannot explain (noise, lighting); a dream that moves with
    its input adds little to that.

    ``outputs`` and ``inputs`` are equally long, of one size (dreams at the input's size);
    they are read once, two frames at a time.
    """
    changes_out, changes_in = [], []
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for out, raw in zip(outputs, inputs, strict=True):
        if previous is not None:
            d_out, d_in = pair_change((previous[0], out), (previous[1], raw))
            changes_out.append(d_out)
            changes_in.append(d_in)
        previous = (out, raw)
    if not changes_in:
        raise ValueError("flicker needs two or more frames")
    return Flicker(float(np.mean(changes_out)), float(np.mean(changes_in)))
