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


def test_a_rewrite_keeps_exactly_the_rows_given_and_appends_follow_it(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "old", "output": "x.png", "status": "done"}\n', encoding="utf-8")
    (tmp_path / "a.png").write_bytes(b"png")
    keep = [{"id": "a", "output": "a.png", "status": "done"}]
    writer = ManifestWriter(path, keep)
    writer.append([{"id": "b", "output": None, "status": "failed", "error": "bad\nname"}])
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"], "old rows are gone"
    assert list(finished_rows(read_manifest(path), tmp_path)) == [("a", "a.png")]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temporary left"
