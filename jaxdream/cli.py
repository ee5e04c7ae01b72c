"""The ``jaxdream`` command: parses options, builds a recipe, calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxdream import __version__
from jaxdream.errors import JaxdreamError, brief
from jaxdream.outdir import claim

if TYPE_CHECKING:  # the library is imported lazily, so that --help and --version are instant
    from jaxdream.recipe import Recipe

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _expand_inputs(paths: Sequence[str], outdir: Path | None = None) -> list[str]:
    """Files as given; folders become their image files (sorted, not recursive), less this
    job's own outputs when the folder is ``outdir`` (or inside it). A missing file stays in
    the list: it is reported with the other per-input failures."""
    from jaxdream.config import image_files
    from jaxdream.outdir import leave_out_outputs

    expanded: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            found = image_files(path)
            expanded.extend(leave_out_outputs(found, outdir) if outdir is not None else found)
        else:
            expanded.append(path)
    return expanded


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model name (default: efficientnet_lite0, embedded weights)")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="PyTorch checkpoint to load instead of the embedded weights "
                             "(read without PyTorch; nothing in it is executed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxdream", description="Batched, jit-compiled DeepDream in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxdream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dream = commands.add_parser(
        "dream", help="dream image files into an output folder",
        description="Dreams each INPUT (files or folders of images) into OUTDIR as "
                    "<name>_dream.png. Each PNG stores its full recipe; pass it to --recipe "
                    "to render the same dream again. Options left out come from --recipe, "
                    "then from --preset.")
    dream.add_argument("inputs", nargs="*", metavar="INPUT")
    dream.add_argument("-o", "--output", default=None, metavar="OUTDIR",
                       help="output folder (required without --config; overrides the "
                            "config's output with it)")
    dream.add_argument("--config", metavar="FILE", default=None,
                       help="run a YAML job config (inputs, grid, ...; see configs/) in this "
                            "process: outputs, a contact sheet per input for a grid, and "
                            "OUTDIR/index.html")
    _add_model_options(dream)
    dream.add_argument("--preset", default=None, help="named look (default: classic)")
    dream.add_argument("--recipe", metavar="PNG", default=None,
                       help="take every setting from a PNG that jaxdream wrote")
    dream.add_argument("--layers", default=None,
                       help="endpoints to amplify, optionally weighted: block10 or "
                            "block8:1,block10:2 (default: the model's own)")
    dream.add_argument("--octaves", type=int, default=None, help="number of scales (4)")
    dream.add_argument("--octave-scale", type=float, default=None,
                       help="size ratio between octaves (1.4)")
    dream.add_argument("--steps", type=int, default=None, help="gradient steps per octave (10)")
    dream.add_argument("--step-size", type=float, default=None,
                       help="mean absolute pixel change per step, on the 0..255 scale (1.5)")
    dream.add_argument("--jitter", type=int, default=None,
                       help="largest random shift in pixels before each step (32)")
    dream.add_argument("--seed", type=int, default=None, help="random seed for jitter (0)")
    dream.add_argument("--max-side", type=int, default=None,
                       help="downscale so the longer side is at most this; 0 keeps the "
                            "input's size (1024)")
    dream.add_argument("--objective", default=None,
                       choices=("l2", "channel", "neuron", "guide"),
                       help="what to amplify at the layers: l2 (their energy, classic), "
                            "channel / neuron (the --channels, over the map / at its centre), "
                            "guide (the features of --guide)")
    dream.add_argument("--channels", default=None, metavar="C[,C...]",
                       help="channel indices for --objective channel or neuron, e.g. 3,17")
    dream.add_argument("--guide", default=None, metavar="IMAGE",
                       help="guide photo for --objective guide")
    dream.add_argument("--normaliser", default=None, choices=("mean", "laplacian", "gaussian"),
                       help="gradient shaping: mean (classic), laplacian (TF 2016 lapnorm), "
                            "gaussian (smoothed)")
    dream.add_argument("--update", default=None, choices=("ascent", "adam"),
                       help="update rule: ascent (classic) or adam")
    dream.add_argument("--tile-size", type=int, default=None,
                       help="tile side for big images (512)")
    dream.add_argument("--tile-above", type=int, default=None,
                       help="tile octaves whose longer side exceeds this; 0 never (1280)")
    dream.add_argument("--max-pixels", type=int, default=None, metavar="N",
                       help="refuse images whose header declares more than N pixels, before "
                            "decoding them (default 67108864 = 8192 x 8192)")
    dream.add_argument("--batch-size", type=int, default=None,
                       help="images of one shape bucket dreamed together in one compiled "
                            "call (default: 1 on CPU, where batching does not pay, 8 on "
                            "GPU/TPU)")
    dream.add_argument("--overwrite", action="store_true",
                       help="replace outputs that already exist (default: skip them)")
    dream.add_argument("--force", action="store_true",
                       help="allow the filesystem root or the home folder itself as OUTDIR")
    dream.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    classify = commands.add_parser(
        "classify", help="print the top ImageNet classes of images",
        description="Prints the top-K ImageNet labels of each image: a quick check that "
                    "weights loaded correctly.")
    classify.add_argument("inputs", nargs="+", metavar="IMAGE")
    _add_model_options(classify)
    classify.add_argument("--top", type=int, default=5, help="how many labels (5)")

    models = commands.add_parser(
        "models", help="list the models, their weights and endpoints",
        description="Prints the model catalogue: each model, where its weights come from and "
                    "whether they are on this machine, its preprocessing, and its endpoints "
                    "(channels, stride). With NAME, one model in full.")
    models.add_argument("name", nargs="?", metavar="NAME")

    from jaxdream.cli_run import add_run_command

    add_run_command(commands)

    weights = commands.add_parser("weights", help="list or fetch model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True,
                                              metavar="ACTION")
    weights_commands.add_parser("list", help="what is known and what is on this machine")
    fetch = weights_commands.add_parser(
        "fetch", help="download a model's official checkpoint into the cache",
        description="Downloads the official checkpoint of NAME from its published address "
                    "into the cache ($JAXDREAM_CACHE/weights or ~/.cache/jaxdream/weights), "
                    "checks its published SHA-256 prefix, and never leaves a partial file.")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _recipe_from_args(args: argparse.Namespace) -> tuple[Recipe, str | None]:
    """The recipe the options ask for, and the weights SHA-256 a --recipe PNG was made with
    (None when there is no recipe, or when --model changes the model it names)."""
    from jaxdream.images import read_recipe
    from jaxdream.models import DEFAULT_MODEL, get_spec
    from jaxdream.recipe import PRESETS, recipe_from_json

    recipe_sha: str | None = None
    if args.recipe is not None:
        base, recipe_sha = recipe_from_json(read_recipe(args.recipe), f"recipe {args.recipe}")
        if args.preset is not None:
            raise JaxdreamError("--preset and --recipe both set the whole recipe; give one")
    else:
        name = args.preset or "classic"
        if name not in PRESETS:
            raise JaxdreamError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        base = PRESETS[name]
    overrides = {
        "model": args.model, "octaves": args.octaves, "octave_scale": args.octave_scale,
        "steps": args.steps, "step_size": args.step_size, "jitter": args.jitter,
        "seed": args.seed, "objective": args.objective, "guide": args.guide,
        "normaliser": args.normaliser, "update": args.update, "tile_size": args.tile_size,
        "tile_above": args.tile_above,
    }
    if args.channels is not None:
        try:
            overrides["channels"] = tuple(int(c) for c in args.channels.split(",") if c.strip())
        except ValueError:
            raise JaxdreamError(f"--channels: expected integers like 3,17, got "
                                f"{brief(args.channels)}") from None
    recipe = dataclasses.replace(
        base, **{key: value for key, value in overrides.items() if value is not None})
    if recipe.model != base.model:
        recipe_sha = None  # other model, other weights: nothing to compare with
    if args.max_side is not None:
        recipe = dataclasses.replace(recipe, max_side=args.max_side or None)
    if args.model is None and args.recipe is None:
        recipe = dataclasses.replace(recipe, model=DEFAULT_MODEL)
    spec = get_spec(recipe.model)
    if args.layers is not None:
        recipe = recipe.with_layers(args.layers, list(spec.endpoints))
    elif recipe.layers is None or (args.model is not None and args.recipe is not None
                                   and args.model != base.model):
        recipe = recipe.with_layers(spec.default_layers, list(spec.endpoints))
    else:
        recipe = recipe.with_layers(recipe.layers_text, list(spec.endpoints),
                                    f"recipe {args.recipe}" if args.recipe else None)
    return recipe.validate("options"), recipe_sha


def _use_compilation_cache() -> None:
    from jaxdream.engine import default_cache_dir, enable_compilation_cache

    try:
        enable_compilation_cache(default_cache_dir())
    except OSError as error:  # a read-only home must not stop a dream, only slow it
        print(f"warning: compilation cache disabled: {error}", file=sys.stderr)


#: ``dream`` options that a config file sets instead (they conflict with --config).
_RECIPE_OPTIONS = ("model", "weights", "preset", "recipe", "layers", "octaves", "octave_scale",
                   "steps", "step_size", "jitter", "seed", "max_side", "objective", "channels",
                   "guide", "normaliser", "update", "tile_size", "tile_above")


def _summary(verb: str, outcomes: Sequence[Any], outdir: Any, seconds: float,
             stats: Any) -> str:
    done = sum(o.status == "done" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    return (f"{verb} {done} image(s) into {outdir} ({failed} failed, {skipped} skipped) in "
            f"{seconds:.1f} s; built {stats.describe()}")


def _run_dream_config(args: argparse.Namespace) -> int:
    from jaxdream.config import load_config
    from jaxdream.render import dream_config

    given = [f"--{name.replace('_', '-')}" for name in _RECIPE_OPTIONS
             if getattr(args, name) is not None]
    if args.inputs or given:
        raise JaxdreamError(f"--config sets the inputs and the recipe; remove "
                            f"{', '.join(args.inputs[:3] + given)} or put it in the config")
    if args.batch_size is not None and args.batch_size < 1:
        raise JaxdreamError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = load_config(args.config, {"output": args.output, "max_pixels": args.max_pixels})
    with claim(config.output, "jaxdream dream", force=args.force):
        _use_compilation_cache()
        start = time.perf_counter()
        report, gallery = dream_config(config, batch_size=args.batch_size,
                                       overwrite=args.overwrite, progress=not args.quiet)
    variants = len(config.variants)
    print(_summary("dreamed", report.outcomes, config.output, time.perf_counter() - start,
                   report.compile_stats) + f"; {variants} setting(s) per input", file=sys.stderr)
    if gallery is not None:
        print(f"gallery: {gallery}", file=sys.stderr)
    for outcome in report.outcomes:
        if outcome.status == "done":
            print(outcome.output)
    failed = any(o.status == "failed" for o in report.outcomes) or report.problems
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _run_dream(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _run_dream_config(args)
    if not args.inputs or args.output is None:
        raise JaxdreamError("dream needs INPUT... and -o OUTDIR (or --config FILE)")
    recipe, recipe_sha = _recipe_from_args(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise JaxdreamError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_pixels is not None and args.max_pixels < 256:
        raise JaxdreamError(f"--max-pixels must be at least 256, got {args.max_pixels}")
    # Claimed before the model loads: a busy, unwritable or dangerous folder is refused at once.
    with claim(Path(args.output), "jaxdream dream", force=args.force):
        return _dream_into_claimed(args, recipe, recipe_sha)


def _dream_into_claimed(args: argparse.Namespace, recipe: Recipe, recipe_sha: str | None
                        ) -> int:
    """``jaxdream dream INPUT... -o OUTDIR`` once OUTDIR is created and locked."""
    from jaxdream.engine import default_batch_size
    from jaxdream.images import DEFAULT_MAX_PIXELS
    from jaxdream.models import load_model
    from jaxdream.render import dream_files

    _use_compilation_cache()
    if args.batch_size is None:
        args.batch_size = default_batch_size()
    model = load_model(recipe.model, args.weights)
    if recipe_sha is not None and recipe_sha != model.weights_sha256:
        raise JaxdreamError(
            f"recipe {args.recipe} was rendered with weights sha256 {recipe_sha[:16]}..., "
            f"but the loaded weights are {model.weights_sha256[:16]}...; pass --weights with "
            f"the matching file")
    inputs = _expand_inputs(args.inputs, Path(args.output))
    if not inputs:
        raise JaxdreamError("no input images found")
    start = time.perf_counter()
    report = dream_files(inputs, args.output, recipe, weights=args.weights,
                         max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                         batch_size=args.batch_size, overwrite=args.overwrite,
                         progress=not args.quiet)
    outcomes = report.outcomes
    failed = sum(o.status == "failed" for o in outcomes)
    print(_summary("dreamed", outcomes, args.output, time.perf_counter() - start,
                   report.compile_stats) + f"; layers {recipe.layers_text}, {recipe.octaves} "
          f"octaves x {recipe.steps} steps", file=sys.stderr)
    for outcome in outcomes:
        if outcome.status == "done":
            print(outcome.output)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _run_classify(args: argparse.Namespace) -> int:
    from jaxdream.classify import classify
    from jaxdream.images import load_rgb
    from jaxdream.models import DEFAULT_MODEL, load_model

    if args.top < 1:
        raise JaxdreamError(f"--top must be at least 1, got {args.top}")
    _use_compilation_cache()
    model = load_model(args.model or DEFAULT_MODEL, args.weights)
    failed = 0
    for path in _expand_inputs(args.inputs):
        try:
            image = load_rgb(path)
        except JaxdreamError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        print(path)
        for index, label, probability in classify(model, [image], top=args.top)[0]:
            print(f"  {probability:6.3f}  {label} ({index})")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _endpoint_summary(endpoints: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{name} ({channels}" + (f", /{stride})" if stride else ")")
                     for name, (channels, stride) in endpoints.items())


def _run_models(args: argparse.Namespace) -> int:
    from jaxdream.models import MODELS, get_spec

    names = [get_spec(args.name).name] if args.name else list(MODELS)
    for index, name in enumerate(names):
        spec = MODELS[name]
        local = spec.local_weights()
        if index:
            print()
        print(f"{name}: {spec.description}")
        print(f"  weights:       {spec.weights.describe()}")
        print(f"  on this machine: {local if local else 'no'}")
        print(f"  preprocessing: {spec.preprocessing}")
        print(f"  classify view: shorter side {spec.resize_size}, centre crop {spec.crop_size}")
        print(f"  default layer: {spec.default_layers}")
        if args.name:
            print("  endpoints (channels, stride):")
            for endpoint, (channels, stride) in spec.endpoints.items():
                print(f"    {endpoint:14s} {channels:6d}  {('/' + str(stride)) if stride else '-'}")
        else:
            print(f"  endpoints:     {_endpoint_summary(spec.endpoints)}")
    return EXIT_OK


def _run_weights(args: argparse.Namespace) -> int:
    from jaxdream.models import MODELS, get_spec
    from jaxdream.models.weights import cache_dir, fetch

    if args.weights_command == "list":
        print(f"cache: {cache_dir()}")
        for name, spec in MODELS.items():
            local = spec.local_weights()
            state = f"present  {local}" if local else "missing"
            print(f"{name:20s} {state}\n{'':20s} from {spec.weights.describe()}")
        return EXIT_OK
    failed = 0
    for name in args.names:
        spec = get_spec(name)
        try:
            path = fetch(name, spec.weights, force=args.force, progress=not args.quiet)
        except JaxdreamError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: {path}")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "dream":
            return _run_dream(args)
        if args.command == "models":
            return _run_models(args)
        if args.command == "weights":
            return _run_weights(args)
        if args.command == "run":
            from jaxdream.cli_run import run_command

            return run_command(args)
        return _run_classify(args)
    except JaxdreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; finished outputs are complete, none is partial", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
