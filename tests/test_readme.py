"""The README's Python API example runs as written, on the real T5X test checkpoint."""
import re

from conftest import REPO_ROOT, T5X_TINY_CHECKPOINT


def test_readme_python_example_runs(shared_dir):
  readme = (REPO_ROOT / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  code = code.replace("/path/to/t5_1_1_lm100k_base/checkpoint_1100000", str(T5X_TINY_CHECKPOINT))
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape[:2] == namespace["targets"].shape
  assert namespace["label_scores"].shape == (1, 2)
  assert namespace["tokens"].shape == (1, 8)
