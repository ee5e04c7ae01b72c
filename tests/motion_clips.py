"""Synthetic clips for the motion tests: a textured square moving over a textured background,
with a sine tone, written by PyAV (nothing downloaded)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 22050


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, (height // 4 + 1, width // 4 + 1, 3))
    return np.kron(coarse, np.ones((4, 4, 1)))[:height, :width]


def clip_frames(count: int, height: int = 48, width: int = 64, side: int = 20,
                cut_at: int | None = None) -> list[np.ndarray]:
    """Frames of a square sliding right and down by 2 pixels a frame; from ``cut_at`` on, an
    unrelated scene (another background, no square)."""
    background = _texture(height, width, 1)
    square = _texture(side, side, 2)[..., ::-1]
    other = _texture(height, width, 3)[::-1]
    frames = []
    for t in range(count):
        if cut_at is not None and t >= cut_at:
            frames.append(np.roll(other, t, axis=1).astype(np.uint8))
            continue
        frame = background.copy()
        y, x = 4 + t, 4 + 2 * t
        frame[y % (height - side):][:side, x % (width - side):][:, :side] = square
        frames.append(frame.astype(np.uint8))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 12, audio: bool = True) -> None:
    """An mp4 of ``frames`` (H.264) with, if ``audio``, an AAC sine tone as long as the clip."""
    with av.open(str(path), mode="w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "10"}
        sound = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if audio else None
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            samples = int(SAMPLE_RATE * len(frames) / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / SAMPLE_RATE))
            for start in range(0, samples, 1024):
                chunk = tone[start:start + 1024].astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = SAMPLE_RATE
                frame.pts = start
                frame.time_base = Fraction(1, SAMPLE_RATE)
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return []
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
