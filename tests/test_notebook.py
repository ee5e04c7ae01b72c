"""The quick-start notebook runs as written, from the examples folder, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extras "
                                                  "(pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extras")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_shows_its_dreams() -> None:
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # the dream, the two layers, the sweep
    text = "".join(out.get("text", "") for out in outputs)
    assert "programs built for the sweep: 0" in text
