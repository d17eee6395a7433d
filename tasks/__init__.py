"""The paper's experiments as seqio Tasks and Mixtures; importing this registers all of them.

Data comes from TFDS when prepared under `TFDS_DATA_DIR`, else from the original files under
`$PROMPT_TUNING_DATA_DIR` (or the gin macro `DATA_DIR`); see `sources.py`.
"""
from . import glue
from . import mrqa
from . import paraphrase_transfer
from . import super_glue
from .common import add_mixture
from .common import add_task
from .common import get_examples
from .common import import_task_module
from .common import output_features
from .sources import DataNotFoundError
from .sources import LocalOrTfdsSource


def register_all() -> list[str]:
  """Registers every task and mixture (again, if already registered); returns the task names."""
  return [
      *super_glue.register(),
      *glue.register(),
      *paraphrase_transfer.register(),
      *mrqa.register(),
  ]


TASK_NAMES = tuple(register_all())
from . import spot  # pylint: disable=g-import-not-at-top (SPoT's mixtures need the tasks above)
