"""A seqio DataSource that reads TFDS when it is prepared, and the original files otherwise.

Where the data lives is decided each time a dataset is read, not at import:

1. TFDS, when the dataset is prepared under `TFDS_DATA_DIR` (default `~/tensorflow_datasets`).
2. The original files under the local data directory: the gin macro `DATA_DIR` if bound, else the
   environment variable `PROMPT_TUNING_DATA_DIR`. Relative file names are taken from there.
3. Otherwise a `DataNotFoundError` that names every place looked at and how to provide the data.
"""
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

DATA_DIR_ENV = "PROMPT_TUNING_DATA_DIR"
DATA_DIR_MACRO = "DATA_DIR"
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"

Reader = Callable[[str], Iterable[Mapping[str, Any]]]


class DataNotFoundError(FileNotFoundError):
  """Neither TFDS nor the local data directory has a task's data."""


def local_data_dir() -> Optional[str]:
  """The local data directory: gin macro `DATA_DIR`, else `$PROMPT_TUNING_DATA_DIR`, else None."""
  try:
    macro_value = gin.query_parameter(f"%{DATA_DIR_MACRO}")
  except ValueError:  # The macro is not bound.
    macro_value = None
  return macro_value or os.environ.get(DATA_DIR_ENV) or None


def tfds_data_dir() -> str:
  """The TFDS data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.environ.get(TFDS_DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split("."))


def prepared_tfds_name(tfds_name: str, data_dir: str) -> Optional[str]:
  """`name/config:version` of a dataset prepared under `data_dir`, or None.

  Without a version in `tfds_name`, the newest prepared version is taken.
  """
  name, _, version = tfds_name.partition(":")
  dataset_dir = os.path.join(data_dir, name)
  if version:
    versions = [version]
  elif os.path.isdir(dataset_dir):
    versions = sorted((v for v in os.listdir(dataset_dir) if re.fullmatch(r"\d+\.\d+\.\d+", v)),
                      key=_version_key, reverse=True)
  else:
    versions = []
  for candidate in versions:
    if os.path.exists(os.path.join(dataset_dir, candidate, "dataset_info.json")):
      return f"{name}:{candidate}"
  return None


class LocalOrTfdsSource(seqio.DataSource):
  """Reads a TFDS dataset if it is prepared, else the original files with a Python reader.

  The reader must yield examples in the TFDS feature format (see `readers.py`), so that one set of
  preprocessors serves both.
  """

  def __init__(self,
               name: str,
               local_files: Mapping[str, Sequence[str]],
               reader: Reader,
               features: Mapping[str, Any],
               tfds_name: Optional[str] = None,
               tfds_splits: Optional[Mapping[str, str]] = None):
    """Constructor.

    Args:
      name: what the data is, for messages (e.g. `SuperGLUE RTE`).
      local_files: split -> candidate file names, relative to the local data directory (or
        absolute); the first that exists is read.
      reader: file path -> examples.
      features: the `tf.TensorSpec` structure of one example, as the reader yields it.
      tfds_name: `name/config[:version]` of the TFDS dataset, if there is one; without a
        version, the newest prepared one is read.
      tfds_splits: split -> TFDS split, where they differ (defaults to the same names).
    """
    super().__init__(splits=tuple(local_files))
    self._name = name
    self._local_files = {split: tuple(files) for split, files in local_files.items()}
    self._reader = reader
    self._features = dict(features)
    self._tfds_name = tfds_name
    self._tfds_splits = {split: split for split in local_files}
    self._tfds_splits.update(tfds_splits or {})

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def __repr__(self):
    return (f"{type(self).__name__}(name={self._name!r}, tfds_name={self._tfds_name!r}, "
            f"local_files={self._local_files!r})")

  def local_path(self, split: str) -> str:
    """The local file of `split`, or a `DataNotFoundError` naming every place looked at."""
    if split not in self._local_files:
      raise ValueError(f"{self._name} has no split {split!r}, only {list(self.splits)}.")
    data_dir = local_data_dir()
    file_names = self._local_files[split]
    candidates = [name if os.path.isabs(name) else os.path.join(data_dir, name)
                  for name in file_names if data_dir or os.path.isabs(name)]
    for path in candidates:
      if os.path.exists(path):
        return path
    looked_at = []
    if self._tfds_name:
      looked_at.append(f"TFDS {self._tfds_name} under {tfds_data_dir()} (not prepared)")
    looked_at += candidates
    if not data_dir:
      looked_at.append(f"no local data directory (${DATA_DIR_ENV} and gin {DATA_DIR_MACRO} unset)")
    how_to_provide = (
        f"point ${DATA_DIR_ENV} (or --gin.{DATA_DIR_MACRO}) at a directory holding "
        + " or ".join(file_names))
    if self._tfds_name:
      how_to_provide += f", or prepare the TFDS dataset {self._tfds_name} under ${TFDS_DATA_DIR_ENV}"
    raise DataNotFoundError(
        f"No data found for {self._name}, split {split!r}. Looked at:\n  "
        + "\n  ".join(looked_at) + f"\nTo provide it, {how_to_provide}.")

  def get_dataset(self,
                  split: str = "train",
                  shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  *,
                  sequence_length: Optional[Mapping[str, int]] = None,
                  use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Unused, as in seqio's sources.
    tfds_name = self._tfds_name and prepared_tfds_name(self._tfds_name, tfds_data_dir())
    if tfds_name:
      return seqio.TfdsDataSource(
          tfds_name=tfds_name,
          tfds_data_dir=tfds_data_dir(),
          splits={split: self._tfds_splits[split]},
      ).get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    # Read the whole file now, so that a bad file fails here rather than inside tf.data.
    path = self.local_path(split)
    examples = list(self._reader(path))
    if not examples:
      raise ValueError(f"{path} ({self._name}, split {split!r}) holds no examples: it is empty or "
                       "has only empty lines.")
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=self._features)
    if shuffle:
      ds = ds.shuffle(len(examples), seed=seed)
    if shard_info:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds
