"""Registered tasks turn the real files into T5's text formats and the real T5 token ids.

The data directory is ../shared/data, arranged as a user's would be: the real task directories
as they are, samples standing in for the files that are not shared (full QQP/MNLI, ReCoRD
validation, MRQA sets) and small hand-written files in the official layout for CoLA, STS-B, QNLI,
WNLI and AX-b/AX-g, which are not shared at all.
"""
import gzip
import json
import pathlib

import pytest
import seqio

from prompt_tuning_jax import tasks
from prompt_tuning_jax import vocabularies

DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.needs_shared(DATA_DIR)
EOS = 1


def _link(root: pathlib.Path, link: str, target: pathlib.Path):
  (root / link).parent.mkdir(parents=True, exist_ok=True)
  (root / link).symlink_to(target)


def _write(root: pathlib.Path, name: str, text: str):
  (root / name).parent.mkdir(parents=True, exist_ok=True)
  (root / name).write_text(text, encoding="utf-8")


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
  """A data directory laid out like ../shared/data, made the one the tasks read."""
  root = tmp_path_factory.mktemp("data")
  for name in ("BoolQ", "CB", "COPA", "MultiRC", "RTE", "WiC", "WSC"):
    _link(root, f"superglue/{name}", DATA_DIR / "superglue" / name)
  _link(root, "superglue/ReCoRD/val.jsonl",
        DATA_DIR / "superglue/ReCoRD/val_excerpt_5rows.jsonl")
  _link(root, "superglue/ReCoRD/train.jsonl", DATA_DIR / "superglue/ReCoRD/train.jsonl")
  _write(root, "superglue/AX-b/AX-b.jsonl", json.dumps(
      {"sentence1": "The cat sat on the mat.", "sentence2": "The cat did not sit on the mat.",
       "label": "not_entailment", "idx": 0}) + "\n")
  _write(root, "superglue/AX-g/AX-g.jsonl", json.dumps(
      {"premise": "The nurse said she was tired.", "hypothesis": "The nurse was tired.",
       "idx": 0, "pair_id": 1, "label": "entailment"}) + "\n")
  for name in ("SST-2", "MRPC", "RTE"):
    _link(root, f"glue/{name}", DATA_DIR / "glue" / name)
  _link(root, "glue/QQP/dev.tsv", DATA_DIR / "glue/QQP/hf_dummy_excerpt/dev_first2rows.tsv")
  _link(root, "glue/QQP/train.tsv", DATA_DIR / "glue/QQP/kshot/16-42.train.tsv")
  _link(root, "glue/MNLI/train.tsv", DATA_DIR / "glue/MNLI/kshot/16-42.train.tsv")
  for matched in ("matched", "mismatched"):
    _link(root, f"glue/MNLI/dev_{matched}.tsv",
          DATA_DIR / f"glue/MNLI/hf_dummy_excerpt/dev_{matched}_first2rows.tsv")
  _write(root, "glue/CoLA/dev.tsv",
         "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n")
  _write(root, "glue/STS-B/dev.tsv",
         "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
         "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA man is dancing.\tA man dances."
         "\t3.800\n"
         "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA cat.\tA dog.\t2.130\n")
  _write(root, "glue/QNLI/dev.tsv",
         "index\tquestion\tsentence\tlabel\n0\tWhat came into force?\tThe new constitution came "
         "into force.\tentailment\n")
  _write(root, "glue/WNLI/dev.tsv",
         "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged with hair. It has to be "
         "cleaned.\tThe hair has to be cleaned.\t0\n")
  newsqa = DATA_DIR / "mrqa/NewsQA_sample/NewsQA_sample.jsonl"
  _link(root, "mrqa/TextbookQA/TextbookQA.jsonl", newsqa)
  (root / "mrqa/SQuAD").mkdir(parents=True)
  with gzip.open(root / "mrqa/SQuAD/dev.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(json.dumps({"header": {"dataset": "SQuAD", "split": "dev"}}) + "\n")
    f.write(newsqa.read_text(encoding="utf-8"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("PROMPT_TUNING_DATA_DIR", str(root))
    patch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("no_tfds")))
    yield root


def _example(task_name, split, index):
  return tasks.get_examples(task_name, split, index + 1)[index]


def _check_ids(example, input_ids_start, target_ids):
  """Token ids from the real T5 vocabulary: known leading input ids, targets exactly."""
  vocabulary = vocabularies.t5_vocabulary()
  assert example["inputs"][:len(input_ids_start)] == input_ids_start
  assert example["inputs"] == vocabulary.encode(example["inputs_pretokenized"]) + [EOS]
  assert example["targets"] == target_ids + [EOS]


RTE_PREMISE = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
               "age 44, according to the Christopher Reeve Foundation.")
MRPC_DEV_0 = ("sentence1: He said the foodservice pie business doesn't fit the company's "
              "long-term growth strategy. sentence2: \"The foodservice pie business does not fit "
              "our long-term growth strategy.")
NOT_ENTAILMENT = [59, 834, 35, 5756, 297]
ENTAILMENT = [3, 35, 5756, 297]

# (task, split, index, inputs, targets, leading input ids, target ids)
EXACT_CASES = [
    ("super_glue_rte_v102", "validation", 0,
     f"rte hypothesis: Christopher Reeve had an accident. premise: {RTE_PREMISE}",
     "not_entailment", [3, 52, 17, 15, 22455, 10], NOT_ENTAILMENT),
    ("taskless_super_glue_rte_v102", "validation", 0,
     f"hypothesis: Christopher Reeve had an accident. premise: {RTE_PREMISE}",
     "not_entailment", [22455, 10], NOT_ENTAILMENT),
    ("super_glue_cb_v102", "validation", 0,
     "cb hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous "
     "valet. Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did he "
     "think he was helping?",
     "contradiction", [3, 75, 115, 22455, 10], [27252]),
    ("super_glue_copa_v102", "validation", 0,
     "copa choice1: The toilet filled with water. choice2: Water flowed from the spout. premise: "
     "The man turned on the faucet. question: effect",
     "choice2", [7326, 9, 1160, 536, 10], [1160, 357]),
    ("super_glue_wic_v102", "validation", 0,
     "wic sentence1: An emerging professional class. sentence2: Apologizing for losing your "
     "temper, even though you were badly provoked, showed real class. word: class",
     "False", [3, 210, 447, 7142, 536, 10], [10747, 7, 15]),
    ("super_glue_wsc_v102_simple_eval", "validation", 0,
     "wsc: Bernard , who had not told the government official that he was less than 21 when he "
     "filed for a homestead claim, did not consider that he had done anything dishonest. Still, "
     "anyone who knew that he was 19 years old could take his claim away from *him* .",
     "anyone", [3, 210, 7, 75, 10], [1321]),
    # One of the two texts whose pronoun index points elsewhere ("use" instead of "it").
    ("super_glue_wsc_v102_simple_eval", "validation", 42,
     "wsc: When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
     "magic pebble in an iron safe . Some day they might want to use *it* , but really for now, "
     "what more could they wish for?",
     "safe", [3, 210, 7, 75, 10], [1346]),
    # Training keeps only correct referents; the file's first is its 5th row.
    ("super_glue_wsc_v102_simple_train", "train", 0,
     "wsc: The actress used to be named Terpsichore , but she changed it to Tina a few years "
     "ago, because she figured *it* was easier to pronounce.",
     "Tina", [3, 210, 7, 75, 10], [7138, 9]),
    ("taskless_super_glue_wsc_v102_simple_train", "train", 0,
     "The actress used to be named Terpsichore , but she changed it to Tina a few years ago, "
     "because she figured *it* was easier to pronounce.",
     "Tina", [37, 15676, 261], [7138, 9]),
    ("super_glue_axb_v102", "test", 0,
     "rte hypothesis: The cat did not sit on the mat. premise: The cat sat on the mat.",
     "not_entailment", [3, 52, 17, 15, 22455, 10], NOT_ENTAILMENT),
    ("super_glue_axg_v102", "test", 0,
     "rte hypothesis: The nurse was tired. premise: The nurse said she was tired.",
     "entailment", [3, 52, 17, 15, 22455, 10], ENTAILMENT),
    ("glue_rte_v002", "validation", 0,
     f"rte sentence1: {RTE_PREMISE} sentence2: Christopher Reeve had an accident.",
     "not_entailment", [3, 52, 17, 15, 7142, 536, 10], NOT_ENTAILMENT),
    ("glue_sst2_v002", "validation", 0,
     "sst2 sentence: it 's a charming and often affecting journey . ",
     "positive", [3, 7, 7, 17, 357, 7142, 10], [1465]),
    ("glue_mrpc_v002", "validation", 0, f"mrpc {MRPC_DEV_0}",
     "equivalent", [3, 51, 52, 102, 75, 7142, 536, 10], [7072]),
    ("taskless_glue_mrpc_v002", "validation", 0, MRPC_DEV_0,
     "equivalent", [7142, 536, 10], [7072]),
    ("glue_mrpc_v002", "train", 0,
     "mrpc sentence1: Amrozi accused his brother, whom he called \"the witness\", of deliberately "
     "distorting his evidence. sentence2: Referring to him as only \"the witness\", Amrozi accused "
     "his brother of deliberately distorting his evidence.",
     "equivalent", [3, 51, 52, 102, 75, 7142, 536, 10], [7072]),
    ("glue_mrpc_v002", "validation", 1,
     "mrpc sentence1: Magnarelli said Racicot hated the Iraqi regime and looked forward to using "
     "his long years of training in the war. sentence2: His wife said he was \"100 percent behind "
     "George Bush\" and looked forward to using his years of training in the war.",
     "not_equivalent", [3, 51, 52, 102, 75, 7142, 536, 10], [59, 834, 15, 1169, 15592]),
    ("glue_qqp_v002", "validation", 0,
     "qqp question1: Why are African-Americans so beautiful? question2: Why are hispanics so "
     "beautiful?",
     "not_duplicate", [3, 1824, 1824, 102, 822, 536, 10], [59, 834, 26, 413, 26221]),
    ("glue_mnli_v002", "validation_matched", 0,
     "mnli hypothesis: Everyone really likes the newest benefits  premise: The new rights are "
     "nice enough",
     "neutral", [3, 51, 29, 40, 23, 22455, 10], [7163]),
    ("glue_mnli_mismatched_v002", "validation", 0,
     "mnli hypothesis: Your contributions were of no help with our students' education. premise: "
     "Your contribution helped make it possible for us to provide our students with a quality "
     "education.",
     "contradiction", [3, 51, 29, 40, 23, 22455, 10], [27252]),
    ("glue_mnli_v002", "train", 0,
     "mnli hypothesis: That's fine. premise: That's all right.",
     "entailment", [3, 51, 29, 40, 23, 22455, 10], ENTAILMENT),
    ("glue_cola_v002", "validation", 0,
     "cola sentence: Our friends won't buy this analysis, let alone the next one we propose.",
     "acceptable", [3, 12600, 7142, 10], [9961]),
    ("glue_stsb_v002", "validation", 0,
     "stsb sentence1: A man is dancing. sentence2: A man dances.",
     "3.8", [3, 7, 17, 7, 115, 7142, 536, 10], [3, 26195]),
    # Scores round to the nearest multiple of 0.2.
    ("glue_stsb_v002", "validation", 1,
     "stsb sentence1: A cat. sentence2: A dog.",
     "2.2", [3, 7, 17, 7, 115, 7142, 536, 10], [3, 15300]),
    ("glue_qnli_v002", "validation", 0,
     "qnli question: What came into force? sentence: The new constitution came into force.",
     "entailment", [3, 1824, 29, 40, 23, 822, 10], ENTAILMENT),
    ("glue_wnli_v002", "validation", 0,
     "wnli sentence1: The drain is clogged with hair. It has to be cleaned. sentence2: The hair "
     "has to be cleaned.",
     "not_entailment", [3, 210, 29, 40, 23, 7142, 536, 10], NOT_ENTAILMENT),
    ("glue_mrpc_from_qqp_v002", "validation", 0, f"mrpc {MRPC_DEV_0}",
     "equivalent", [3, 51, 52, 102, 75, 7142, 536, 10], [7072]),
    ("taskless_glue_qqp_from_mrpc_v002", "validation", 0,
     "question1: Why are African-Americans so beautiful? question2: Why are hispanics so "
     "beautiful?",
     "not_duplicate", [822, 536, 10], [59, 834, 26, 413, 26221]),
]


@pytest.mark.parametrize("task_name, split, index, inputs, targets, input_ids_start, target_ids",
                         EXACT_CASES, ids=[f"{c[0]}-{c[1]}[{c[2]}]" for c in EXACT_CASES])
def test_first_examples_exactly(task_name, split, index, inputs, targets, input_ids_start,
                                target_ids):
  example = _example(task_name, split, index)
  assert example["inputs_pretokenized"] == inputs
  assert example["targets_pretokenized"] == targets
  _check_ids(example, input_ids_start, target_ids)


def test_boolq_passage_then_question():
  example = _example("super_glue_boolq_v102", "validation", 0)
  assert example["inputs_pretokenized"].startswith(
      "boolq passage: Ethanol fuel -- All biomass goes through at least some of these steps:")
  assert example["inputs_pretokenized"].endswith(
      "concluded that producing ethanol from corn uses much less petroleum than producing "
      "gasoline. question: does ethanol take more energy make that produces")
  assert example["targets_pretokenized"] == "False"
  _check_ids(example, [3, 12840, 40, 1824, 5454, 10], [10747, 7, 15])


def test_multirc_one_example_per_answer():
  first, second = tasks.get_examples("super_glue_multirc_v102", "validation", 2)
  assert first["inputs_pretokenized"].startswith(
      "multirc question: Would the mass of a baseball affect how much force you have to use to "
      "pick it up? answer: No paragraph: What causes a change in motion? The application of a "
      "force.")
  assert first["inputs_pretokenized"].endswith("This requires only a very small force. ")
  assert second["inputs_pretokenized"].startswith(
      "multirc question: Would the mass of a baseball affect how much force you have to use to "
      "pick it up? answer: Yes paragraph: What causes")
  assert (first["targets_pretokenized"], second["targets_pretokenized"]) == ("False", "True")
  assert (first["idx/question"], first["idx/answer"], second["idx/answer"]) == (0, 0, 1)
  _check_ids(first, [1249, 52, 75, 822, 10], [10747, 7, 15])


def test_record_entities_highlights_and_one_example_per_answer():
  first, second = tasks.get_examples("super_glue_record_v102", "validation", 2)
  assert first["inputs_pretokenized"].startswith(
      "record query: On October 10, acclaimed comedian and star of the summer box office hit "
      "Trainwreck Amy Schumer will make her SNL debut, followed by @placeholder a week later. "
      "entities: Amy Schumer, James, Jimmy Mack, McNair, Miley Cyrus, Morgan, NBC, New Jersey, "
      "New Jersey Turnpike, Night Live, SNL, Season 41, Tracy Morgan, Twitter passage: Tracy "
      "Morgan hasn't appeared on stage since the devastating New Jersey crash")
  # "\n@highlight\n" becomes a space after punctuation, else ". ".
  assert ("James 'Jimmy Mack' McNair. Morgan, 46, will host third episode of season 41 of SNL "
          "airing October 17. He tweeted to his fans: 'Stoked to be going home...#SNL' For the "
          "SNL alum") in first["inputs_pretokenized"]
  assert first["inputs_pretokenized"].endswith("followed by Amy Schumer")
  assert second["inputs_pretokenized"] == first["inputs_pretokenized"]
  assert (first["targets_pretokenized"], second["targets_pretokenized"]) == (
      "Morgan", "Tracy Morgan")
  assert first["answers"] == ["Morgan", "Tracy Morgan"]
  _check_ids(first, [1368, 11417, 10], [11147])
  assert second["targets"] == [29464, 11147, EOS]


@pytest.mark.parametrize("task_name", ["mrqa_textbookqa_v001", "squad_v010_allanswers"])
def test_mrqa_question_context_format(task_name):
  first, second = tasks.get_examples(task_name, "validation", 2)
  # T5 puts spaces around every non-word character, "»" included.
  assert first["inputs_pretokenized"].startswith(
      "question: What will be nominated ? context: ( CNN ) - - What could be more powerful than "
      "the tears of a Native American Indian ? Wax on , wax off : Does it make you want to save "
      "the rainforests ?")
  assert (" Watch the featured videos » Let us know which eco videos have got you going by "
          "using the Sound Off box below . Or , e - mail us at ecosolutions @ cnn . com . ") in (
              first["inputs_pretokenized"])
  assert first["targets_pretokenized"] == "three different videos"
  assert first["answers"] == ["three different videos"]
  assert second["targets_pretokenized"] == "getting his chest waxed , "
  _check_ids(first, [822, 10, 363, 56, 36, 150, 1109, 920], [386, 315, 3075])


def test_byt5_variant_uses_bytes():
  example = _example("byt5_glue_rte_v002", "validation", 0)
  text = f"rte sentence1: {RTE_PREMISE} sentence2: Christopher Reeve had an accident."
  assert example["inputs_pretokenized"] == text
  assert example["inputs"] == [byte + 3 for byte in text.encode("utf-8")] + [EOS]
  assert example["targets"] == [byte + 3 for byte in b"not_entailment"] + [EOS]


@pytest.mark.parametrize("task_name, split, expected_rows", [
    ("super_glue_boolq_v102", "validation", 3270),
    ("super_glue_cb_v102", "validation", 56),
    ("super_glue_copa_v102", "validation", 100),
    ("super_glue_rte_v102", "validation", 277),
    ("super_glue_wic_v102", "validation", 638),
    ("super_glue_wsc_v102_simple_eval", "validation", 104),
    ("super_glue_multirc_v102", "validation", 4848),
    ("glue_sst2_v002", "validation", 872),
    ("glue_mrpc_v002", "validation", 408),
    ("glue_mrpc_v002", "train", 3668),
    ("glue_rte_v002", "validation", 277),
])
def test_whole_real_files_load_completely(task_name, split, expected_rows):
  dataset = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False)
  assert dataset.reduce(0, lambda count, _: count + 1).numpy() == expected_rows


@pytest.mark.parametrize("task_name, split, expected_metrics", [
    ("super_glue_rte_v102", "validation", {"accuracy": 100.0}),
    ("super_glue_cb_v102", "validation", {"accuracy": 100.0, "mean_3class_f1": 100.0}),
    ("super_glue_multirc_v102", "validation", {"f1": 100.0, "exact_match": 100.0}),
    ("super_glue_record_v102", "validation", {"em": 100.0, "f1": 100.0}),
    ("super_glue_wsc_v102_simple_eval", "validation", {"accuracy": 100 * 38 / 104}),
    ("glue_mrpc_v002", "validation", {"accuracy": 100.0, "f1": 100.0}),
    ("glue_stsb_v002", "validation", {"pearson_corrcoef": 100.0, "spearman_corrcoef": 100.0}),
    ("mrqa_textbookqa_v001", "validation", {"em": 100.0, "f1": 100.0}),
])
def test_targets_as_predictions_score_perfectly(task_name, split, expected_metrics):
  """Wires postprocessing and metrics: the targets, fed back as predictions, are all right.

  WSC is the exception: its targets are candidates, and only 38 of 104 are the referent.
  """
  task = seqio.get_mixture_or_task(task_name)
  examples = tasks.get_examples(task_name, split)
  targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
             for e in examples]
  predictions = [task.postprocess_fn(e["targets_pretokenized"], example=e) for e in examples]
  results = {}
  for metric_fn in task.metric_fns:
    results.update(metric_fn(targets, predictions))
  for name, value in expected_metrics.items():
    assert results[name] == pytest.approx(value)
  assert results.get("invalid_prediction_rate", 0.0) == 0.0


def test_invalid_predictions_are_reported():
  task = seqio.get_mixture_or_task("glue_mrpc_from_qqp_v002")
  examples = tasks.get_examples("glue_mrpc_from_qqp_v002", "validation", 4)
  targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
             for e in examples]
  predictions = [task.postprocess_fn(text, example=e) for text, e in zip(
      ["duplicate", "not_duplicate", "equivalent", "maybe"], examples)]
  # QQP's label words are translated; MRPC's own words stay valid.
  assert predictions == [1, 0, 1, -1]
  results = {}
  for metric_fn in task.metric_fns:
    results.update(metric_fn(targets, predictions))
  assert results["invalid_prediction_rate"] == 25.0
