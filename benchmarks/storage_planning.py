"""What planning a job over a big bucket costs the driver: time to the first unit, total
planning time, and peak memory, for a fresh run and for a ``--resume`` of it.

    python benchmarks/storage_planning.py [--inputs 100000] [--done 0.5]

A synthetic listing of N image objects (``memory://bench/in/photo_0000000.jpg`` ..., fsspec's
in-memory filesystem: no network, so this measures jaxdream's own work and not a store's
latency) is run as ``jaxdream run`` runs a job whose input and output are buckets
(:func:`jaxdream.jobs.remote.run_remote_job`, unchanged), except that the workers are replaced:
the real :class:`~jaxdream.jobs.scheduler.Scheduler` is built on the streamed plan (its first
unit is then ready to send: *first unit*), and its queue is emptied as fast as it fills,
as if units were rendered instantly, until the plan ends (*planned*); then the manifest is
compacted as at the end of a job (*end*). No object is read.

``fresh``: nothing done yet. ``resume``: the output prefix already holds a compacted
``manifest.jsonl`` with a realistic row (recipe and all, as a job writes them) for the first
``--done`` fraction of the items and their output objects; ``--resume`` must find them all
done and plan only the rest. Each phase runs in a process of its own, so that each peak
resident memory (``ru_maxrss``) is its own; ``store`` is the resident memory of the in-memory
bucket itself before the job starts (a real bucket does not live in the driver), ``peak`` the
process's peak, and ``driver`` their difference: what the job added.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm", encoding="ascii") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs(inputs: int) -> Any:
    import fsspec

    fs = fsspec.filesystem("memory")
    for index in range(inputs):
        fs.pipe_file(f"/bench/in/photo_{index:07d}.jpg", b"x")
    fs.pipe_file("/bench/out/.keep", b"")
    return fs


def _prepare(inputs: int, done: float, config_path: str, folder: str) -> None:
    """Writes the manifest (and the names of the outputs) of a job whose first ``done``
    fraction of items is finished, made by the job's own planning and row code."""
    from jaxdream.config import load_config
    from jaxdream.jobs.manifest import _dumps, make_row
    from jaxdream.planning import plan_stream
    from jaxdream.render import Outcome

    _inputs(inputs)
    config = load_config(config_path)
    count = int(inputs * done)
    with (open(os.path.join(folder, "manifest.jsonl"), "wb") as manifest,
          open(os.path.join(folder, "outputs.txt"), "w", encoding="utf-8") as names):
        for number, item in enumerate(plan_stream(config)):
            if number == count:
                break
            outcome = Outcome(item.input, item.output, "done", "", item.id, 1.0, "0" * 64)
            manifest.write(_dumps(make_row(item, outcome, item.id, config.output,
                                           worker="w", node="n", attempt=1)).encode())
            names.write(item.output.name + "\n")


def _phase(phase: str, inputs: int, config_path: str, folder: str) -> dict[str, Any]:
    """One run (fresh or resume) in this process; returns its figures."""
    import jaxdream.jobs.remote as remote
    from jaxdream.config import load_config
    from jaxdream.jobs.scheduler import Scheduler

    fs = _inputs(inputs)
    if phase == "resume":
        with open(os.path.join(folder, "manifest.jsonl"), "rb") as file:
            fs.pipe_file("/bench/out/manifest.jsonl", file.read())
        with open(os.path.join(folder, "outputs.txt"), encoding="utf-8") as file:
            for name in file:
                fs.pipe_file(f"/bench/out/{name.strip()}", b"png")
    config = load_config(config_path)
    gc.collect()
    store = _now_mib()
    marks: dict[str, float] = {}
    start = time.perf_counter()
    cpu0 = time.process_time()

    def schedule(config: Any, todo: Any, writer: Any, summary: Any, **_: Any) -> None:
        scheduler = Scheduler(config, todo, writer, summary, say=print, progress=False,
                              on_rows=None, worker_wait_s=1)
        marks["first"] = time.perf_counter() - start
        marks["first_cpu"] = time.process_time() - cpu0
        marks["first_rss"] = _now_mib()
        while not scheduler.exhausted:
            scheduler.queue.clear()  # rendered at once
            scheduler._top_up()
        marks["planned"] = time.perf_counter() - start

    remote.schedule = schedule  # type: ignore[assignment]
    lines: list[str] = []
    summary = remote.run_remote_job(config, resume=phase == "resume", progress=False,
                                    say=lines.append)
    return {"phase": phase, "inputs": inputs, "planned": summary.planned,
            "already_done": summary.already_done, "first_s": marks["first"],
            "planned_s": marks["planned"], "end_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu0, "first_cpu_s": marks["first_cpu"],
            "first_rss_mib": marks["first_rss"], "store_mib": store, "peak_mib": _rss_mib(),
            "say": lines[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--done", type=float, default=0.5,
                        help="fraction of the items already done before the resume")
    parser.add_argument("--phase", choices=("prepare", "fresh", "resume"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        config = os.path.join(args.folder, "job.yaml")
        if args.phase == "prepare":
            _prepare(args.inputs, args.done, config, args.folder)
        else:
            print(json.dumps(_phase(args.phase, args.inputs, config, args.folder)))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "job.yaml"), "w", encoding="utf-8") as file:
            file.write("inputs: memory://bench/in/\noutput: memory://bench/out/\n"
                       "max_side: 64\ndream: {layers: block5, steps: 1, octaves: 1}\n")
        for phase in ("prepare", "fresh", "resume"):
            result = subprocess.run(
                [sys.executable, __file__, "--phase", phase, "--inputs", str(args.inputs),
                 "--done", str(args.done), "--folder", folder],
                capture_output=True, text=True, check=False)
            if result.returncode:
                sys.exit(f"{phase} failed:\n{result.stderr[-3000:]}")
            if phase == "prepare":
                continue
            got = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{phase:6s} {got['inputs']} inputs, {got['already_done']} already done: "
                  f"first unit {got['first_s']:6.2f} s (cpu {got['first_cpu_s']:6.2f} s), "
                  f"planned {got['planned_s']:6.2f} s, end {got['end_s']:6.2f} s "
                  f"(cpu {got['cpu_s']:6.2f} s); peak {got['peak_mib']:5.0f} MiB resident "
                  f"(store {got['store_mib']:5.0f} MiB, driver +"
                  f"{got['peak_mib'] - got['store_mib']:5.0f} MiB; at the first unit "
                  f"{got['first_rss_mib']:5.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
