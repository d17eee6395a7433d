"""Zero-shot transfer between the paraphrase tasks QQP and MRPC, as in the prompt tuning paper.

`glue_mrpc_from_qqp_v002` is MRPC's validation set scored on predictions in QQP's label words
(`duplicate` -> `equivalent`); `glue_mrpc_from_qqp_zeroshot_v002` trains on QQP and evaluates on
it. Likewise for `qqp_from_mrpc`, and the `taskless_`, `byt5_`, `mt5_` forms.
"""
import functools

from . import common
from . import glue
from . import postprocessors
from . import readers

# (source, target) -> the source task's label words in the target task's words.
TRANSLATIONS = {
    ("qqp", "mrpc"): {"duplicate": "equivalent", "not_duplicate": "not_equivalent"},
    ("mrpc", "qqp"): {"equivalent": "duplicate", "not_equivalent": "not_duplicate"},
}


def register() -> list[str]:
  """Registers the transfer tasks and mixtures; returns the task names. Needs `glue.register()`."""
  names = []
  for (source_task, target_task), translation in TRANSLATIONS.items():
    task_name = f"glue_{target_task}_from_{source_task}_v002"
    names += common.add_task_variants(
        task_name,
        glue.source(target_task, splits=("validation",)),
        glue.text_preprocessors(target_task),
        functools.partial(postprocessors.translate_labels, translation=translation,
                          label_names=readers.GLUE_LABELS[target_task]),
        glue.metric_fns(target_task))
    common.add_mixture_variants(
        f"glue_{target_task}_from_{source_task}_zeroshot_v002",
        [f"glue_{source_task}_v002", task_name], default_rate=1.0)
  return names
