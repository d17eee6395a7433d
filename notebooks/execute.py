"""Runs notebooks top to bottom and saves them with their outputs, as they are committed.

  .venv/bin/python notebooks/execute.py [notebooks/01_quickstart.ipynb ...]   (default: all)

Each runs in a fresh kernel from a scratch directory, with matplotlib drawing inline PNGs. The C++
log lines that TensorFlow and XLA print on start (oneDNN, CUDA not found) are left out of the stored
outputs; everything else is kept.
"""
import os
import pathlib
import re
import sys
import tempfile

import nbclient
import nbformat

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT_S = 600
# absl's C++ log lines (`I0000 00:00:1796493296.125078   13316 port.cc:153] ...`), their preamble.
_CPP_LOG = re.compile(r"[IWE]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+\] .*"
                      r"|WARNING: All log messages before absl::InitializeLog\(\) is called .*")


def without_cpp_logs(notebook: nbformat.NotebookNode) -> None:
  """Drops the C++ log lines from the stderr outputs, and outputs left empty."""
  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    kept = []
    for output in cell.outputs:
      if output.output_type == "stream" and output.name == "stderr":
        output.text = "".join(line for line in output.text.splitlines(keepends=True)
                              if not _CPP_LOG.fullmatch(line.rstrip("\n")))
        if not output.text:
          continue
      kept.append(output)
    cell.outputs = kept


def execute(path: pathlib.Path) -> None:
  """Executes the notebook at `path` and saves it with its outputs."""
  notebook = nbformat.read(path, as_version=4)
  with tempfile.TemporaryDirectory() as scratch:
    nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": scratch}}).execute()
  without_cpp_logs(notebook)
  nbformat.write(notebook, path)


def main() -> None:
  os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend stores the plots
  paths = [pathlib.Path(p) for p in sys.argv[1:]] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
  for path in paths:
    print(f"executing {path}", flush=True)
    execute(path)


if __name__ == "__main__":
  main()
