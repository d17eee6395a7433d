"""Task registration, data lookup and errors, and user task modules."""
import importlib
import json
import sys
import textwrap

import gin
import pytest
import seqio

from prompt_tuning_jax import tasks
from prompt_tuning_jax.tasks import sources

OFFICIAL_TASK_NAMES = [
    "super_glue_rte_v102", "taskless_super_glue_rte_v102", "super_glue_boolq_v102",
    "super_glue_cb_v102", "super_glue_copa_v102", "super_glue_multirc_v102",
    "super_glue_record_v102", "super_glue_wic_v102", "super_glue_axb_v102", "super_glue_axg_v102",
    "super_glue_wsc_v102_simple_train", "super_glue_wsc_v102_simple_eval",
    "taskless_super_glue_wsc_v102_simple_eval",
    "glue_cola_v002", "glue_sst2_v002", "glue_mrpc_v002", "taskless_glue_mrpc_v002",
    "glue_qqp_v002", "glue_stsb_v002", "glue_mnli_v002", "glue_mnli_matched_v002",
    "glue_mnli_mismatched_v002", "glue_qnli_v002", "glue_rte_v002", "glue_wnli_v002",
    "glue_mrpc_from_qqp_v002", "taskless_glue_qqp_from_mrpc_v002",
    "squad_v010_allanswers", "mrqa_textbookqa_v001", "mrqa_bioasq_v001", "mrqa_race_v001",
    "mrqa_relation_extraction_v001", "mrqa_duorc_v001", "mrqa_drop_v001",
    "byt5_taskless_super_glue_rte_v102", "mt5_taskless_glue_mrpc_v002", "mt5_squad_v010_allanswers",
]
OFFICIAL_MIXTURE_NAMES = [
    "super_glue_v102_proportional", "taskless_super_glue_v102_proportional",
    "super_glue_wsc_and_dev_v102_simple", "glue_v002_proportional", "glue_mnli_and_dev_v002",
    "glue_mrpc_from_qqp_zeroshot_v002", "taskless_glue_qqp_from_mrpc_zeroshot_v002",
    "squad_to_textbookqa", "squad_to_mrqa", "byt5_squad_to_drop", "mt5_glue_v002_proportional",
]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_official_names_are_registered():
  assert set(OFFICIAL_TASK_NAMES) <= set(seqio.TaskRegistry.names())
  assert set(OFFICIAL_MIXTURE_NAMES) <= set(seqio.MixtureRegistry.names())
  # 11 SuperGLUE + 11 GLUE + 2 transfer tasks in 2 forms, 7 QA tasks; each for 3 vocabularies.
  assert len(tasks.TASK_NAMES) == len(set(tasks.TASK_NAMES)) == (22 * 2 + 2 * 2 + 7) * 3


def test_registering_again_does_not_fail():
  assert tasks.register_all() == list(tasks.TASK_NAMES)
  importlib.reload(tasks)
  assert seqio.get_mixture_or_task("taskless_super_glue_rte_v102").name == (
      "taskless_super_glue_rte_v102")


def test_mixtures_hold_the_right_tasks():
  wsc = seqio.get_mixture_or_task("taskless_super_glue_wsc_and_dev_v102_simple")
  assert sorted(t.name for t in wsc.tasks) == [
      "taskless_super_glue_wsc_v102_simple_eval", "taskless_super_glue_wsc_v102_simple_train"]
  transfer = seqio.get_mixture_or_task("glue_mrpc_from_qqp_zeroshot_v002")
  assert sorted(t.name for t in transfer.tasks) == ["glue_mrpc_from_qqp_v002", "glue_qqp_v002"]
  glue = seqio.get_mixture_or_task("glue_v002_proportional")
  assert glue.get_rate(seqio.get_mixture_or_task("glue_rte_v002")) == 2490
  byt5_squad = seqio.get_mixture_or_task("byt5_squad_to_drop")
  assert sorted(t.name for t in byt5_squad.tasks) == [
      "byt5_mrqa_drop_v001", "byt5_squad_v010_allanswers"]


def test_vocabularies_of_the_variants():
  t5 = seqio.get_mixture_or_task("super_glue_rte_v102").output_features
  assert t5["inputs"].vocabulary.vocab_size == 32100
  assert t5["inputs"].add_eos and t5["targets"].add_eos
  byt5 = seqio.get_mixture_or_task("byt5_super_glue_rte_v102").output_features
  assert isinstance(byt5["targets"].vocabulary, seqio.ByteVocabulary)
  mt5 = seqio.get_mixture_or_task("mt5_super_glue_rte_v102").output_features
  assert mt5["inputs"].vocabulary.sentencepiece_model_file == (
      "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model")


def test_missing_data_error_names_every_place_looked_at(tmp_path, monkeypatch):
  monkeypatch.setenv("PROMPT_TUNING_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  task = seqio.get_mixture_or_task("super_glue_rte_v102")
  with pytest.raises(tasks.DataNotFoundError) as error:
    task.get_dataset(sequence_length=None, split="validation", shuffle=False)
  message = str(error.value)
  assert "SuperGLUE RTE" in message
  assert str(tmp_path / "data" / "superglue" / "RTE" / "val.jsonl") in message
  assert f"TFDS super_glue/rte under {tmp_path / 'tfds'}" in message
  assert "$PROMPT_TUNING_DATA_DIR" in message and "--gin.DATA_DIR" in message

  monkeypatch.delenv("PROMPT_TUNING_DATA_DIR")
  with pytest.raises(tasks.DataNotFoundError, match="PROMPT_TUNING_DATA_DIR and gin DATA_DIR unset"):
    task.get_dataset(sequence_length=None, split="validation", shuffle=False)


def test_gin_data_dir_macro_is_read_when_the_data_is(tmp_path, monkeypatch):
  monkeypatch.setenv("PROMPT_TUNING_DATA_DIR", str(tmp_path / "elsewhere"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  rte = tmp_path / "data" / "superglue" / "RTE"
  rte.mkdir(parents=True)
  (rte / "val.jsonl").write_text(json.dumps(
      {"premise": "A dog barks.", "hypothesis": "An animal makes a sound.",
       "label": "entailment", "idx": 0}) + "\n")
  gin.parse_config(f"DATA_DIR = '{tmp_path / 'data'}'")
  [example] = tasks.get_examples("super_glue_rte_v102", "validation")
  assert example["inputs_pretokenized"] == (
      "rte hypothesis: An animal makes a sound. premise: A dog barks.")
  assert example["targets_pretokenized"] == "entailment"


def test_prepared_tfds_data_is_preferred(tmp_path, monkeypatch):
  for version in ("1.0.0", "1.0.2", "1.0.10"):
    (tmp_path / "super_glue" / "rte" / version).mkdir(parents=True)
  assert sources.prepared_tfds_name("super_glue/rte", str(tmp_path)) is None
  (tmp_path / "super_glue/rte/1.0.2/dataset_info.json").write_text("{}")
  (tmp_path / "super_glue/rte/1.0.10/dataset_info.json").write_text("{}")
  assert sources.prepared_tfds_name("super_glue/rte", str(tmp_path)) == "super_glue/rte:1.0.10"
  assert sources.prepared_tfds_name("super_glue/rte:1.0.2", str(tmp_path)) == "super_glue/rte:1.0.2"
  assert sources.prepared_tfds_name("super_glue/cb", str(tmp_path)) is None

  read = {}

  class FakeTfdsDataSource:

    def __init__(self, tfds_name, tfds_data_dir, splits):
      read.update(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits)

    def get_dataset(self, split, shuffle, seed, shard_info):
      return f"tfds {split}"

  monkeypatch.setattr(sources.seqio, "TfdsDataSource", FakeTfdsDataSource)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  monkeypatch.delenv("PROMPT_TUNING_DATA_DIR", raising=False)
  source = seqio.get_mixture_or_task("super_glue_rte_v102").source
  assert source.get_dataset(split="validation", shuffle=False) == "tfds validation"
  assert read == {"tfds_name": "super_glue/rte:1.0.10", "tfds_data_dir": str(tmp_path),
                  "splits": {"validation": "validation"}}


USER_MODULE = '''
"""A user's own task, registered with the package's helpers."""
import functools

import tensorflow as tf

from prompt_tuning_jax import tasks
from prompt_tuning_jax.tasks import metrics, postprocessors, preprocessors, readers

LABELS = ("negative", "positive")

tasks.add_task(
    "user_movie_sentiment_v1",
    source=tasks.LocalOrTfdsSource(
        name="movie sentiment",
        local_files={{"validation": [{path!r}]}},
        reader=readers.read_jsonl,
        features={{"sentence": tf.TensorSpec([], tf.string),
                   "label": tf.TensorSpec([], tf.int32),
                   "idx": tf.TensorSpec([], tf.int32)}}),
    text_preprocessors=[functools.partial(
        preprocessors.glue_text, benchmark_name="sentiment", label_names=LABELS)],
    postprocess_fn=functools.partial(postprocessors.label_to_id, label_names=LABELS),
    metric_fns=[metrics.accuracy, metrics.invalid_prediction_rate])
'''


def test_user_task_module_from_gin(tmp_path, monkeypatch):
  data = tmp_path / "movies.jsonl"
  data.write_text(json.dumps({"sentence": "A delight.", "label": 1, "idx": 0}) + "\n")
  (tmp_path / "my_movie_tasks.py").write_text(USER_MODULE.format(path=str(data)))
  monkeypatch.syspath_prepend(str(tmp_path))
  gin.parse_config("MIXTURE_OR_TASK_MODULE = 'my_movie_tasks'")

  tasks.import_task_module(gin.query_parameter("%MIXTURE_OR_TASK_MODULE"))

  [example] = tasks.get_examples("user_movie_sentiment_v1", "validation")
  assert example["inputs_pretokenized"] == "sentiment sentence: A delight."
  assert example["targets_pretokenized"] == "positive"
  assert example["targets"] == [1465, 1]
  task = seqio.get_mixture_or_task("user_movie_sentiment_v1")
  assert task.postprocess_fn(b"positive") == 1
  monkeypatch.delitem(sys.modules, "my_movie_tasks")
  seqio.TaskRegistry.remove("user_movie_sentiment_v1")


def test_import_task_module_errors(tmp_path, monkeypatch):
  with pytest.raises(ImportError, match="MIXTURE_OR_TASK_MODULE 'no_such_tasks_module'"):
    tasks.import_task_module("no_such_tasks_module")
  # A module that exists but fails inside keeps its own error.
  (tmp_path / "broken_tasks.py").write_text(textwrap.dedent("""
      import a_dependency_that_is_missing
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
    tasks.import_task_module("broken_tasks")
