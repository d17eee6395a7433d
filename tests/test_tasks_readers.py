"""The original-file readers on the real files in ../shared/data (pure Python, no TensorFlow)."""
import gzip
import json
import pathlib

import pytest

from prompt_tuning_jax.tasks import readers

DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.needs_shared(DATA_DIR)


def super_glue(task, directory, file_name="val.jsonl"):
  return list(readers.super_glue_examples(task, str(DATA_DIR / "superglue" / directory / file_name)))


def glue(task, relative_path):
  return list(readers.glue_examples(task, str(DATA_DIR / "glue" / relative_path)))


@pytest.mark.parametrize("task, directory, file_name, expected_rows", [
    ("boolq", "BoolQ", "val.jsonl", 3270),
    ("cb", "CB", "val.jsonl", 56),
    ("copa", "COPA", "val.jsonl", 100),
    ("rte", "RTE", "val.jsonl", 277),
    ("wic", "WiC", "val.jsonl", 638),
    ("wsc.fixed", "WSC", "val.jsonl", 104),
    ("multirc", "MultiRC", "val.jsonl", 4848),
    ("cb", "CB", "train_full.jsonl", 250),
    ("rte", "RTE", "train_full.jsonl", 2490),
    ("wsc.fixed", "WSC", "train_full.jsonl", 554),
    ("copa", "COPA", "train_partial_368.jsonl", 368),
    ("record", "ReCoRD", "val_excerpt_5rows.jsonl", 11),
])
def test_super_glue_files_load_completely(task, directory, file_name, expected_rows):
  examples = super_glue(task, directory, file_name)
  assert len(examples) == expected_rows
  if task != "record":
    label_count = len(readers.SUPER_GLUE_LABELS[task])
    assert all(0 <= e["label"] < label_count for e in examples)


@pytest.mark.parametrize("task, relative_path, expected_rows", [
    ("sst2", "SST-2/dev.tsv", 872),
    ("mrpc", "MRPC/dev.tsv", 408),
    ("mrpc", "MRPC/train.tsv", 3668),
    ("rte", "RTE/dev.tsv", 277),
    ("qqp", "QQP/hf_dummy_excerpt/train_first3rows.tsv", 3),
    ("qqp", "QQP/kshot/16-42.dev.tsv", 32),
    ("mnli", "MNLI/kshot/16-42.train.tsv", 48),
    ("mnli", "MNLI/hf_dummy_excerpt/dev_mismatched_first2rows.tsv", 2),
])
def test_glue_files_load_completely(task, relative_path, expected_rows):
  examples = glue(task, relative_path)
  assert len(examples) == expected_rows
  assert [e["idx"] for e in examples] == list(range(expected_rows))
  assert all(0 <= e["label"] < len(readers.GLUE_LABELS[task]) for e in examples)


def test_superglue_fields_and_labels():
  assert super_glue("cb", "CB")[0] == {
      "premise": ("Valence the void-brain, Valence the virtuous valet. Why couldn't the figger "
                  "choose his own portion of titanic anatomy to shaft? Did he think he was helping?"),
      "hypothesis": "Valence was helping",
      "idx": 0,
      "label": 1,  # contradiction
  }
  copa = super_glue("copa", "COPA")[0]
  assert (copa["question"], copa["label"]) == ("effect", 1)
  assert super_glue("boolq", "BoolQ")[0]["label"] == 0  # false
  assert super_glue("rte", "RTE")[1]["label"] == 0  # entailment


def test_multirc_nested_passage_questions_answers():
  examples = super_glue("multirc", "MultiRC")
  first = examples[0]
  assert first["question"] == ("Would the mass of a baseball affect how much force you have to "
                               "use to pick it up?")
  assert (first["answer"], first["label"]) == ("No", 0)
  assert first["idx"] == {"paragraph": 0, "question": 0, "answer": 0}
  assert first["paragraph"].startswith("What causes a change in motion? The application of a force.")
  assert [(e["answer"], e["label"]) for e in examples[1:4]] == [
      ("Yes", 1), ("Less the mass, less the force applied", 1),
      ("It depends on the shape of the baseball", 0)]
  assert len({e["idx"]["question"] for e in examples}) == 953


def test_record_entities_and_multiple_answers():
  first = super_glue("record", "ReCoRD", "val_excerpt_5rows.jsonl")[0]
  assert first["entities"] == [
      "Amy Schumer", "James", "Jimmy Mack", "McNair", "Miley Cyrus", "Morgan", "NBC", "New Jersey",
      "New Jersey Turnpike", "Night Live", "SNL", "Season 41", "Tracy Morgan", "Twitter"]
  assert first["answers"] == ["Morgan", "Tracy Morgan"]
  assert first["idx"] == {"passage": 0, "query": 0}
  assert first["query"].endswith("followed by @placeholder a week later.")


def test_wsc_spans_are_fixed_like_tfds():
  examples = {e["idx"]: e for e in super_glue("wsc.fixed", "WSC")}
  assert examples[5]["span1_text"] == "the table"  # "The table" in the file.
  assert examples[0]["span2_text"] == "him"
  assert all(e["span1_text"] in e["text"] and e["span2_text"] in e["text"]
             for e in examples.values())


def test_tsv_byte_order_mark_quotes_and_sst2_text_header():
  mrpc = glue("mrpc", "MRPC/dev.tsv")[0]
  # The file starts with a BOM and its second sentence with an unbalanced quote.
  assert mrpc == {
      "sentence1": ("He said the foodservice pie business doesn't fit the company's long-term "
                    "growth strategy."),
      "sentence2": '"The foodservice pie business does not fit our long-term growth strategy.',
      "label": 1,
      "idx": 0,
  }
  assert glue("sst2", "SST-2/dev.tsv")[:2] == [
      {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0},
      {"sentence": "unflinchingly bleak and desperate ", "label": 0, "idx": 1},
  ]


def test_mnli_uses_gold_label():
  first = glue("mnli", "MNLI/hf_dummy_excerpt/dev_matched_first2rows.tsv")[0]
  assert first == {"premise": "The new rights are nice enough",
                   "hypothesis": "Everyone really likes the newest benefits ",
                   "label": 1, "idx": 0}  # neutral


def test_headerless_cola_stsb_scores_and_corrupt_qqp_rows(tmp_path):
  cola = tmp_path / "cola.tsv"
  cola.write_text("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n")
  assert list(readers.glue_examples("cola", str(cola))) == [
      {"sentence": "Our friends won't buy this analysis.", "label": 1, "idx": 0},
      {"sentence": "They drank the pub.", "label": 0, "idx": 1}]
  stsb = tmp_path / "stsb.tsv"
  stsb.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\t"
                  "score\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man is dancing.\t"
                  "A man dances.\t4.750\n")
  assert list(readers.glue_examples("stsb", str(stsb))) == [
      {"sentence1": "A man is dancing.", "sentence2": "A man dances.", "label": 4.75, "idx": 0}]
  qqp = tmp_path / "qqp.tsv"
  qqp.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                 "1\t2\t3\tA broken row\n"
                 "4\t5\t6\tWhy?\tHow?\t0\n")
  assert [e["question1"] for e in readers.glue_examples("qqp", str(qqp))] == ["Why?"]


def test_mrqa_with_and_without_header(tmp_path):
  sample = DATA_DIR / "mrqa" / "NewsQA_sample" / "NewsQA_sample.jsonl"
  without_header = list(readers.mrqa_examples(str(sample)))
  assert len(without_header) == 17
  assert without_header[0]["question"] == "What will be nominated?"
  assert without_header[0]["answers"] == ["three different videos"]
  assert without_header[0]["context"].startswith("(CNN) -- What could be more powerful")
  with_header = tmp_path / "NewsQA.jsonl.gz"
  with gzip.open(with_header, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"header": {"dataset": "NewsQA", "split": "dev"}}) + "\n")
    f.write(sample.read_text(encoding="utf-8"))
  assert list(readers.mrqa_examples(str(with_header))) == without_header


def test_bad_json_line_names_the_file(tmp_path):
  path = tmp_path / "val.jsonl"
  path.write_text('{"premise": "a"}\nnot json\n')
  with pytest.raises(ValueError, match=r"val.jsonl:2"):
    list(readers.read_jsonl(str(path)))


RTE_LINE = '{"premise": "A cat sat.", "hypothesis": "A cat sits.", "label": "entailment", "idx": 0}'


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', r"val.jsonl:2: '\[1, 2\]' is not a JSON object"),
    ('"text"', r"val.jsonl:2: '\"text\"' is not a JSON object"),
    ('{"premise": 5, "hypothesis": "b", "idx": 1}',
     r"val.jsonl:2: the field 'premise' is 5 \(int\), not a string"),
    ('{"premise": null, "hypothesis": "b", "idx": 1}',
     r"val.jsonl:2: the field 'premise' is None \(NoneType\), not a string"),
    ('{"premise": "a", "hypothesis": "b", "idx": "1"}',
     r"val.jsonl:2: the field 'idx' is '1' \(str\), not an int32"),
    ('{"premise": "a", "hypothesis": "b", "idx": 4294967296}',
     r"val.jsonl:2: the field 'idx' is 4294967296 \(int\), not an int32"),
    ('{"premise": "a", "hypothesis": "b", "idx": {"a": 1}}',
     r"val.jsonl:2: the field 'idx' is {'a': 1} \(dict\), not an int32; fix that line of the "
     r"file.$"),
    ('{"premise": "a", "hypothesis": ["b"], "idx": 1}',
     r"val.jsonl:2: the field 'hypothesis' is \['b'\] \(list\), not a string"),
    ('{"premise": "a\\ud800", "hypothesis": "b", "idx": 1}',
     r"val.jsonl:2: holds a lone surrogate '\\ud800'"),
], ids=["list", "string", "int_text", "null_text", "string_idx", "idx_beyond_int32",
        "object_idx", "list_text", "lone_surrogate"])
def test_malformed_super_glue_lines_name_the_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "val.jsonl"
  path.write_text(RTE_LINE + "\n" + line + "\n")
  with pytest.raises(ValueError, match=message):
    list(readers.super_glue_examples("rte", str(path)))


def test_malformed_nested_fields_name_their_path(tmp_path):
  path = tmp_path / "val.jsonl"
  path.write_text('{"idx": 0, "passage": {"text": "t", "questions": 5}}\n')
  with pytest.raises(ValueError, match=r"val.jsonl:1: the field 'passage.questions' is 5 \(int\), "
                     r"not a list; fix that line of the file.$"):
    list(readers.super_glue_examples("multirc", str(path)))
  path.write_text('{"idx": 0, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, '
                  '"answers": [{"text": 7, "idx": 0, "label": 1}]}]}}\n')
  with pytest.raises(ValueError, match=r"val.jsonl:1: the field "
                     r"'passage.questions\[0\].answers\[0\].text' is 7 \(int\), not a string"):
    list(readers.super_glue_examples("multirc", str(path)))
  path.write_text('{"idx": 0, "passage": {"text": "t", "questions": [{"question": "q"}]}}\n')
  with pytest.raises(ValueError, match=r"val.jsonl:1: the field 'passage.questions\[0\].idx' is "
                     r"missing; fix that line of the file.$"):
    list(readers.super_glue_examples("multirc", str(path)))


def test_malformed_mrqa_lines_name_the_field(tmp_path):
  path = tmp_path / "dev.jsonl"
  path.write_text('{"context": 3, "qas": [{"qid": "a", "question": "q", "answers": ["x"]}]}\n')
  with pytest.raises(ValueError, match=r"dev.jsonl:1: the field 'context' is 3 \(int\)"):
    list(readers.mrqa_examples(str(path)))
  path.write_text('{"context": "c", "qas": [{"qid": "a", "question": "q", "answers": "x"}]}\n')
  with pytest.raises(ValueError,
                     match=r"dev.jsonl:1: the field 'qas\[0\].answers' is 'x' \(str\), not a list"):
    list(readers.mrqa_examples(str(path)))


def test_a_wsc_span_index_beyond_the_text_is_one_error(tmp_path):
  path = tmp_path / "val.jsonl"
  path.write_text('{"text": "A cat sat.", "idx": 3, "label": true, "target": {"span1_index": 9, '
                  '"span2_index": 0, "span1_text": "dog", "span2_text": "A"}}\n')
  with pytest.raises(ValueError, match=r"val.jsonl:1: WSC example 3: span1_index 9 is not the index "
                     "of a word of its text, which has 3"):
    list(readers.super_glue_examples("wsc.fixed", str(path)))


def _paths(value, path=""):
  """(path, value) of each node of a parsed JSON line, the first item only of each list, in the
  readers' notation: `passage.questions[0].idx`."""
  yield path, value
  if isinstance(value, dict):
    for name, child in value.items():
      yield from _paths(child, f"{path}.{name}" if path else name)
  elif isinstance(value, list) and value:
    yield from _paths(value[0], f"{path}[0]")


def _replaced(value, path, new):
  """A deep copy of `value` with the node at `path` (of `_paths`) replaced by `new`."""
  copy = json.loads(json.dumps(value))
  parts = path.replace("[0]", ".[0]").split(".")
  node = copy
  for part in parts[:-1]:
    node = node[0] if part == "[0]" else node[part]
  if parts[-1] == "[0]":
    node[0] = new
  else:
    node[parts[-1]] = new
  return copy


@pytest.mark.parametrize("task, file", [
    ("boolq", "BoolQ/val.jsonl"), ("cb", "CB/val.jsonl"), ("copa", "COPA/val.jsonl"),
    ("rte", "RTE/val.jsonl"), ("wic", "WiC/val.jsonl"), ("wsc.fixed", "WSC/val.jsonl"),
    ("multirc", "MultiRC/val.jsonl"), ("record", "ReCoRD/val_excerpt_5rows.jsonl"),
    ("mrqa", "../mrqa/NewsQA_sample/NewsQA_sample.jsonl")])
@pytest.mark.parametrize("bad", [{"a": 1}, [1], None], ids=["object", "list", "null"])
def test_every_field_of_another_type_is_an_error_naming_it(tmp_path, task, file, bad):
  """Each field of a real line (and of the first item of each list) replaced by an object, a list
  or null: the reader either names that field in one error, or does not read the field (its
  examples are those of the real line), or takes a null label as unlabelled."""
  def examples(row):
    path = tmp_path / "line.jsonl"
    path.write_text(json.dumps(row) + "\n")
    if task == "mrqa":
      return list(readers.mrqa_examples(str(path)))
    return list(readers.super_glue_examples(task, str(path)))

  with open(DATA_DIR / "superglue" / file, encoding="utf-8") as f:
    row = next(json.loads(line) for line in f if "header" not in json.loads(line))
  real = examples(row)
  checked = 0
  for path, _ in list(_paths(row))[1:]:
    try:
      changed = examples(_replaced(row, path, bad))
    except ValueError as e:
      # That field, or one missing from the object that replaced it.
      assert str(e).startswith(f"{tmp_path / 'line.jsonl'}:1: the field '{path}"), str(e)
      assert str(e).endswith("; fix that line of the file."), str(e)
      checked += 1
      continue
    unlabelled = bad is None and path.split(".")[-1] == "label"
    assert changed == real or unlabelled, (path, changed[:1])
  assert checked >= 3


def test_glue_tsv_missing_a_column_names_it(tmp_path):
  path = tmp_path / "dev.tsv"
  path.write_text("index\tsentence1\tlabel\n0\tA cat sat.\tentailment\n")
  with pytest.raises(ValueError, match=r"dev.tsv: no column 'sentence2' \(GLUE rte's "
                                       r"'sentence2'\); the header has \['index', 'sentence1', "
                                       r"'label'\]"):
    list(readers.glue_examples("rte", str(path)))
  path.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\thigh\n")
  with pytest.raises(ValueError, match=r"dev.tsv: row 1: could not convert string to float"):
    list(readers.glue_examples("stsb", str(path)))
