"""The vocabularies our models and tasks use, bundled so that nothing is downloaded.

`t5_vocabulary()` is the real T5 SentencePiece model (cc_all.32000, Apache-2.0, see
`assets/LICENSE-google-research-prompt-tuning`) with seqio's 100 sentinel ids: 32,100 ids, which T5
checkpoints pad to 32,128 embedding rows. `byt5_vocabulary()` is ByT5's byte vocabulary.
"""
import functools
import pathlib

import seqio

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
T5_SPM_PATH = str(ASSETS_DIR / "t5_spm_32000.model")
T5_EXTRA_IDS = 100


@functools.cache
def t5_vocabulary() -> seqio.SentencePieceVocabulary:
  """The T5 SentencePiece vocabulary (pad=0, eos=1, unk=2; 32,000 pieces + 100 extra ids)."""
  return seqio.SentencePieceVocabulary(T5_SPM_PATH, extra_ids=T5_EXTRA_IDS)


@functools.cache
def byt5_vocabulary() -> seqio.ByteVocabulary:
  """ByT5's byte-level vocabulary (3 special ids + 256 bytes)."""
  return seqio.ByteVocabulary()
