"""Data and model parallel training on 8 simulated CPU devices equals the 1-device run, also with
scanned layers and with the `"cpu"` attention."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def test_meshes_8x1_4x2_2x4_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(HERE / "sharded_training_run.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  reference = results.pop("1x1")
  assert reference["losses"][2] != reference["losses"][0]
  for mesh, result in results.items():
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5, err_msg=mesh)
    np.testing.assert_allclose(result["prompt"], reference["prompt"], atol=1e-5, err_msg=mesh)
  # The model axis really shards the frozen MLP kernel (mlp axis -> model).
  assert results["4x2"]["kernel_shards"] == 2 and results["2x4"]["kernel_shards"] == 4
  assert results["2x4 scanned layers"]["kernel_shards"] == 4
  assert results["2x4 cpu attention"]["kernel_shards"] == 4
  assert results["8x1"]["kernel_shards"] == 1
