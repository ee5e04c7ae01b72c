"""Motion pieces without a network: schedules, flow and masks, the flicker metric, video files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from jaxdream.errors import ConfigError, ImageError
from jaxdream.motion.animate import MOTION_KEYS, Animation
from jaxdream.motion.common import DREAM_KEYS, DreamSchedules
from jaxdream.motion.flow import flicker, motion_between, warp
from jaxdream.motion.schedules import Schedule, parse_schedule, parse_schedules
from jaxdream.motion.video import plan_segments
from jaxdream.motion.videoio import probe_video, read_frames, write_gif, write_mp4
from jaxdream.recipe import PRESETS

from motion_clips import audio_packets, clip_frames, write_clip

KEYS = {**MOTION_KEYS, **DREAM_KEYS}


# ------------------------------------------------------------------------------- schedules
def test_linear_keyframes_interpolate_and_hold_beyond_the_ends() -> None:
    schedule = parse_schedule("10:1.0, 20:2.0, 40:0.0", "zoom")
    assert schedule.interpolation == "linear"
    assert [schedule.at(f) for f in (0, 10, 15, 20, 30, 40, 99)] == [1.0, 1.0, 1.5, 2.0, 1.0,
                                                                      0.0, 0.0]


def test_smooth_keyframes_pass_through_keys_without_overshoot_or_jumps() -> None:
    schedule = parse_schedule("smooth 0:1.0, 10:2.0, 20:2.0, 30:0.5", "zoom")
    assert schedule.interpolation == "smooth"
    values = [schedule.at(f) for f in range(31)]
    assert values[0] == 1.0 and values[10] == 2.0 and values[20] == 2.0 and values[30] == 0.5
    assert max(values) <= 2.0 and min(values) >= 0.5, "a monotone cubic never overshoots"
    assert all(v == pytest.approx(2.0) for v in values[10:21]), "a flat stretch stays flat"
    velocity = np.diff(values)
    linear = np.diff([parse_schedule("0:1.0, 10:2.0, 20:2.0, 30:0.5", "z").at(f)
                      for f in range(31)])
    for key in (10, 20):  # the change of speed across a keyframe: no jolt
        assert abs(velocity[key] - velocity[key - 1]) < 0.05
        assert abs(linear[key] - linear[key - 1]) >= 0.1
    linear = parse_schedule("0:1.0, 10:2.0", "zoom")
    assert parse_schedule("smooth 0:1.0, 10:2.0", "zoom").at(2) < linear.at(2), "eases in"


def test_schedules_read_the_same_from_yaml_the_command_line_deforum_and_json() -> None:
    from_yaml = parse_schedule(yaml.safe_load("{0: 1.04, 120: 1.01}"), "zoom")
    from_cli = parse_schedule("0:1.04,120:1.01", "zoom")
    deforum = parse_schedule("0:(1.04), 120:(1.01)", "zoom")
    assert from_yaml == from_cli == deforum
    assert parse_schedule(from_cli.to_json(), "zoom") == from_cli
    smooth = parse_schedule(yaml.safe_load("{0: 1, 60: 3, interpolation: smooth}"), "angle")
    assert smooth.interpolation == "smooth" and parse_schedule(smooth.to_json(), "a") == smooth
    assert parse_schedule(2.5, "angle") == parse_schedule("2.5", "angle") == Schedule.constant(2.5)
    config = yaml.safe_load("zoom: '0:1.2, 24:1.5'\nangle: 3\nsteps: {0: 4, 10: 8}\n")
    parsed = parse_schedules(config, KEYS, "keys.yaml")
    assert parsed["zoom"].at(12) == pytest.approx(1.35) and parsed["steps"].at(5) == 6


@pytest.mark.parametrize(("data", "message"), [
    ({"zooom": 1.1}, "keys.yaml: unknown key(s) ['zooom']"),
    ({"zoom": {-5: 1.1}}, "keys.yaml: zoom: key -5: frame -5 is negative"),
    ({"zoom": "-5:1.1"}, "frame -5 is negative"),
    ({"zoom": "0:1.1,10:fast"}, "keys.yaml: zoom: frame 10: expected a number, got 'fast'"),
    ({"zoom": {0: "__import__('os')"}}, "expected a number"),
    ({"angle": {0: [1, 2]}}, "expected a number"),
    ({"angle": {0: True}}, "expected a number"),
    ({"angle": "0:nan"}, "expected a number"),
    ({"zoom": {0: 1.1, "later": 2}}, "expected a frame number"),
    ({"zoom": "0:1.1,0:1.2"}, "frame 0 is given twice"),
    ({"zoom": "0 1.1"}, "expected a number"),
    ({"zoom": 0}, "zoom: values must be above 0"),
    ({"steps": "0:2.5"}, "steps: expected whole numbers"),
    ({"zoom": {0: 1, "interpolation": "cubic"}}, "interpolation: unknown value 'cubic'"),
])
def test_bad_schedules_are_one_line_errors_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_schedules(data, KEYS, "keys.yaml")
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_motion_is_per_second_so_fps_changes_smoothness_not_speed() -> None:
    recipe = PRESETS["classic"].with_layers("block3", ["block3"])
    slow, fast = (Animation(DreamSchedules(recipe), frames=48, fps=fps, motion={
        "zoom": Schedule.constant(1.5), "angle": Schedule.constant(12.0)}) for fps in (12, 24))
    zoom_slow = np.prod([slow.motion_at(t)["zoom"] for t in range(1, 13)])
    zoom_fast = np.prod([fast.motion_at(t)["zoom"] for t in range(1, 25)])
    assert zoom_slow == pytest.approx(1.5) and zoom_fast == pytest.approx(1.5)
    assert sum(fast.motion_at(t)["angle"] for t in range(1, 25)) == pytest.approx(12.0)
    assert fast.motion_at(1)["angle"] == pytest.approx(slow.motion_at(1)["angle"] / 2)


def test_dream_values_and_layer_weights_follow_their_schedules_per_frame() -> None:
    recipe = PRESETS["classic"].with_layers("block3:1,block5:1", ["block3", "block5"])
    dream = DreamSchedules(recipe, {"step_size": parse_schedule("0:1,10:2", "s"),
                                    "steps": parse_schedule("0:2,10:4", "n")},
                           {"block5": parse_schedule("0:0,10:5", "w")})
    frame = dream.at(5)
    assert frame.step_size == pytest.approx(1.5) and frame.steps == 3
    assert dict(frame.layers or ()) == {"block3": 1.0, "block5": 2.5}
    assert frame.seed == recipe.seed + 5
    with pytest.raises(ConfigError, match="not among the dream's layers"):
        DreamSchedules(recipe, {}, {"block9": Schedule.constant(1.0)})


# ------------------------------------------------------------------------- flow and flicker
def test_flow_finds_the_motion_and_the_mask_drops_what_was_hidden() -> None:
    frames = [f.astype(np.float32) for f in clip_frames(8, 96, 128, side=40)]
    motion = motion_between(frames[2], frames[4])  # the square moves 4 right, 2 down
    y, x = 4 + 4, 4 + 2 * 4  # its top-left corner in frame 4
    np.testing.assert_allclose(motion.back[y + 20, x + 20], [-4, -2], atol=0.3)
    np.testing.assert_allclose(motion.back[80, 100], [0, 0], atol=0.3)
    moved = warp(frames[2], motion.back)
    trusted = motion.mask > 0.9
    assert np.abs(moved - frames[4]).mean(-1)[trusted].mean() < 4
    assert motion.mask[y + 5:y + 35, x + 5:x + 35].mean() > 0.9, "the square itself is kept"
    assert motion.mask[60:, 60:].mean() > 0.95, "so is the still background"
    # The background the square uncovers on its left was hidden in the earlier frame: no
    # detail may be carried there.
    assert motion.mask[y + 5:y + 35, x - 4:x].mean() < 0.5


def test_a_scene_cut_is_recognised_and_a_still_is_not() -> None:
    frames = [f.astype(np.float32) for f in clip_frames(12, 96, 128, cut_at=6)]
    assert motion_between(frames[5], frames[6]).is_cut
    assert not motion_between(frames[4], frames[5]).is_cut


def test_flicker_is_the_inputs_own_for_the_input_and_grows_with_added_noise() -> None:
    frames = [f.astype(np.float32) for f in clip_frames(6, 96, 128)]
    same = flicker(frames, frames)
    assert same.output == same.input and same.ratio == 1.0
    rng = np.random.default_rng(0)
    noisy = [np.clip(f + rng.normal(0, 10, f.shape), 0, 255) for f in frames]
    assert flicker(noisy, frames).ratio > 1.5
    # A fixed overlay that moves with the picture does not flicker (much).
    overlay = [np.clip(f * 0.8 + 20, 0, 255) for f in frames]
    assert flicker(overlay, frames).ratio < 1.1


def test_segments_cover_every_frame_once_and_start_early_by_the_warm_up() -> None:
    segments = plan_segments(100, 3, 8)
    assert [(s.first, s.end, s.warm) for s in segments] == [(0, 33, 0), (33, 67, 25),
                                                            (67, 100, 59)]
    assert len(plan_segments(2, 5, 8)) == 2


# ------------------------------------------------------------------------------ video files
def test_a_written_video_keeps_frame_count_rate_size_and_audio_bytes(tmp_path: Path) -> None:
    source = tmp_path / "clip.mp4"
    write_clip(source, clip_frames(20, 48, 64), fps=15)
    info = probe_video(source)
    assert (info.width, info.height, info.frames, info.fps, info.audio) == (64, 48, 20, 15,
                                                                            "aac")
    copy = tmp_path / "copy.mp4"
    assert write_mp4(copy, read_frames(source), info.fps, audio_from=source) == 20
    again = probe_video(copy)
    assert (again.width, again.height, again.frames, again.fps) == (64, 48, 20, 15)
    assert audio_packets(copy) == audio_packets(source) and audio_packets(source)
    with av.open(str(copy)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    gif = tmp_path / "clip.gif"
    write_gif(gif, read_frames(source), 15)
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 20 and image.size == (64, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4", "copy.mp4"]


def test_sound_mp4_cannot_hold_is_re_encoded_as_aac_of_the_same_length(tmp_path: Path) -> None:
    source = tmp_path / "old.avi"  # 8-bit PCM sound, as old cameras wrote
    with av.open(str(source), mode="w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream("pcm_u8", rate=8000, layout="mono")
        for index in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), index * 20, np.uint8),
                                               format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        for start in range(0, 8000, 800):
            samples = (128 + 60 * np.sin(np.arange(800) / 5)).astype(np.uint8)[None]
            chunk = av.AudioFrame.from_ndarray(samples, format="u8", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, start
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    assert probe_video(source).audio == "pcm_u8"
    out_path = tmp_path / "new.mp4"
    write_mp4(out_path, read_frames(source), 10, audio_from=source)
    assert probe_video(out_path).audio == "aac"
    with av.open(str(out_path)) as container:
        stream = container.streams.audio[0]
        assert stream.duration is not None
        assert float(stream.duration * stream.time_base) == pytest.approx(1.0, abs=0.15)


def test_odd_sizes_are_cropped_to_even_for_h264(tmp_path: Path) -> None:
    frames = [np.full((31, 45, 3), 100 + i, np.uint8) for i in range(3)]
    write_mp4(tmp_path / "odd.mp4", frames, 10)
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.frames) == (44, 30, 3)


def _zero_frames(path: Path) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        out.start_encoding()  # header and trailer, no frame between


def _truncated(path: Path) -> None:
    write_clip(path, clip_frames(24, 48, 64), fps=12)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _text(path: Path) -> None:
    path.write_text("this is a text file, not a video\n" * 20)


def _declaring(width: int, height: int) -> Callable[[Path], None]:
    # YUV4MPEG2 declares its size in a text header: a huge clip in a few bytes.
    def write(path: Path) -> None:
        path.write_bytes(f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\nFRAME\n"
                         .encode() + bytes(64))

    return write


BROKEN = {"truncated.mp4": _truncated, "empty.mp4": _zero_frames, "notes.mp4": _text,
          "huge.y4m": _declaring(100_000, 100_000), "big.y4m": _declaring(12_000, 12_000),
          "nothing.mp4": lambda path: path.write_bytes(b"")}
REASONS = {"truncated.mp4": "not a readable video", "empty.mp4": "no video frames",
           "notes.mp4": "not a readable video", "huge.y4m": "not a readable video",
           "big.y4m": "12000x12000 are more than 67108864 pixels; refused before decoding",
           "nothing.mp4": "empty file"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_videos_fail_with_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    BROKEN[name](path)
    with pytest.raises(ImageError) as caught:
        probe_video(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and "\n" not in text and len(text) < 200, text
    assert REASONS[name] in text


# ------------------------------------------------------------------------- command line
@pytest.mark.parametrize(("text", "message"), [
    ("zoom: {0: 1.3}\nzoomm: 2\n", "keys.yaml: unknown key(s) ['zoomm']"),
    ("zoom: {-1: 1.3}\n", "keys.yaml: zoom: key -1: frame -1 is negative"),
    ("angle: '0:left'\n", "keys.yaml: angle: frame 0: expected a number, got 'left'"),
    ("layer_weights: {block99: 1}\n", "block99"),
    ("zoom: [1, 2\n", "keys.yaml: not valid YAML"),
    ("- 1\n- 2\n", "keys.yaml: expected a mapping"),
])
def test_bad_keyframe_files_are_one_line_before_anything_is_written(
        tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from jaxdream.cli import main

    from conftest import EXAMPLES

    keys = tmp_path / "keys.yaml"
    keys.write_text(text)
    out = tmp_path / "out" / "zoom.gif"
    assert main(["animate", str(EXAMPLES / "chelsea.jpg"), "-o", str(out), "--keyframes",
                 str(keys)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_keyframe_files_and_options_combine_and_options_win(tmp_path: Path) -> None:
    from jaxdream.cli import build_parser
    from jaxdream.cli_motion import _schedules

    keys = tmp_path / "keys.yaml"
    keys.write_text("zoom: {0: 1.5, 10: 1.1, interpolation: smooth}\nangle: 3\n"
                    "step_size: {0: 1.5, 1: 0.5}\nsteps: 4\n"
                    "layer_weights: {block8: '0:1, 10:2'}\n")
    args = build_parser().parse_args(["animate", "x.jpg", "-o", "o.gif", "--keyframes",
                                      str(keys), "--angle", "0:0,10:5", "--layers",
                                      "block8,block10", "--layer-weight", "block10=0:2,10:0"])
    dream, motion = _schedules(args, MOTION_KEYS)
    assert motion["zoom"].interpolation == "smooth" and motion["angle"].at(5) == 2.5
    assert dream.recipe.steps == 4 and "steps" not in dream.values, "constants join the recipe"
    frame = dream.at(5)
    assert frame.step_size == 0.5 and dict(frame.layers or ()) == {"block8": 1.5,
                                                                   "block10": 1.0}


def test_the_example_keyframes_and_the_readmes_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from jaxdream.cli import build_parser
    from jaxdream.cli_motion import _schedules

    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    example = ROOT / "configs" / "keyframes" / "zoom.yaml"
    command = example.read_text().splitlines()[0].lstrip("# ").split()
    assert command[:2] == ["jaxdream", "animate"]
    dream, motion = _schedules(build_parser().parse_args(command[1:]), MOTION_KEYS)
    assert [name for name, _ in dream.recipe.layers or ()] == ["block8", "block10"]
    assert dict(dream.at(48).layers or ()) == {"block8": 0.2, "block10": 1.0}
    assert motion["zoom"].interpolation == "smooth" and motion["angle"].at(95) == -6
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(zoom:.*?)```", readme, re.S)
    assert block is not None
    parsed = yaml.safe_load(block[1])
    layers = parsed.pop("layer_weights")
    parse_schedules(parsed, KEYS, "README")
    assert set(layers) == {"block10"}
