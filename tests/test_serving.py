"""Mixed-task serving: a mixed batch equals each task alone; prompt changes never recompile; the CLI."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from prompt_tuning_jax import decoding, network, prompts, scoring, serve, serving

LENGTHS = {"rte": 4, "sst2": 2, "mrpc": 3}  # prompt lengths; the bank pads them to 4
REQUESTS = [("sst2", "great film"), ("rte", "a man sleeps. hypothesis: he rests"),
            ("mrpc", "one. two."), ("rte", "x"), ("sst2", "dull and long, far too long"),
            ("mrpc", "same? same.")]
LABELS = ("yes", "no", "mid")
DECODE_LENGTH = 5
INPUT_LENGTH = 12


@pytest.fixture(scope="module")
def byte_config(tiny_config):
  return tiny_config.replace(vocab_size=384)  # room for the byte vocabulary's 259 ids


@pytest.fixture(scope="module")
def byte_params(byte_config):
  tokens = jnp.ones((1, 4), jnp.int32)
  return nn.unbox(jax.jit(network.T5(byte_config).init)(jax.random.PRNGKey(0), tokens,
                                                         tokens))["params"]


@pytest.fixture(scope="module")
def task_prompts(byte_config):
  rng = np.random.RandomState(0)
  return {task: rng.normal(size=(n, byte_config.emb_dim)).astype(np.float32)
          for task, n in LENGTHS.items()}


@pytest.fixture(scope="module")
def server(byte_config, byte_params, task_prompts):
  """All three tasks in a bank of 4, serving batches of 4."""
  server = serving.PromptServer(byte_config, byte_params, capacity=4, max_prompt_length=4,
                                vocabulary=seqio.ByteVocabulary(), batch_size=4,
                                max_input_length=INPUT_LENGTH, max_decode_length=DECODE_LENGTH)
  for task, prompt in task_prompts.items():
    server.add_prompt(task, prompt)
  return server


def _alone(config, params, prompt, texts):
  """Greedy tokens `[n, DECODE_LENGTH]` and label log-likelihoods `[n, labels]` of a one-prompt model."""
  vocabulary = seqio.ByteVocabulary()
  model = network.T5(config, prompts.PromptConfig(len(prompt)))

  def run(full, inputs, targets):
    tokens, _ = decoding.greedy_decode(model, full, inputs, max_decode_length=DECODE_LENGTH)
    return tokens, scoring.rank_classify(model, full, inputs, targets)[1]
  outputs = jax.jit(run)(serving.with_prompt_bank(params, prompt),
                         serving.encode_inputs(vocabulary, texts, INPUT_LENGTH),
                         serving.encode_labels(vocabulary, LABELS, DECODE_LENGTH))
  return tuple(np.asarray(x) for x in outputs)


def test_mixed_batch_equals_each_task_alone(byte_config, byte_params, task_prompts, server):
  tokens = server.predict_tokens(REQUESTS)  # two batches of 4, the second padded
  scores = server.score(REQUESTS, LABELS)
  assert tokens.shape == (len(REQUESTS), DECODE_LENGTH) and scores.shape == (len(REQUESTS), 3)
  for task, prompt in task_prompts.items():
    rows = [i for i, (t, _) in enumerate(REQUESTS) if t == task]
    alone_tokens, alone_scores = _alone(byte_config, byte_params, prompt,
                                        [REQUESTS[i][1] for i in rows])
    np.testing.assert_array_equal(tokens[rows], alone_tokens)
    np.testing.assert_allclose(scores[rows], alone_scores, atol=1e-5)
  assert server.predict(REQUESTS) == serving.decode_tokens(seqio.ByteVocabulary(), tokens)


def test_prompt_changes_do_not_retrace(server, task_prompts):
  before = server.score(REQUESTS, LABELS)
  server.predict(REQUESTS)
  traces = dict(server.traces)
  server.replace("rte", task_prompts["rte"][:2] * 2)
  server.remove("mrpc")
  server.add_prompt("cola", task_prompts["mrpc"][:1])  # into the freed slot
  requests = [("cola", text) if task == "mrpc" else (task, text) for task, text in REQUESTS]
  changed = server.score(requests, LABELS)
  server.predict(requests)
  server.replace("rte", task_prompts["rte"])
  server.remove("cola")
  server.add_prompt("mrpc", task_prompts["mrpc"])
  restored = server.score(REQUESTS, LABELS)
  assert dict(server.traces) == traces == {"predict": 1, "score": 1}
  rte = [i for i, (task, _) in enumerate(REQUESTS) if task == "rte"]
  sst2 = [i for i, (task, _) in enumerate(REQUESTS) if task == "sst2"]
  assert not np.allclose(before[rte], changed[rte])
  np.testing.assert_array_equal(before[sst2], changed[sst2])
  np.testing.assert_array_equal(before, restored)


def test_length_buckets_give_the_same_outputs_with_one_compile_per_bucket(
    byte_config, byte_params, task_prompts, server):
  bucketed = serving.PromptServer(byte_config, byte_params, capacity=4, max_prompt_length=4,
                                  vocabulary=seqio.ByteVocabulary(), batch_size=4,
                                  max_input_length=INPUT_LENGTH, max_decode_length=DECODE_LENGTH,
                                  length_buckets=(4, 8))
  for task, prompt in task_prompts.items():
    bucketed.add_prompt(task, prompt)
  # Input lengths with EOS (cut at 12): 11 12 10 2 12 12, then 3 2 4. Sorted into batches of 4:
  # 2 2 3 4 in bucket 4, then 10 11 12 12 and 12 at the full 12.
  requests = REQUESTS + [("rte", "ab"), ("sst2", "a"), ("mrpc", "xyz")]
  np.testing.assert_array_equal(bucketed.predict_tokens(requests), server.predict_tokens(requests))
  np.testing.assert_allclose(bucketed.score(requests, LABELS), server.score(requests, LABELS),
                             atol=1e-5)
  assert bucketed.length_buckets == (4, 8, INPUT_LENGTH)
  widths = {len(inputs[0]) for _, inputs, _, _ in bucketed._batches(requests)}  # pylint: disable=protected-access
  assert widths == {4, INPUT_LENGTH} and dict(bucketed.traces) == {"predict": 2, "score": 2}
  with pytest.raises(ValueError, match=r"length_buckets=\[4, 13\]: \[13\] .* max_input_length=12"):
    serving.PromptServer(byte_config, byte_params, 4, 4, seqio.ByteVocabulary(), 4, INPUT_LENGTH,
                         DECODE_LENGTH, length_buckets=[4, 13])


def test_bad_prompts_and_tasks(byte_config, byte_params, task_prompts):
  server = serving.PromptServer(byte_config, byte_params, 2, 4, seqio.ByteVocabulary(), 4,
                                INPUT_LENGTH, DECODE_LENGTH)
  server.add_prompt("rte", task_prompts["rte"])
  with pytest.raises(ValueError, match="already has a prompt"):
    server.add_prompt("rte", task_prompts["rte"])
  with pytest.raises(ValueError, match="max_prompt_length"):
    server.add_prompt("long", np.zeros((5, byte_config.emb_dim), np.float32))
  server.add_prompt("sst2", task_prompts["sst2"])
  with pytest.raises(ValueError, match="bank is full"):
    server.add_prompt("mrpc", task_prompts["mrpc"])
  with pytest.raises(ValueError, match="Unknown task 'cola'"):
    server.predict([("rte", "a"), ("cola", "b")])
  with pytest.raises(ValueError, match="more than the 5"):
    server.score([("rte", "a")], ["a label far too long"])
  for bad in (np.nan, np.inf):
    with pytest.raises(ValueError, match="NaN or Inf"):
      server.replace("rte", np.where(np.eye(4, byte_config.emb_dim) > 0, bad, 0.0))


def test_serve_never_writes_nan(tmp_path, tiny_checkpoint, capsys, monkeypatch):
  """Scores that come out NaN (here from a patched server) are an error; no output is written."""
  np.save(tmp_path / "rte.npy", np.ones((3, 4), np.float32))
  (tmp_path / "in.jsonl").write_text(json.dumps({"task": "rte", "inputs": "a"}) + "\n")
  monkeypatch.setattr(serving.PromptServer, "score",
                      lambda self, requests, labels: np.full((len(requests), len(labels)), np.nan))
  assert serve.main(["--checkpoint", tiny_checkpoint, "--relative_attention_max_distance", "8",
                     "--prompt", f"rte={tmp_path / 'rte.npy'}", "--requests",
                     str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                     "--labels", "rte=yes,no", "--max_decode_length", "4"]) == 2
  error = capsys.readouterr().err
  assert error.startswith("error: Request 1 ('rte') scored NaN or Inf") and error.count("\n") == 1
  assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_dir):
  return str(shared_dir / "checkpoints" / "t5x_t5_1_1_tiny_flaxformer" / "checkpoint_3")


def test_serve_cli(tmp_path, tiny_checkpoint, capsys):
  rng = np.random.RandomState(1)
  for task, n in (("rte", 3), ("sst2", 2)):
    np.save(tmp_path / f"{task}.npy", rng.normal(size=(n, 4)).astype(np.float32))
  requests = [{"task": "rte", "inputs": "premise: a. hypothesis: b."},
              {"task": "sst2", "inputs": "sentence: fine"}, {"task": "rte", "inputs": "c"}]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
  model_args = ["--checkpoint", tiny_checkpoint, "--relative_attention_max_distance", "8",
                "--prompt", f"rte={tmp_path / 'rte.npy'}", "--prompt", f"sst2={tmp_path / 'sst2.npy'}",
                "--batch_size", "2", "--max_input_length", "16", "--max_decode_length", "4"]
  assert serve.main(model_args + [
      "--requests", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
      "--labels", "rte=yes,no"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [(r["task"], r["inputs"]) for r in rows] == [(r["task"], r["inputs"]) for r in requests]
  assert all(isinstance(r["prediction"], str) for r in rows)
  assert list(rows[0]["scores"]) == ["yes", "no"] and "scores" not in rows[1]
  assert all(np.isfinite(list(rows[i]["scores"].values())).all() for i in (0, 2))
  assert serve.main(model_args + [
      "--requests", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "bucketed.jsonl"),
      "--labels", "rte=yes,no", "--length_buckets", "4,8"]) == 0
  bucketed = [json.loads(line) for line in (tmp_path / "bucketed.jsonl").read_text().splitlines()]
  assert [r["prediction"] for r in bucketed] == [r["prediction"] for r in rows]
  np.testing.assert_allclose([list(r["scores"].values()) for r in bucketed if "scores" in r],
                             [list(r["scores"].values()) for r in rows if "scores" in r], atol=1e-5)

  (tmp_path / "bad.jsonl").write_text(json.dumps(requests[0]) + "\n"
                                      + json.dumps({"task": "cola", "inputs": "x"}) + "\n")
  capsys.readouterr()
  assert serve.main(model_args + ["--requests", str(tmp_path / "bad.jsonl"), "--output",
                                  str(tmp_path / "bad_out.jsonl")]) == 2
  error = capsys.readouterr().err.strip()
  assert "\n" not in error and "bad.jsonl:2: unknown task 'cola'" in error
  for buckets, message in (("4,x", "--length_buckets '4,x': expected comma-separated"),
                           ("4,32", "--length_buckets=[4, 32]: [32] not a positive integer up to "
                                    "--max_input_length=16")):
    assert serve.main(model_args + ["--requests", str(tmp_path / "in.jsonl"), "--output",
                                    str(tmp_path / "x.jsonl"), "--length_buckets", buckets]) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "x.jsonl").exists()
  assert serve.main(["--checkpoint", tiny_checkpoint]) == 2
