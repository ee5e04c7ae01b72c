"""The ``jaxdream`` command: parses options (the dream options are generated from the recipe
fields), resolves them into a job config, and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxdream import __version__
from jaxdream.errors import JaxdreamError, brief
from jaxdream.outdir import claim

if TYPE_CHECKING:  # the library is imported lazily, so that --help and --version are instant
    from jaxdream.config import JobConfig

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _option_help(field: dataclasses.Field[Any]) -> str:
    """An option's help: the field's text, its choices described, and its default."""
    meta = field.metadata
    text = meta["help"]
    if meta["choices"]:
        text += ". " + "; ".join(f"{name}: {what}" for name, what in meta["choices"].items())
    if field.name == "preset":
        from jaxdream.recipe import PRESETS  # light: no JAX

        text += f"; one of {', '.join(PRESETS)}"
    return f"{text} (default: {meta['shown'] or field.default})"


def _add_recipe_options(parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None,
                        exclude: Sequence[str] = ()) -> None:
    """One option per :class:`~jaxdream.recipe.Recipe` field (or per field in ``only``),
    generated from the field's type and metadata: a new setting is one field. Every default
    is None, so that an option left out leaves the value to the recipe PNG, config or preset;
    lists (``--channels 3,17``) and layer weights are text, checked with the config's rules."""
    from jaxdream.recipe import Recipe

    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        if (only is not None and field.name not in only) or field.name in exclude:
            continue
        kind = hints[field.name]
        if type(None) in typing.get_args(kind):  # optional: the option takes the other type
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", default=None,
            type=kind if kind in (int, float) else str, metavar=field.metadata["metavar"],
            choices=list(field.metadata["choices"]) if field.metadata["choices"] else None,
            help=_option_help(field))


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    _add_recipe_options(parser, only=["model"])
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="weights to load instead of the embedded or fetched ones: a "
                             "PyTorch checkpoint, or a Caffe .caffemodel for the Caffe models "
                             "(read without PyTorch or Caffe; nothing in it is executed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxdream", description="Batched, jit-compiled DeepDream in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxdream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dream = commands.add_parser(
        "dream", help="dream image files into an output folder",
        description="Dreams each INPUT (files or folders of images) into OUTDIR as "
                    "<name>_dream.png. Each PNG stores its full recipe; pass it to --recipe "
                    "to render the same dream again. Each setting comes from, last wins: the "
                    "defaults, the preset, --recipe, --config, the options.")
    dream.add_argument("inputs", nargs="*", metavar="INPUT")
    dream.add_argument("-o", "--output", default=None, metavar="OUTDIR",
                       help="output folder (required without --config; overrides the "
                            "config's output with it)")
    dream.add_argument("--config", metavar="FILE", default=None,
                       help="run a YAML job config (inputs, grid, ...; see configs/) in this "
                            "process: outputs, a contact sheet per input for a grid, and "
                            "OUTDIR/index.html; the options below override its settings")
    dream.add_argument("--recipe", metavar="PNG", default=None,
                       help="start from every setting of a PNG that jaxdream wrote")
    _add_model_options(dream)
    _add_recipe_options(dream, exclude=["model"])
    dream.add_argument("--max-pixels", type=int, default=None, metavar="N",
                       help="refuse images whose header declares more than N pixels, before "
                            "decoding them (default 67108864 = 8192 x 8192)")
    dream.add_argument("--max-file-bytes", type=int, default=None, metavar="N",
                       help="refuse input files larger than N bytes, before reading them "
                            "(default 268435456 = 256 MiB)")
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

    from jaxdream.cli_motion import add_motion_commands

    add_motion_commands(commands)

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
    parser.command_parsers = commands.choices  # for parse_arguments
    return parser


def prepare_process() -> None:
    """What the commands that run a model (dream, classify, animate, video) set up first: the
    process's memory settings (a heap that keeps freed memory for the next XLA call, Python's
    collector run less often: :func:`jaxdream.heap.set_up`) and the disk cache of compiled
    programs."""
    from jaxdream import heap
    from jaxdream.engine import use_disk_cache

    heap.set_up()
    use_disk_cache(lambda line: print(line, file=sys.stderr))


def _summary(verb: str, outcomes: Sequence[Any], outdir: Any, seconds: float,
             stats: Any) -> str:
    done = sum(o.status == "done" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    return (f"{verb} {done} image(s) into {outdir} ({failed} failed, {skipped} skipped) in "
            f"{seconds:.1f} s; built {stats.describe()}")


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job ``dream`` runs: its config file, or a config made of its INPUTs and -o, with
    the options on top; one resolution path (defaults, preset, --recipe, config, options)."""
    from jaxdream.config import load_config, options_config
    from jaxdream.recipe import Recipe

    settings: dict[str, Any] = {field.name: getattr(args, field.name)
                                for field in dataclasses.fields(Recipe)}
    hints = typing.get_type_hints(Recipe)
    for name, value in settings.items():
        if isinstance(value, str) and typing.get_origin(hints[name]) is tuple and name != "layers":
            try:  # a list option: 3,17
                settings[name] = [int(item) for item in value.split(",") if item.strip()]
            except ValueError:
                raise JaxdreamError(f"--{name}: expected integers like 3,17, got "
                                    f"{brief(value)}") from None
    settings.update(weights=args.weights, max_pixels=args.max_pixels,
                    max_file_bytes=args.max_file_bytes)
    if args.config is not None:
        if args.inputs:
            raise JaxdreamError(f"--config names the inputs; remove {', '.join(args.inputs[:3])} "
                                f"or put it in the config")
        return load_config(args.config, {"output": args.output, **settings},
                           recipe=args.recipe)
    if not args.inputs or args.output is None:
        raise JaxdreamError("dream needs INPUT... and -o OUTDIR (or --config FILE)")
    return options_config(args.inputs, args.output, settings, recipe=args.recipe)


def _run_dream(args: argparse.Namespace) -> int:
    from jaxdream.render import dream_config

    if args.batch_size is not None and args.batch_size < 1:
        raise JaxdreamError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = job_config(args)
    # Claimed before the model loads: a busy, unwritable or dangerous folder is refused at
    # once, and no second job writes here (outputs, sheets, gallery) until this one is done.
    with claim(config.output, "jaxdream dream", force=args.force):
        prepare_process()
        start = time.perf_counter()
        report, gallery = dream_config(config, batch_size=args.batch_size,
                                       overwrite=args.overwrite, progress=not args.quiet,
                                       gallery=args.config is not None)
    if len(config.variants) == 1:
        recipe = config.variants[0].recipe
        what = f"layers {recipe.layers_text}, {recipe.octaves} octaves x {recipe.steps} steps"
    else:
        what = f"{len(config.variants)} setting(s) per input"
    print(_summary("dreamed", report.outcomes, config.output, time.perf_counter() - start,
                   report.compile_stats) + f"; {what}", file=sys.stderr)
    if gallery is not None:
        print(f"gallery: {gallery}", file=sys.stderr)
    if not args.quiet:
        for hint in report.hints:
            print(hint, file=sys.stderr)
    for outcome in report.outcomes:
        if outcome.status == "done":
            print(outcome.output)
    failed = any(o.status == "failed" for o in report.outcomes) or report.problems
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _run_classify(args: argparse.Namespace) -> int:
    from jaxdream.classify import classify
    from jaxdream.inputs import expand_inputs
    from jaxdream.images import load_rgb
    from jaxdream.models import DEFAULT_MODEL, load_model

    if args.top < 1:
        raise JaxdreamError(f"--top must be at least 1, got {args.top}")
    prepare_process()
    model = load_model(args.model or DEFAULT_MODEL, args.weights)
    failures: list[tuple[str, str]] = []  # folders and globs that yield no image
    paths = expand_inputs(args.inputs, failures=failures)
    for _, reason in failures:
        print(f"error: {reason}", file=sys.stderr)
    failed = len(failures)
    for path in paths:
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


#: Catalogue lines list at most this many endpoints (Caffe's GoogLeNet has 83).
_SUMMARY_ENDPOINTS = 40


def _endpoint_summary(endpoints: dict[str, tuple[int, int]], name: str) -> str:
    items = [f"{endpoint} ({channels}" + (f", /{stride})" if stride else ")")
             for endpoint, (channels, stride) in endpoints.items()]
    if len(items) > _SUMMARY_ENDPOINTS:
        items = items[:8] + ["...", *items[-4:],
                             f"({len(items)} in all: jaxdream models {name})"]
    return ", ".join(items)


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
            width = max(14, *(len(endpoint) for endpoint in spec.endpoints))
            for endpoint, (channels, stride) in spec.endpoints.items():
                print(f"    {endpoint:{width}s} {channels:6d}  "
                      f"{('/' + str(stride)) if stride else '-'}")
        else:
            print(f"  endpoints:     {_endpoint_summary(spec.endpoints, name)}")
    from jaxdream.engine import describe_devices

    print()
    print(describe_devices())
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


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as a namespace. Inputs may come after options too
    (``jaxdream dream a.jpg -o out --steps 5 b.jpg``), as in most tools: a command that takes
    a list of inputs is parsed again with argparse's intermixed parsing when the plain parse
    leaves words over (argparse refuses intermixed parsing of a parser with subcommands)."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(words)
    if not extra:
        return args
    command = parser.command_parsers.get(args.command)
    if command is None or args.command not in _INPUT_LISTS:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rest = words[words.index(args.command) + 1:]
    return command.parse_intermixed_args(rest, argparse.Namespace(command=args.command))


#: Commands whose positional words are a list of inputs, which may mix with options.
_INPUT_LISTS = ("dream", "classify", "animate")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        if args.command == "dream":
            return _run_dream(args)
        if args.command == "models":
            return _run_models(args)
        if args.command == "weights":
            return _run_weights(args)
        if args.command in ("animate", "video"):
            from jaxdream.cli_motion import run_motion

            return run_motion(args)
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
