"""``jaxdream animate`` and ``jaxdream video``: dreams in motion.

Kept apart from :mod:`jaxdream.cli`, which registers the commands with
:func:`add_motion_commands` and hands them to :func:`run_motion`. Nothing heavy is imported
until a command runs, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxdream.errors import ConfigError, JaxdreamError

if TYPE_CHECKING:
    from jaxdream.motion.common import DreamSchedules
    from jaxdream.recipe import Recipe

EXIT_OK, EXIT_USAGE = 0, 2

#: Motion renders every frame: a smaller default than stills keeps a CPU render in minutes.
DEFAULT_MAX_SIDE = 512

_SCHEDULE_HELP = ("a number, or keyframes FRAME:VALUE,... (e.g. 0:1.3,48:1.1; start with "
                  "'smooth ' for smooth interpolation)")


def _add_dream_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dream settings (schedules: " + _SCHEDULE_HELP + ")")
    group.add_argument("--model", default=None, help="model name (default: efficientnet_lite0)")
    group.add_argument("--weights", metavar="FILE", default=None,
                       help="PyTorch checkpoint to load instead of the embedded weights")
    group.add_argument("--preset", default=None, help="named look (default: classic)")
    group.add_argument("--layers", default=None,
                       help="endpoints to amplify, optionally weighted: block10 or "
                            "block8:1,block10:2")
    group.add_argument("--layer-weight", action="append", default=[], metavar="LAYER=SCHEDULE",
                       help="a schedule for one layer's weight, e.g. block10=0:1,48:3 "
                            "(repeatable)")
    group.add_argument("--octaves", type=int, default=None, help="number of scales (4)")
    group.add_argument("--octave-scale", type=float, default=None, help="octave ratio (1.4)")
    group.add_argument("--steps", default=None, metavar="SCHEDULE", help="steps per octave (10)")
    group.add_argument("--step-size", default=None, metavar="SCHEDULE",
                       help="mean absolute pixel change per step (1.5)")
    group.add_argument("--jitter", default=None, metavar="SCHEDULE",
                       help="largest random shift before each step (32)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed; frame t dreams with seed + t (0)")
    group.add_argument("--max-side", type=int, default=None,
                       help=f"dream at most this long a side; 0: full size ({DEFAULT_MAX_SIDE})")
    group.add_argument("--normaliser", default=None, choices=("mean", "laplacian", "gaussian"))
    group.add_argument("--recipe", metavar="animation.json", default=None,
                       help="every setting of an earlier clip, from the animation.json in its "
                            "frame folder (render it again, or continue it elsewhere)")
    group.add_argument("--keyframes", metavar="FILE.yaml", default=None,
                       help="a YAML mapping of schedules (zoom: {0: 1.3, 48: 1.1}, "
                            "layers: block8,block10, layer_weights: {block10: ...}, ...; see "
                            "configs/keyframes/); options given here win")
    group.add_argument("--batch-size", type=int, default=None,
                       help="frames dreamed together in one compiled call (default: 1 on "
                            "CPU, 8 on GPU/TPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again even if frames of another recipe are there")
    parser.add_argument("-q", "--quiet", action="store_true", help="no line per frame")


def add_motion_commands(commands: Any) -> None:
    """Registers ``animate`` and ``video`` on the ``jaxdream`` subcommand parser."""
    animate = commands.add_parser(
        "animate", help="an endless-zoom animation grown from one image",
        description="The feedback loop of the original notebook: dream the image, zoom / turn "
                    "/ move it a little, dream again. Motion is per second, so --fps changes "
                    "smoothness, not speed. OUT.mp4 or OUT.gif also keeps its frames in "
                    "OUT_frames/ (any other OUT is that folder); each frame PNG carries its "
                    "recipe, animation.json the whole clip's. Run the same command again to "
                    "continue an interrupted render from its first missing frame.")
    animate.add_argument("inputs", nargs="+", metavar="IMAGE")
    animate.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="OUT.gif, OUT.mp4 or a folder of PNGs; with several images a "
                              "folder that gets one animation per image (see --format)")
    animate.add_argument("--format", default="gif", choices=("gif", "mp4", "png"),
                         help="what each of several images becomes in the output folder (gif)")
    animate.add_argument("--frames", type=int, default=None, help="number of frames (48)")
    animate.add_argument("--fps", type=float, default=None, help="frames per second (12)")
    animate.add_argument("--zoom", default=None, metavar="SCHEDULE",
                         help="scale factor per second, >1 zooms in (1.25)")
    animate.add_argument("--angle", default=None, metavar="SCHEDULE",
                         help="degrees per second, counter-clockwise (0)")
    animate.add_argument("--translate-x", default=None, metavar="SCHEDULE",
                         help="pixels per second to the right (0)")
    animate.add_argument("--translate-y", default=None, metavar="SCHEDULE",
                         help="pixels per second downwards (0)")
    _add_dream_options(animate)

    video = commands.add_parser(
        "video", help="dream every frame of a video, coherently",
        description="Dreams each frame of IN, carrying the previous frame's dream detail "
                    "along the optical flow (an occlusion mask drops it where objects move "
                    "apart; a scene cut starts afresh). Frame rate and size are kept, the "
                    "audio is copied unchanged. Frames go to OUT_frames/ as they finish; the "
                    "same command resumes an interrupted render.")
    video.add_argument("input", metavar="IN")
    video.add_argument("-o", "--output", required=True, metavar="OUT",
                       help="OUT.mp4 (H.264 + the input's audio), OUT.gif, or a folder")
    video.add_argument("--independent", action="store_true",
                       help="dream each frame on its own (no coherence), for comparison")
    video.add_argument("--blend", default=None, metavar="SCHEDULE",
                       help="share of the previous frame's detail carried into the next (0.8)")
    video.add_argument("--refresh", type=float, default=None,
                       help="step size factor for frames that carry detail (0.3)")
    video.add_argument("--no-flow", action="store_true",
                       help="carry the detail in place, without optical flow")
    video.add_argument("--segments", type=int, default=1,
                       help="cut the clip into N segments dreamed side by side (1)")
    video.add_argument("--warmup", type=int, default=12,
                       help="frames each segment dreams before its first and throws away; "
                            "carried detail fades as blend^frames, so 12 at blend 0.8 (12)")
    video.add_argument("--ray", action="store_true", help="dream the segments on Ray "
                       "workers (a private Ray on this machine, or --address)")
    video.add_argument("--address", default=None, help="with --ray: the cluster (host:port, "
                       "'auto'; default $RAY_ADDRESS), whose nodes all see OUT")
    video.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --ray: N workers (one per GPU, else per CPU node)")
    video.add_argument("--max-pixels", type=int, default=None, metavar="N",
                       help="refuse videos whose frames declare more pixels (67108864)")
    _add_dream_options(video)


def _load_keyframes(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of parameter: schedule")
    return dict(data)


def _recipe(args: argparse.Namespace, layers: str | None = None) -> Recipe:
    from jaxdream.models import DEFAULT_MODEL, get_spec
    from jaxdream.recipe import PRESETS

    name = args.preset or "classic"
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    overrides = {"model": args.model or DEFAULT_MODEL, "octaves": args.octaves,
                 "octave_scale": args.octave_scale, "seed": args.seed,
                 "normaliser": args.normaliser}
    recipe = dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items()
                                                   if v is not None})
    max_side = DEFAULT_MAX_SIDE if args.max_side is None else args.max_side
    recipe = dataclasses.replace(recipe, max_side=max_side or None)
    spec = get_spec(recipe.model)
    recipe = recipe.with_layers(args.layers or layers or spec.default_layers,
                                list(spec.endpoints))
    return recipe.validate("options")


def _schedules(args: argparse.Namespace, extra_keys: Mapping[str, Any]
               ) -> tuple[DreamSchedules, dict[str, Any]]:
    """The dream schedules, and the other schedules (motion or blend), from --keyframes and
    the options (options win)."""
    from jaxdream.motion.common import DREAM_KEYS, DreamSchedules, parse_layer_weights
    from jaxdream.motion.schedules import parse_schedules

    source = args.keyframes or "options"
    data = _load_keyframes(args.keyframes)
    layer_data = data.pop("layer_weights", {}) or {}
    layers = data.pop("layers", None)  # as --layers (which wins)
    if layers is not None and not isinstance(layers, str):
        raise ConfigError(f"{source}: layers: expected text like block8,block10:2")
    if not isinstance(layer_data, Mapping):
        raise ConfigError(f"{source}: layer_weights: expected a mapping of layer: schedule")
    known = {**DREAM_KEYS, **extra_keys}
    schedules = parse_schedules(data, known, source)
    given = {key: getattr(args, key) for key in known if getattr(args, key, None) is not None}
    schedules.update(parse_schedules(given, known, "options"))
    layer_weights = parse_layer_weights(layer_data, f"{source}: layer_weights")
    for entry in args.layer_weight:
        name, sep, text = entry.partition("=")
        if not sep:
            raise ConfigError(f"--layer-weight: expected LAYER=SCHEDULE, got {entry!r}")
        layer_weights.update(parse_layer_weights({name.strip(): text}, "--layer-weight"))
    recipe = _recipe(args, layers)
    # Constant values live in the recipe itself (checked there); only changing ones stay
    # schedules.
    constants = {key: schedules.pop(key).at(0) for key in list(schedules)
                 if key in DREAM_KEYS and schedules[key].is_constant}
    constants = {key: round(v) if DREAM_KEYS[key].integer else v for key, v in constants.items()}
    recipe = dataclasses.replace(recipe, **constants).validate(source)
    layers = dict(recipe.layers or ())
    unknown = sorted(set(layer_weights) - set(layers))
    if unknown:
        raise ConfigError(f"{source}: layer_weights: {unknown} not among the dream's layers "
                          f"{list(layers)} (set them with --layers)")
    dream_values = {key: s for key, s in schedules.items() if key in DREAM_KEYS}
    others = {key: s for key, s in schedules.items() if key not in DREAM_KEYS}
    return DreamSchedules(recipe, dream_values, layer_weights), others


#: Options that --recipe replaces (giving one with it is an error, not a silent override).
_RECIPE_SETS = ("model", "preset", "layers", "octaves", "octave_scale", "steps", "step_size",
                "jitter", "seed", "max_side", "normaliser", "keyframes", "zoom", "angle",
                "translate_x", "translate_y", "fps", "blend", "refresh", "layer_weight",
                "independent", "no_flow")


def _from_recipe(args: argparse.Namespace, kind: str
                 ) -> tuple[DreamSchedules, dict[str, Any], str | None]:
    """Settings of a clip from its animation.json: the dream schedules, the command's own
    settings (motion and fps, or blend and mode) and the weights' SHA-256."""
    import json

    from jaxdream.motion.animate import MOTION_KEYS
    from jaxdream.motion.common import DREAM_KEYS, DreamSchedules, parse_layer_weights
    from jaxdream.motion.schedules import parse_schedule, parse_schedules
    from jaxdream.config import recipe_from_json

    given = [f"--{name.replace('_', '-')}" for name in _RECIPE_SETS
             if getattr(args, name, None) not in (None, False, [])]
    if given:
        raise ConfigError(f"--recipe sets every setting; remove {', '.join(given)}")
    source = f"recipe {args.recipe}"
    try:
        with open(args.recipe, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise ConfigError(f"{source}: {error.strerror or error}") from None
    except ValueError as error:
        raise ConfigError(f"{source}: not JSON ({error})") from None
    identity = data.get("identity") if isinstance(data, dict) else None
    if not isinstance(identity, dict) or identity.get("kind") not in ("animate", "video"):
        raise ConfigError(f"{source}: not an animation.json written by jaxdream")
    if identity["kind"] != kind:
        raise ConfigError(f"{source}: is the recipe of a {identity['kind']!r} clip, not "
                          f"{kind!r}")
    try:
        recipe, sha = recipe_from_json(identity["recipe"], source)
        dream = DreamSchedules(
            recipe, parse_schedules(identity.get("schedules", {}), DREAM_KEYS, source),
            parse_layer_weights(identity.get("layer_weights", {}), f"{source}: layer_weights"),
            bool(identity.get("seed_per_frame", True)))
        if kind == "animate":
            extra = {"motion": parse_schedules(identity.get("motion", {}), MOTION_KEYS, source),
                     "fps": float(identity["fps"]), "frames": int(data["frames"])}
        else:
            extra = {"blend": parse_schedule(identity["blend"], f"{source}: blend"),
                     "independent": bool(identity["independent"]),
                     "use_flow": bool(identity["use_flow"]),
                     "refresh": float(identity["refresh"])}
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{source}: malformed ({type(error).__name__}: {error})") from None
    return dream, extra, sha


def _check_weights(sha: str | None, engines: Any, source: str) -> None:
    if sha is not None and sha != engines.model.weights_sha256:
        raise ConfigError(f"{source} was rendered with weights sha256 {sha[:16]}..., but the "
                          f"loaded weights are {engines.model.weights_sha256[:16]}...; pass "
                          f"--weights with the matching file")


def _frames_list(folder: Path, count: int) -> Any:
    from jaxdream.images import load_rgb
    from jaxdream.motion.videoio import frame_name

    return (load_rgb(folder / frame_name(t)) for t in range(count))


def _encode(output: Path, folder: Path, count: int, fps: Any, audio_from: str | None) -> None:
    from jaxdream.motion.videoio import write_gif, write_mp4

    suffix = output.suffix.lower()
    if suffix == ".mp4":
        write_mp4(output, _frames_list(folder, count), fps, audio_from=audio_from)
    elif suffix == ".gif":
        write_gif(output, _frames_list(folder, count), float(fps))


def _check_output(args: argparse.Namespace) -> None:
    """An output that would land on the input (``video clip.mp4 -o clip.mp4``) is refused
    before anything is read: the encoded clip would replace the footage it came from."""
    import os

    output = Path(args.output)
    inputs = getattr(args, "inputs", None) or [args.input]
    for target in (output, output.with_name(f"{output.stem}_frames")):
        for path in inputs:
            if target.exists() and os.path.exists(path) and os.path.samefile(target, path):
                raise ConfigError(f"-o {args.output}: would overwrite the input {path}")


def _check_counts(args: argparse.Namespace) -> None:
    _check_output(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("frames", "segments", "workers"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if getattr(args, "warmup", 0) < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {args.warmup}")
    fps = getattr(args, "fps", None)
    if fps is not None and not 0.1 <= fps <= 1000:
        raise ConfigError(f"--fps must be between 0.1 and 1000, got {fps:g}")


def _animation_outputs(args: argparse.Namespace) -> list[Path]:
    """One output per input: ``-o OUT`` for one image; ``OUTDIR/<name>.<format>`` for more."""
    import os

    from jaxdream.motion.common import frames_folder
    from jaxdream.render import output_stems

    if len(args.inputs) == 1:
        return [Path(args.output)]
    folder = Path(args.output)
    if folder.suffix.lower() in (".mp4", ".gif"):
        raise ConfigError(f"-o {args.output}: several images need an output folder (and "
                          f"--format gif, mp4 or png)")
    suffix = "" if args.format == "png" else f".{args.format}"
    outputs = [folder / f"{stem}{suffix}" for stem in output_stems(args.inputs, folder)]
    inputs = {os.path.realpath(path) for path in args.inputs}
    for output in outputs:
        for target in (output, frames_folder(output)):
            if os.path.realpath(target) in inputs:
                raise ConfigError(f"-o {args.output}: {target} would overwrite an input")
    return outputs


def _run_animate(args: argparse.Namespace) -> int:
    from jaxdream.cli import prepare_process
    from jaxdream.images import load_rgb
    from jaxdream.motion import animate as anim
    from jaxdream.motion.common import Engines, frames_folder
    from jaxdream.outdir import claim

    _check_counts(args)
    sha = None
    if args.recipe is not None:
        dream, extra, sha = _from_recipe(args, "animate")
        animation = anim.Animation(dream, frames=args.frames or extra["frames"],
                                   fps=extra["fps"], motion=extra["motion"])
    else:
        dream, motion = _schedules(args, anim.MOTION_KEYS)
        animation = anim.Animation(dream, frames=args.frames or anim.DEFAULT_FRAMES,
                                   fps=args.fps or anim.DEFAULT_FPS, motion=motion)
    outputs = _animation_outputs(args)
    images = [load_rgb(path, max_side=dream.recipe.max_side) for path in args.inputs]
    prepare_process()
    # Several photos are several streams, advanced together: one frame of each per round,
    # through one compiled program per size (batched on accelerators, see --batch-size).
    engines = Engines.load(dream.recipe, args.weights, args.batch_size)
    _check_weights(sha, engines, f"recipe {args.recipe}")
    with contextlib.ExitStack() as held:
        # Frames folders held until encoded: a second run here is refused (README, Outputs).
        for output in outputs:
            held.enter_context(claim(frames_folder(output), "jaxdream animate"))
        streams = [anim.open_stream(animation, image, frames_folder(output), Path(path).name,
                                    Path(path).read_bytes(), engines.model.weights_sha256,
                                    overwrite=args.overwrite)
                   for path, image, output in zip(args.inputs, images, outputs, strict=True)]
        start = time.perf_counter()
        todo = sum(animation.frames - stream.next_frame for stream in streams)
        report = anim.animate_streams(streams, engines, on_frame=None if args.quiet else
                                      anim.progress_printer(todo))
        for output, stream in zip(outputs, streams, strict=True):
            _encode(output, stream.folder, animation.frames, animation.fps, None)
    per_frame = sum(report.seconds_per_frame[1:]) / max(len(report.seconds_per_frame) - 1, 1)
    print(f"animated {report.rendered} frame(s) ({report.skipped} already there) of "
          f"{len(streams)} animation(s) in {time.perf_counter() - start:.1f} s ({per_frame:.2f} "
          f"s a frame after the first); built {report.compile}", file=sys.stderr)
    for output in outputs:
        print(output)
    return EXIT_OK


def _run_video(args: argparse.Namespace) -> int:
    import hashlib

    from jaxdream.images import DEFAULT_MAX_PIXELS
    from jaxdream.motion import video as vid
    from jaxdream.motion.common import frames_folder, prepare_folder
    from jaxdream.motion.schedules import Schedule
    from jaxdream.motion.videoio import probe_video
    from jaxdream.outdir import claim

    _check_counts(args)
    sha = None
    if args.recipe is not None:
        dream, extra, sha = _from_recipe(args, "video")
        video = vid.VideoDream(dream, **extra)
    else:
        dream, others = _schedules(args, vid.VIDEO_KEYS)
        video = vid.VideoDream(dream, blend=others.get("blend", Schedule.constant(
            vid.DEFAULT_BLEND)), independent=args.independent, use_flow=not args.no_flow,
            refresh=vid.DEFAULT_REFRESH if args.refresh is None else args.refresh)
    if not 0 < video.refresh <= 1:
        raise ConfigError(f"--refresh must be above 0 and at most 1, got {video.refresh:g}")
    info = probe_video(args.input, args.max_pixels or DEFAULT_MAX_PIXELS)
    with open(args.input, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    engines, weights_sha = _video_engines(args, dream.recipe, sha)
    output = Path(args.output)
    folder = frames_folder(output)
    # Held until encoded: a second run here (its --overwrite) is refused (README, Outputs).
    with claim(folder, "jaxdream video"):
        prepare_folder(folder, video.identity(info, digest, weights_sha),
                       {"frames": info.frames, "input": Path(args.input).name}, args.overwrite)
        if video.independent:
            # Independent frames need no warm-up, and a batch's worth of segments fills each
            # compiled call.
            batch = engines.batch_size if engines is not None else 1
            segments = vid.plan_segments(info.frames, max(args.segments, batch), 0)
        else:
            segments = vid.plan_segments(info.frames, args.segments, args.warmup)
        start = time.perf_counter()

        def report_frame(t: int, path: Path) -> None:
            print(f"frame {t + 1}/{info.frames}: {path}", file=sys.stderr)

        if engines is None:
            report = _segments_on_ray(args, info, segments, video, folder, digest)
        else:
            report = vid.render_segments(info, segments, video, engines, folder, digest,
                                         on_frame=None if args.quiet else report_frame)
        _encode(output, folder, info.frames, info.fps, args.input)
    seconds = time.perf_counter() - start
    cuts = f"; scene cuts at {report.cuts}" if report.cuts else ""
    print(f"dreamed {report.rendered} frame(s) ({report.skipped} already there) of "
          f"{info.describe()} into {folder} in {seconds:.1f} s; built {report.compile}{cuts}",
          file=sys.stderr)
    if info.frames > 1:
        print(vid.clip_flicker(info, folder).describe(), file=sys.stderr)
    if len(segments) > 1 and not video.independent:
        joints, elsewhere = vid.joint_flicker(info, folder, segments)
        print(f"segment joints: flicker {joints:.2f} across joints, {elsewhere:.2f} elsewhere",
              file=sys.stderr)
    print(output)
    return EXIT_OK


def _video_engines(args: argparse.Namespace, recipe: Recipe, sha: str | None
                   ) -> tuple[Any, str]:
    """The engines that dream here and the weights' SHA-256; with --ray no engine (the
    workers load the model), only the weights' hash."""
    if args.ray:
        from jaxdream.models import weights_sha256

        actual = weights_sha256(recipe.model, args.weights)
        if sha is not None and sha != actual:
            raise ConfigError(f"recipe {args.recipe} was rendered with weights sha256 "
                              f"{sha[:16]}..., but the weights given are {actual[:16]}...; "
                              f"pass --weights with the matching file")
        return None, actual
    from jaxdream.cli import prepare_process
    from jaxdream.motion.common import Engines

    prepare_process()
    engines = Engines.load(recipe, args.weights, args.batch_size)
    _check_weights(sha, engines, f"recipe {args.recipe}")
    return engines, engines.model.weights_sha256


def _segments_on_ray(args: argparse.Namespace, info: Any, segments: Any, video: Any,
                     folder: Path, digest: str) -> Any:
    """The segments dreamed by Ray workers (:mod:`jaxdream.jobs.motion`)."""
    from jaxdream.config import JobSettings
    from jaxdream.jobs.motion import render_segments_on_ray

    return render_segments_on_ray(
        info, segments, video, folder, digest, JobSettings(workers=args.workers,
        batch_size=args.batch_size), weights=args.weights, address=args.address,
        say=(lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr)))


def run_motion(args: argparse.Namespace) -> int:
    """Runs ``animate`` or ``video``; errors propagate to the caller as JaxdreamError."""
    if args.command == "animate":
        return _run_animate(args)
    return _run_video(args)


__all__ = ["add_motion_commands", "run_motion", "JaxdreamError"]
