"""Dreams whole datasets on a Ray cluster: what ``jaxdream run`` runs.

The only package of jaxdream that imports Ray (:mod:`.manifest` does not). A job config is
planned into work items as its inputs are listed (:func:`jaxdream.planning.plan_stream`: stable
ids without reading an input, deterministic output paths); :mod:`.run` skips what a resumed job
already did, :mod:`.scheduler` takes the rest a chunk at a time, cuts it into units and streams
them to the long-lived workers of :mod:`.pool`, retrying the units of a
worker or node that died a bounded number of times, and :mod:`.manifest` records one row per
item in ``OUTDIR/manifest.jsonl`` as results arrive (flushed and fsync-ed per unit). Re-running
with ``resume=True`` skips every item whose row says done and whose output exists. What this
gives:

* a driver killed mid-job loses at most the units in flight (their rows were never written);
* duplicate completions are harmless: names are deterministic, writes atomic, bytes identical;
* the manifest never lists an output that does not exist: a row is written only after the
  driver sees the file, and a resumed job drops rows whose output has gone missing.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it. Names load on first use, so that
#: ``jaxdream.jobs.manifest`` can be imported (and tested) without Ray.
_WHERE = {
    **dict.fromkeys(["MANIFEST_NAME", "ManifestWriter", "compact_manifest", "compact_rows",
                     "finished_keys", "finished_rows", "item_key", "make_row",
                     "read_manifest", "recipe_params", "unreadable_id"], "manifest"),
    **dict.fromkeys(["DreamWorker", "UnitResult", "Worker", "WorkerPlan", "WorkerPool",
                     "connect", "plan_workers", "worker_env"], "pool"),
    **dict.fromkeys(["PARTS_FOLDER", "PartsWriter", "read_remote_manifest", "remote_finished",
                     "remote_finished_keys"], "parts"),
    "run_remote_job": "remote",
    **dict.fromkeys(["INTAKE", "UNITS_PER_WORKER", "WORKER_WAIT_S", "JobSummary", "Scheduler",
                     "Unit", "make_units"], "scheduler"),
    **dict.fromkeys(["Intake", "clean_temporaries", "run_job"], "run"),
    **dict.fromkeys(["MotionWorker", "Task", "TaskResult", "render_segments_on_ray",
                     "run_tasks", "start_pool"], "motion"),
    **dict.fromkeys(["run_motion_job"], "clips"),
}
__all__ = ["JobError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name == "JobError":
        from jaxdream.errors import JobError

        return JobError
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
