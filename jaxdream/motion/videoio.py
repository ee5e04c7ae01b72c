"""Video in and out through PyAV, whose wheels carry FFmpeg (libx264, AAC): no system ffmpeg.

Reading checks a clip completely before anything is rendered (:func:`probe_video` decodes
every frame once), so a truncated, empty or absurd file fails with one line and leaves nothing
behind. Writing goes to a hidden temporary file beside the destination that is renamed over it
when complete: a reader never sees a half-written mp4 or GIF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from jaxdream.errors import ImageError
from jaxdream.files import atomic_path as _atomic
from jaxdream.images import DEFAULT_MAX_PIXELS

#: Frame rates outside this range are refused (a broken header can claim 0 or 90000 fps).
MIN_FPS, MAX_FPS = 0.1, 1000.0


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: Fraction
    frames: int
    audio: str | None  # the audio codec's name, None without sound

    def describe(self) -> str:
        sound = f", audio {self.audio}" if self.audio else ", no audio"
        return (f"{self.width}x{self.height}, {self.frames} frames at {float(self.fps):g} fps"
                f"{sound}")


def _fail(path: str | os.PathLike[str], reason: str) -> ImageError:
    return ImageError(f"{os.fspath(path)}: {reason}")


def _one_line(error: BaseException) -> str:
    # FFmpeg's errors repeat the file name; its reason alone is what the user needs.
    text = " ".join(str(getattr(error, "strerror", None) or error).split())
    return text[:300] or type(error).__name__


@contextlib.contextmanager
def _open(path: str | os.PathLike[str]) -> Iterator[av.container.InputContainer]:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise _fail(name, "no such file")
    if not os.path.isfile(name):
        raise _fail(name, "not a regular file")
    if os.path.getsize(name) == 0:
        raise _fail(name, "empty file")
    try:
        container = av.open(name, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise _fail(name, f"not a readable video ({_one_line(error)})") from None
    try:
        yield container
    finally:
        container.close()


def probe_video(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> VideoInfo:
    """Checks that ``path`` is a whole, decodable video and describes it.

    The declared size is checked against ``max_pixels`` before a frame is decoded; then every
    frame is decoded (and dropped), so truncation shows now rather than half-way through a
    render.
    """
    name = os.fspath(path)
    with _open(path) as container:
        if not container.streams.video:
            raise _fail(name, "no video frames (no video stream)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise _fail(name, "the video stream declares no picture size")
        if width * height > max_pixels:
            raise _fail(name, f"frames of {width}x{height} are more than {max_pixels} pixels; "
                              f"refused before decoding")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if rate is None or not MIN_FPS <= float(rate) <= MAX_FPS:
            raise _fail(name, f"frame rate {rate} is not usable")
        audio = container.streams.audio[0].codec_context.name if container.streams.audio \
            else None
        count = 0
        try:
            for frame in container.decode(stream):
                if (frame.width, frame.height) != (width, height):
                    raise _fail(name, f"frame {count} is {frame.width}x{frame.height}, not "
                                      f"{width}x{height}; clips that change size are not "
                                      f"supported")
                count += 1
        except av.FFmpegError as error:
            raise _fail(name, f"cannot decode frame {count} ({_one_line(error)})") from None
        declared = stream.frames
        if count == 0:
            raise _fail(name, "the video has no frames")
        if declared and count < declared:
            raise _fail(name, f"truncated: {count} of {declared} frames decode")
    return VideoInfo(name, width, height, Fraction(rate), count, audio)


def read_frames(path: str | os.PathLike[str], start: int = 0) -> Iterator[np.ndarray]:
    """Frames ``start``, ``start + 1``, ... of a clip checked by :func:`probe_video`, as
    H x W x 3 uint8 RGB arrays."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index >= start:
                    yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise _fail(path, f"cannot decode ({_one_line(error)})") from None


def even(image: np.ndarray) -> np.ndarray:
    """Crops a row and a column if needed: H.264 in yuv420p needs even sides."""
    height, width = image.shape[:2]
    return image[:height - height % 2, :width - width % 2]


def write_mp4(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: Fraction | float,
              *, audio_from: str | os.PathLike[str] | None = None, crf: int = 18) -> int:
    """Encodes uint8 RGB frames as H.264 (yuv420p, even sides) into ``path`` atomically, with
    the first audio stream of ``audio_from`` copied packet for packet (re-encoded as AAC only
    when mp4 cannot hold its codec).

    Returns the number of frames written.
    """
    rate = Fraction(fps).limit_denominator(100_000)
    count = 0
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(_atomic(path))
            out = stack.enter_context(av.open(tmp, mode="w", format="mp4"))
            video = out.add_stream("libx264", rate=rate)
            video.pix_fmt = "yuv420p"
            video.options = {"crf": str(crf), "preset": "medium"}
            # Every stream must exist before the first packet is written (the header).
            sound = None
            if audio_from is not None:
                source = stack.enter_context(_open(audio_from))
                if source.streams.audio:
                    stream = source.streams.audio[0]
                    sound = (source, stream, _audio_stream(out, stream))
            for image in frames:
                image = even(np.ascontiguousarray(image, np.uint8))
                if count == 0:
                    video.height, video.width = image.shape[:2]
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = count
                out.mux(video.encode(frame))
                count += 1
            if count == 0:
                raise _fail(path, "no frames to write")
            out.mux(video.encode(None))
            if sound is not None:
                _copy_audio(*sound, out)
    except av.FFmpegError as error:
        raise _fail(path, f"cannot write the video ({_one_line(error)})") from None
    except OSError as error:
        raise _fail(path, f"cannot write ({error.strerror or error})") from None
    return count


def _audio_stream(out: av.container.OutputContainer, stream: av.audio.stream.AudioStream
                  ) -> av.stream.Stream:
    """The output's audio stream: a copy of the input's when mp4 can hold its codec (almost
    always: AAC, MP3, Opus, FLAC, PCM), else a new AAC stream (old AVI sound: 8-bit PCM,
    ADPCM, WMA) into which the sound is re-encoded."""
    if stream.codec_context.name in out.supported_codecs:
        return out.add_stream_from_template(stream)
    return out.add_stream("aac", rate=stream.codec_context.sample_rate or 44100)


def _copy_audio(source: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                target: av.stream.Stream, out: av.container.OutputContainer) -> None:
    if target.codec_context.name == "aac" and stream.codec_context.name != "aac":
        resampler = av.AudioResampler(format="fltp", layout=target.codec_context.layout,
                                      rate=target.codec_context.sample_rate)
        for frame in source.decode(stream):
            for chunk in resampler.resample(frame):
                out.mux(target.encode(chunk))
        for chunk in resampler.resample(None):
            out.mux(target.encode(chunk))
        out.mux(target.encode(None))
        return
    for packet in source.demux(stream):
        if packet.dts is None:  # the flushing packet demux ends with
            continue
        packet.stream = target
        out.mux(packet)


def write_gif(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: float) -> int:
    """An endlessly looping GIF, atomically; each frame gets its own 256-colour palette
    (Pillow's median cut), which keeps dreams' colours far better than one fixed palette."""
    images = [Image.fromarray(np.ascontiguousarray(image, np.uint8)) for image in frames]
    if not images:
        raise _fail(path, "no frames to write")
    duration = max(20, round(1000 / fps / 10) * 10)  # GIF delays are in 1/100 s
    try:
        with _atomic(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=duration, loop=0, optimize=False)
    except OSError as error:
        raise _fail(path, f"cannot write ({error.strerror or error})") from None
    return len(images)


def frame_name(index: int) -> str:
    return f"frame_{index:06d}.png"


def frame_paths(folder: Path, count: int) -> list[Path]:
    return [folder / frame_name(index) for index in range(count)]
