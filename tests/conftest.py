"""Shared test fixtures: paths to the real data in ../shared, and one tiny model compiled once."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from prompt_tuning_jax import config, network

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
T5X_TINY_CHECKPOINT = SHARED / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} (the project's shared real data) is not present")
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
