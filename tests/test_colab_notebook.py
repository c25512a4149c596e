"""The colab/ notebooks run headlessly on CPU (nbclient + ipykernel) and show their tables and plots."""
import json
import math
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

COLAB = pathlib.Path(__file__).parents[1] / "colab"
NOTEBOOK = COLAB / "quickstart.ipynb"


def _execute(notebook_path, tmp_path):
  """Runs the notebook in a fresh kernel (cwd tmp_path); its code cells' outputs, after checking none is an error."""
  notebook = nbformat.read(notebook_path, as_version=4)
  client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the plot is not shown inline"
  return outputs, [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "quickstart"))
  monkeypatch.setenv("QUICKSTART_EVAL_BATCHES", "1")  # a small slice keeps the test to about a minute
  monkeypatch.setenv("QUICKSTART_TIMING_REPEATS", "1")
  outputs, markdown = _execute(NOTEBOOK, tmp_path)
  assert markdown and "| variant |" in markdown[0] and "SmolLM2-135M" in markdown[0]
  assert (tmp_path / "quickstart" / "results.json").exists()
  assert any("perplexity" in o.get("text", "") for o in outputs)


def test_quantize_and_finetune_notebook_executes(tmp_path, monkeypatch):
  workdir = tmp_path / "qft"
  # One 4x64-token validation batch, 3 QLoRA steps, adapters on the last block (the backward stops there).
  for name, value in {"QFT_WORKDIR": str(workdir), "QFT_EVAL_BATCHES": "1", "QFT_SEQ_LEN": "64", "QFT_STEPS": "3",
                      "QFT_LORA_LAST_BLOCKS": "1"}.items():
    monkeypatch.setenv(name, value)
  _, markdown = _execute(COLAB / "quantize_and_finetune.ipynb", tmp_path)
  table = next(m for m in markdown if "| variant |" in m)
  results = json.loads((workdir / "results.json").read_text())
  variants = results["variants"]
  assert list(variants) == ["float32", "int8 per-channel", "nf4 g64 (double-quant)"]
  assert all(f"| {name} |" in table for name in variants)
  float_ppl = variants["float32"]["perplexity"]
  assert math.isfinite(float_ppl) and 5 < float_ppl < 100
  assert abs(variants["int8 per-channel"]["perplexity"] / float_ppl - 1) < 0.02
  assert 1.0 <= variants["nf4 g64 (double-quant)"]["perplexity"] / float_ppl < 1.4
  assert variants["float32"]["projection_bytes_per_param"] == 4.0
  assert 1.0 < variants["int8 per-channel"]["projection_bytes_per_param"] < 1.02
  assert 0.5 < variants["nf4 g64 (double-quant)"]["projection_bytes_per_param"] < 0.55
  qlora = results["qlora"]
  assert qlora["validation_after"]["loss"] < qlora["validation_before"]["loss"]
  assert len(qlora["training_loss"]) == 3 and all(math.isfinite(x) for x in qlora["training_loss"])
  assert 0 < qlora["trainable_parameters"] < 0.05 * qlora["total_parameters"]
  assert os.path.exists(workdir / "quantize_and_finetune.png")
