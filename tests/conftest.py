"""Shared test fixtures: paths to the real data in ../shared, and one tiny model compiled once.

Tests that read ../shared take the `shared_dir` fixture or the mark `needs_shared(path)`. Where the
data is missing they are skipped, except under `CI=true`, where the data must be present and they
fail instead.
"""
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from prompt_tuning_jax import config, demo, network

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
T5X_TINY_CHECKPOINT = SHARED / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3"


def pytest_configure(config):  # pylint: disable=redefined-outer-name (pytest's hook argument)
  config.addinivalue_line(
      "markers", "needs_shared(path): the test reads `path` (default ../shared itself); skipped "
      "where it is missing, failed under CI=true")


def require_shared(path: pathlib.Path = SHARED) -> None:
  """Skips the running test when `path` under ../shared is missing; fails it under CI=true."""
  if path.exists():
    return
  message = f"{path} (the project's shared real data) is not present"
  if os.environ.get("CI") == "true":
    pytest.fail(f"{message}; CI=true runs every test on the shared data", pytrace=False)
  pytest.skip(message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  for mark in item.iter_markers("needs_shared"):
    require_shared(*mark.args)


@pytest.fixture(scope="session", autouse=True)
def demo_checkpoint() -> str:
  """The bundled demo model, its weights generated once (they are not committed)."""
  return demo.ensure_demo_checkpoint()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  require_shared()
  return SHARED


@pytest.fixture(scope="session")
def tiny_config() -> config.T5Config:
  """T5 1.1 tiny with a small vocabulary, so tests stay fast."""
  return config.t5_config("t5_1_1", "tiny", vocab_size=64, emb_dim=8, num_heads=2, head_dim=4,
                          mlp_dim=16)


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
  """Random params of the plain (prompt-free) tiny model."""
  tokens = jnp.ones((1, 4), jnp.int32)
  init = jax.jit(network.T5(tiny_config).init)
  return nn.unbox(init(jax.random.PRNGKey(0), tokens, tokens))["params"]
