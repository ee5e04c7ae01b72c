"""The job manifest on its own: no Ray, no cluster, milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jaxdream.jobs.manifest import ManifestWriter, finished_rows, read_manifest


def test_the_manifest_module_does_not_import_ray() -> None:
    code = "import sys, jaxdream.jobs.manifest; assert 'ray' not in sys.modules, 'ray'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_opening_rebuilds_from_what_exists_and_appends_follow_it(tmp_path: Path) -> None:
    """The manifest is never replaced with less than it held: opening keeps every item's last
    row (and rows of other jobs) and drops only done rows whose output is gone."""
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "gone", "input": "g", "output": "x.png", "status": "done"}\n'
                    '{"id": "a", "input": "a", "output": null, "status": "failed"}\n'
                    '{"id": "a", "input": "a", "output": "a.png", "status": "done"}\n'
                    '{"id": "other", "input": "o", "output": "o.png", "status": "done"}\n'
                    '{"id": "torn", "inp', encoding="utf-8")
    for name in ("a.png", "o.png"):
        (tmp_path / name).write_bytes(b"png")
    writer = ManifestWriter(path, tmp_path)
    writer.append([{"id": "b", "output": None, "status": "failed", "error": "bad\nname"}])
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "other", "b"]
    assert list(finished_rows(read_manifest(path), tmp_path)) == [("a", "a.png"),
                                                                  ("other", "o.png")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temporary left"
