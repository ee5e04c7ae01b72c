"""What planning a job over a big bucket costs the driver: time and peak memory.

    python benchmarks/storage_planning.py [--inputs 100000] [--variants 1]

A synthetic listing of N image objects (``memory://bench/in/photo_0000000.jpg`` ..., fsspec's
in-memory filesystem: no network, so this measures jaxdream's own work and not a store's
latency) is planned as ``jaxdream run`` plans it: the prefix is listed (``expand_inputs``), each
object gets its identity and every item its id (``plan``), and the resume step matches the
items against a manifest that says all of them are done. No object is read. Reported: seconds
(wall clock and CPU time: on a shared machine the wall clock is mostly waiting) and peak
resident memory growth (``ru_maxrss``) of each step, and the whole. The baseline includes the
in-memory listing itself, which a real bucket does not put in the driver.

This is the planning of today's driver, which holds the whole plan in memory before the first
unit goes out; a driver that dispatches units as planning goes is the next step (issue 13).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    args = parser.parse_args()

    import fsspec

    from jaxdream.inputs import expand_inputs
    from jaxdream.jobs.manifest import item_key
    from jaxdream.jobs.parts import remote_finished
    from jaxdream.recipe import Recipe
    from jaxdream.render import plan

    fs = fsspec.filesystem("memory")
    for index in range(args.inputs):
        fs.pipe_file(f"/bench/in/photo_{index:07d}.jpg", b"x")
    gc.collect()
    base = _rss_mib()
    print(f"{args.inputs} objects in memory://bench/in/; driver at {base:.0f} MiB before "
          f"planning", flush=True)
    start, cpu0 = time.perf_counter(), time.process_time()
    found = expand_inputs(["memory://bench/in/"])
    listed, cpu1 = time.perf_counter(), time.process_time()
    rss_listed = _rss_mib()
    recipe = Recipe(layers=(("block5", 1.0),), steps=1, octaves=1)
    items, failures = plan(found, "memory://bench/out", [(recipe, {})],
                           output_url="memory://bench/out")
    planned, cpu2 = time.perf_counter(), time.process_time()
    rss_planned = _rss_mib()
    outdir = items[0].output.parent
    rows = [{"id": item.id, "output": item_key(item, outdir)[1], "status": "done"}
            for item in items]
    names = {row["output"]: {} for row in rows}
    done = remote_finished(rows, names)
    todo = [item for item in items if item_key(item, outdir) not in done]
    resumed, cpu3 = time.perf_counter(), time.process_time()
    assert len(found) == args.inputs and not failures and not todo
    print(f"list   {listed - start:7.2f} s (cpu {cpu1 - cpu0:6.2f} s)   "
          f"peak +{rss_listed - base:6.0f} MiB")
    print(f"plan   {planned - listed:7.2f} s (cpu {cpu2 - cpu1:6.2f} s)   "
          f"peak +{rss_planned - base:6.0f} MiB ({len(items)} items)")
    print(f"resume {resumed - planned:7.2f} s (cpu {cpu3 - cpu2:6.2f} s)   "
          f"peak +{_rss_mib() - base:6.0f} MiB (all {len(items) - len(todo)} found done)")
    print(f"total  {resumed - start:7.2f} s (cpu {cpu3 - cpu0:6.2f} s)   "
          f"peak {_rss_mib():.0f} MiB resident")


if __name__ == "__main__":
    main()
