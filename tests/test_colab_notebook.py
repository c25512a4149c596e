"""colab/quickstart.ipynb runs headlessly on CPU (nbclient + ipykernel) and shows the table and the plot."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = pathlib.Path(__file__).parents[1] / "colab" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "quickstart"))
  monkeypatch.setenv("QUICKSTART_EVAL_BATCHES", "1")  # a small slice keeps the test to about a minute
  monkeypatch.setenv("QUICKSTART_TIMING_REPEATS", "1")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the plot is not shown inline"
  markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert markdown and "| variant |" in markdown[0] and "SmolLM2-135M" in markdown[0]
  assert (tmp_path / "quickstart" / "results.json").exists()
  assert any("perplexity" in o.get("text", "") for o in outputs)
