"""Makes the demo's frozen model, `demo_data/random_t5/`: a small T5 1.0 with random weights.

A prompt can only steer a frozen model towards answers the model can say. The T5X test checkpoint
(embed 4) almost never makes a vocabulary token its argmax, whatever the prompt. With embed 192 a
prompt of 20 positions can steer this model's decoder to say a class label, although its weights
are T5X's random initialisation: it knows no language, so a prompt trained on it learns the answer
format, not the task.

Writes a Hugging Face T5 directory (`config.json`, `model.safetensors` in bfloat16, 15 MB) that
`checkpoints.load_checkpoint` reads, reloads it, and prints its size and the sha256 of the weights.
The weights are not committed: `demo.ensure_demo_checkpoint` writes them (`write`) the first time
the demo, a test or a notebook needs them.

  .venv/bin/python prompt_tuning_jax/demo_data/make_demo_model.py
"""
import argparse
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax

from prompt_tuning_jax import checkpoints, config, hf_checkpoint, trees

# T5 1.0: ReLU MLP, logits tied to the embedding (no second vocabulary-sized matrix to store).
CONFIG = config.t5_config("t5_1_0", "small", emb_dim=192, num_heads=4, head_dim=48, mlp_dim=384,
                          num_encoder_layers=2, num_decoder_layers=2)
SEED = 0
WEIGHTS_FILE = "model.safetensors"


def hf_config() -> dict:
  """CONFIG as a Hugging Face `config.json`."""
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": CONFIG.vocab_size, "d_model": CONFIG.emb_dim, "d_kv": CONFIG.head_dim,
      "d_ff": CONFIG.mlp_dim, "num_heads": CONFIG.num_heads,
      "num_layers": CONFIG.num_encoder_layers, "num_decoder_layers": CONFIG.num_decoder_layers,
      "feed_forward_proj": "relu",
      "relative_attention_num_buckets": CONFIG.relative_attention_num_buckets,
      "relative_attention_max_distance": CONFIG.relative_attention_max_distance,
      "dropout_rate": 0.0, "layer_norm_epsilon": CONFIG.layer_norm_epsilon,
      "tie_word_embeddings": True, "is_encoder_decoder": True, "decoder_start_token_id": 0,
      "pad_token_id": 0, "eos_token_id": 1,
  }


def save(flat: dict[str, np.ndarray], output_dir: str) -> None:
  """Writes `flat` as a Hugging Face T5 directory; `[in, out]` kernels become `[out, in]`."""
  os.makedirs(output_dir, exist_ok=True)
  tensors = {}
  # The loader's own name map, so that the directory reads back into exactly these parameters.
  for ours, theirs in hf_checkpoint.name_map(CONFIG).items():
    array = np.asarray(flat[ours])
    if array.ndim == 2 and ours != "token_embedder/embedding":
      array = array.T
    tensors[theirs] = jnp.asarray(array, jnp.bfloat16)
  safetensors.flax.save_file(tensors, os.path.join(output_dir, WEIGHTS_FILE),
                             metadata={"format": "pt"})
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf_config(), f, indent=2)
    f.write("\n")


def write(output_dir: str) -> dict[str, np.ndarray]:
  """Writes the demo model, from T5X's initialisers with `SEED`, to `output_dir`; returns its
  parameters (float32, before the cast to bfloat16)."""
  params = checkpoints.init_params(CONFIG, jax.random.PRNGKey(SEED))
  save(params, output_dir)
  return params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__), "random_t5"))
  args = parser.parse_args()
  params = write(args.output_dir)
  loaded_config, loaded = checkpoints.load_checkpoint(args.output_dir)
  assert loaded_config == CONFIG, (loaded_config, CONFIG)
  for name, value in trees.flatten(loaded).items():
    np.testing.assert_array_equal(value, np.asarray(jnp.asarray(params[name], jnp.bfloat16),
                                                    np.float32), err_msg=name)
  path = os.path.join(args.output_dir, WEIGHTS_FILE)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  print(f"wrote {args.output_dir}: {checkpoints.count_params(checkpoints.param_shapes(CONFIG)):,} "
        f"parameters, {os.path.getsize(path) / 1e6:.1f} MB, sha256 of {WEIGHTS_FILE} {digest}")


if __name__ == "__main__":
  main()
