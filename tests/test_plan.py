"""The scale planner: `python -m prompt_tuning_jax.plan` on small configs, over simulated devices."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--gin_file=runs/prompt_finetune.gin", "--gin.MODEL_DIR='/tmp/unused'",
       "--gin.MIXTURE_OR_TASK_NAME='unused'", "--gin.INITIAL_CHECKPOINT_PATH=None"]


def _plan(model_gin: str, mesh: str, device: str, *bindings: str) -> dict:
  command = [sys.executable, "-m", "prompt_tuning_jax.plan", f"--gin_file={model_gin}", *RUN,
             *bindings, f"--mesh={mesh}", f"--device={device}", "--json"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


SMALL = ("models/t5_1_1_lm100k_small_prompt.gin",)
SHORT = ("--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.BATCH_SIZE=8")


def test_small_fits_and_shards_over_the_model_axis():
  one = _plan(*SMALL, "1x1", "tpu_v3", *SHORT)
  model_parallel = _plan(*SMALL, "1x2", "tpu_v3", *SHORT)
  assert one["fits"] and model_parallel["fits"]
  assert one["flops_per_device"] > 0
  # Half of every sharded frozen weight per device.
  assert model_parallel["argument_bytes"] < 0.6 * one["argument_bytes"]


def test_remat_saves_activation_memory_in_the_plan():
  none = _plan(*SMALL, "1x1", "tpu_v3", *SHORT, "--gin.ExecutionConfig.remat_policy='none'")
  full = _plan(*SMALL, "1x1", "tpu_v3", *SHORT, "--gin.ExecutionConfig.remat_policy='full'")
  assert full["temporary_bytes"] < 0.8 * none["temporary_bytes"], (full, none)


def test_scanned_layers_plan_like_unrolled_layers():
  unrolled = _plan(*SMALL, "1x2", "tpu_v3", *SHORT, "--gin.ExecutionConfig.remat_policy='full'")
  scanned = _plan(*SMALL, "1x2", "tpu_v3", *SHORT, "--gin.ExecutionConfig.remat_policy='full'",
                  "--gin.ExecutionConfig.scan_layers=True")
  assert scanned["fits"]
  # XLA counts a loop's body once; the plan counts every layer.
  assert scanned["flops_per_device"] == pytest.approx(unrolled["flops_per_device"], rel=0.005)
  # The same weights per device; activations within a factor of two of the unrolled program's.
  assert abs(scanned["argument_bytes"] - unrolled["argument_bytes"]) < 0.01 * unrolled["argument_bytes"]
  assert 0.5 < scanned["temporary_bytes"] / unrolled["temporary_bytes"] < 2


def test_bad_mesh_is_one_line_error():
  done = subprocess.run([sys.executable, "-m", "prompt_tuning_jax.plan", "--mesh=2y2",
                         "--device=tpu_v3"], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 2 and "DATAxMODEL" in done.stderr


XXL = ("models/t5_1_1_lm100k_xxl_prompt.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 8}",
       "--gin.t5_config.dtype='bfloat16'", "--gin.ExecutionConfig.remat_policy='full'")


@pytest.mark.skipif(not os.environ.get("RUN_BENCHMARKS"),
                    reason="compiles XXL over 32 simulated devices (minutes); set RUN_BENCHMARKS=1")
def test_xxl_fits_a_v3_32_slice_with_model_parallelism_but_not_one_core():
  assert _plan(XXL[0], "2x16", "tpu_v3", *XXL[1:])["fits"]
  assert not _plan(XXL[0], "1x1", "tpu_v3", *XXL[1:])["fits"]
