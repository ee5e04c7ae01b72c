"""``jaxdream run CONFIG.yaml [--address ADDRESS] [--resume]``: a whole job, on Ray.

Kept apart from :mod:`jaxdream.cli` so that Ray is imported only when a job runs; ``cli``
registers the command with :func:`add_run_command` and calls :func:`run_command`.
``python -m jaxdream.cli_run`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from jaxdream.errors import ConfigError, JaxdreamError
from jaxdream.outdir import OutputBusy

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

_DESCRIPTION = (
    "Dreams every input of a job config (inputs x grid) with Ray workers and writes "
    "OUTDIR/manifest.jsonl, one row per item as it finishes. Without --address (or "
    "RAY_ADDRESS) the job starts a private Ray instance on this machine; with one it joins "
    "that cluster, whose nodes must all see the output folder. A config with animate: or "
    "video: dreams clips instead: one per input, a video's segments shared among the "
    "workers, a row per segment and per clip. Exit status: 0 all done, "
    "1 some items failed or were not run, 2 the config or options are wrong.")


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="the job config (see configs/)")
    parser.add_argument("--address", default=None, metavar="ADDRESS",
                        help="join the Ray cluster at ADDRESS (host:port, or 'auto'); default: "
                             "$RAY_ADDRESS, else a private Ray instance on this machine")
    parser.add_argument("-o", "--output", default=None, metavar="OUTDIR",
                        help="write into OUTDIR instead of the config's output folder (on a "
                             "cluster: a folder every node sees, e.g. /mnt/shared/...)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="start N workers instead of the config's job.workers")
    parser.add_argument("--resume", action="store_true",
                        help="skip items the manifest records as done whose output exists; "
                             "render the rest")
    parser.add_argument("--force", action="store_true",
                        help="allow the filesystem root or the home folder itself as OUTDIR; "
                             "for a bucket prefix, take over its lock (.jaxdream.lock) from a "
                             "driver that was killed on another host")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_run_command(commands: Any) -> argparse.ArgumentParser:
    """Adds ``run`` to the ``jaxdream`` sub-command parsers (``add_subparsers``' result)."""
    parser = commands.add_parser("run", help="dream a dataset or grid from a config, on Ray",
                                 description=_DESCRIPTION)
    _configure(parser)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Runs the job ``args`` describe; prints progress, errors and a summary on stderr."""
    from jaxdream.config import load_config

    try:
        config = load_config(args.config, {"output": args.output, "workers": args.workers})
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from jaxdream import jobs  # Ray is imported here, once the config is known to be good
    from jaxdream.files import display
    from jaxdream.storage import redact

    try:
        summary = jobs.run_job(config, address=args.address, resume=args.resume,
                               progress=not args.quiet, force=args.force)
    except (ConfigError, OutputBusy) as error:  # nothing ran: wrong options, or a busy folder
        print(f"error: {display(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except JaxdreamError as error:
        print(f"error: {display(str(error))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        where = (f"the manifest parts under {redact(config.output_url)}" if config.output_url
                 else config.output / jobs.MANIFEST_NAME)
        print(f"interrupted; finished outputs are complete and listed in "
              f"{where}; rerun with --resume to finish",
              file=sys.stderr)
        return 130
    print(summary.describe(redact(config.output_url) if config.output_url else config.output),
          file=sys.stderr)
    if summary.stopped:
        print(f"stopped: {display(summary.stopped)}", file=sys.stderr)
    elif summary.not_run:
        print(f"{summary.not_run} item(s) were not run; rerun with --resume to render them",
              file=sys.stderr)
    return summary.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdream run", description=_DESCRIPTION)
    _configure(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
