"""Every notebook in notebooks/ is committed executed (outputs and plots stored, for readers) and
still runs top to bottom on CPU. The test executes an in-memory copy: the committed files never
change."""
import pathlib

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Run top to bottom by test_notebook_runs; the SPoT notebook takes about 90 s, and its recipe is run
# directly by tests/test_spot.py.
RUN_NOTEBOOKS = [path for path in NOTEBOOKS if path.name != "04_spot_transfer.ipynb"]
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
  assert [path.name for path in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_many_prompts.ipynb", "03_bring_your_checkpoint.ipynb",
      "04_spot_transfer.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_executed(path):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
      f"{path.name}: run it top to bottom and save it with its outputs (notebooks/execute.py)")
  outputs = [output for cell in code for output in cell.outputs]
  assert outputs and not [output for output in outputs if output.output_type == "error"]
  if path.name == "01_quickstart.ipynb":
    assert any("image/png" in output.get("data", {}) for output in outputs)


@pytest.mark.parametrize("path", RUN_NOTEBOOKS, ids=[path.stem for path in RUN_NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks write under tempfile.mkdtemp()
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors
