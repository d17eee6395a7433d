"""`benchmarks/reliability.py --quick`: one kill, one corruption, two catalogue cases, all survived
(the table of a full run is in benchmarks/README.md)."""
import json
import os
import subprocess
import sys

import pytest

from test_train_e2e import REPO_ROOT, SHARED

pytestmark = pytest.mark.needs_shared(SHARED)  # the catalogue's cases read ../shared


def test_quick_run_survives_and_writes_the_table(tmp_path):
  output = tmp_path / "reliability.json"
  result = subprocess.run([sys.executable, "-m", "benchmarks.reliability", "--quick", "--output",
                           str(output)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| kill | 1/1 |" in result.stdout, result.stdout
  results = json.loads(output.read_text())
  summary = results["summary"]
  assert {name: row["tried"] for name, row in summary.items()} == {
      "kill": 1, "corruption": 1, "bad_input": 2}
  assert all(row["survived"] == row["tried"] for row in summary.values()), summary
  assert summary["bad_input"]["clean"] == 2, results["tries"]
  assert [t["name"] for t in results["tries"] if t["class"] == "bad_input"] == [
      "unknown_task", "unknown_macro"]
