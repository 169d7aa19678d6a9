"""Byte-level BPE tokenizers (GGUF-embedded or HF tokenizer.json) as seqio vocabularies.

`BPEVocabulary` is a seqio.Vocabulary, so tasks, prompts and the sampler use a
pretrained model's tokenizer exactly as they use the embedded SentencePiece one.

Special ids, and why:
  * eos_id: the checkpoint's end-of-sequence token (SmolLM2-Instruct: 2,
    <|im_end|>, which ends a chat turn); seqio.decode truncates after it.
  * pad_id: seqio hard-codes PAD_ID = 0 (feature converters pad with 0 and
    mask `!= 0`). When id 0 is a special token (SmolLM2 and most GPT-2-style
    vocabularies: <|endoftext|>) it is the pad id, so seqio's conventions hold
    unchanged; when id 0 is a real text piece, pad falls back to eos_id.
    Padding is never attended to, so either choice is invisible to the model.
  * unk_id: the checkpoint's unknown id if it declares one (byte-level BPE
    never needs it: every byte has a token). seqio maps ids >= vocab_size to it.
Decoding drops special tokens (like SentencePiece drops control symbols), so
completions never contain <|im_end|>-style markup; encoding recognises them in
text, so a chat-formatted prompt written as a string maps to the right ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers

from restem_jax.importers.common import ImportFormatError

# llama.cpp's `tokenizer.ggml.pre` names -> whether digits are split one by one
# before the GPT-2 regex (the rest of the pre-tokenization is identical).
_GGUF_PRE_SPLIT_DIGITS = {
    "gpt2": False, "default": False, "mpt": False, "olmo": False, "jais": False,
    "smollm": True, "starcoder": True, "refact": True, "command-r": True, "codeshell": True,
    "exaone": True, "minerva-7b": True,
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # gguf.TokenType values


def _byte_level(split_digits: bool) -> tuple[Any, Any]:
  """GPT-2 byte-level pre-tokenizer (its regex included) and decoder."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
         if split_digits else byte_level)
  return pre, decoders.ByteLevel()


class BPEVocabulary(seqio.Vocabulary):
  """A seqio.Vocabulary over a `tokenizers.Tokenizer` (see the module docstring for ids)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int, pad_id: int | None = None,
               unk_id: int | None = None, bos_id: int | None = None, name: str = ""):
    self._tokenizer = tokenizer
    self._eos_id = int(eos_id)
    self._unk_id = unk_id
    self._bos_id = bos_id
    self._special_ids = frozenset(int(i) for i, t in tokenizer.get_added_tokens_decoder().items()
                                  if t.special)
    if pad_id is None:
      pad_id = seqio.vocabularies.PAD_ID if seqio.vocabularies.PAD_ID in self._special_ids \
          else self._eos_id
    self._pad_id = int(pad_id)
    self.name = name
    super().__init__(extra_ids=0)

  # --- seqio.Vocabulary interface. ---
  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def unk_id(self) -> int | None:
    return self._unk_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def _encode(self, s: str) -> list[int]:
    return list(self._tokenizer.encode(s, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in
            self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: Iterable[int]) -> str:
    size = self._base_vocab_size
    drop = self._special_ids | {self._pad_id, self._eos_id}
    keep = [int(i) for i in ids if 0 <= int(i) < size and int(i) not in drop]
    return self._tokenizer.decode(keep, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Scalar string -> int32 [L]; rank-1 strings -> ragged int32 [B, None]."""
    s = tf.convert_to_tensor(s, tf.string)

    def encode_flat(flat):
      rows = self.encode_batch([x.decode("utf-8") for x in flat.numpy().tolist()])
      lengths = np.asarray([len(r) for r in rows], np.int64)
      values = np.asarray([i for r in rows for i in r], np.int32)
      return values, lengths

    values, lengths = tf.py_function(encode_flat, [tf.reshape(s, [-1])], [tf.int32, tf.int64])
    values.set_shape([None])
    if s.shape.rank == 0:
      return values
    return tf.RaggedTensor.from_row_lengths(values, lengths)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [..., L] -> strings [...] (pad/eos/special ids dropped)."""
    ids = tf.convert_to_tensor(ids)
    lead = tf.shape(ids)[:-1]

    def decode_rows(rows):
      return np.asarray([self._decode(r) for r in rows.numpy().tolist()], object)

    flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
    out = tf.py_function(decode_rows, [flat], tf.string)
    return tf.reshape(out, lead)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, BPEVocabulary) and self.fingerprint == other.fingerprint

  def __hash__(self) -> int:
    return hash(self.fingerprint)

  @property
  def fingerprint(self) -> str:
    blob = self._tokenizer.to_str() + json.dumps([self._eos_id, self._pad_id, self._unk_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def __repr__(self) -> str:
    return (f"BPEVocabulary({self.name!r}, size={self.vocab_size}, eos={self.eos_id}, "
            f"pad={self.pad_id}, unk={self.unk_id})")


def vocabulary_from_gguf(path: str, *, eos_id: int | None = None,
                         pad_id: int | None = None) -> BPEVocabulary:
  """The byte-level BPE tokenizer embedded in a GGUF file (tokenizer.ggml.*)."""
  import gguf as gguf_lib  # Heavy-ish; only needed here.
  reader = gguf_lib.GGUFReader(path)

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ImportFormatError(
        f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2')")
  pre = field("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE_SPLIT_DIGITS:
    raise ImportFormatError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
        f"{', '.join(sorted(_GGUF_PRE_SPLIT_DIGITS))}")
  pieces = field("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
  types = field("tokenizer.ggml.token_type", [1] * len(pieces))
  tok = tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                        merges=merges, fuse_unk=False))
  tok.pre_tokenizer, tok.decoder = _byte_level(_GGUF_PRE_SPLIT_DIGITS[pre])
  # Control tokens (<|im_start|>, ...) match as whole units in text and keep their ids.
  tok.add_special_tokens([tokenizers.AddedToken(pieces[i], special=True, normalized=False)
                          for i, t in enumerate(types) if t == _GGUF_CONTROL])
  tok.add_tokens([tokenizers.AddedToken(pieces[i], special=False, normalized=False)
                  for i, t in enumerate(types) if t == _GGUF_USER_DEFINED])
  eos = field("tokenizer.ggml.eos_token_id") if eos_id is None else eos_id
  if eos is None:
    raise ImportFormatError(f"{path}: tokenizer.ggml.eos_token_id is missing; pass eos_id")
  return BPEVocabulary(tok, eos_id=int(eos), pad_id=pad_id,
                       unk_id=field("tokenizer.ggml.unknown_token_id"),
                       bos_id=field("tokenizer.ggml.bos_token_id"),
                       name=os.path.basename(path))


def _token_id(tok: tokenizers.Tokenizer, value: Any) -> int | None:
  if isinstance(value, dict):
    value = value.get("content")
  return None if value is None else tok.token_to_id(value)


def vocabulary_from_hf(src: str, *, eos_id: int | None = None,
                       pad_id: int | None = None) -> BPEVocabulary:
  """tokenizer.json of an HF model directory (or the file itself)."""
  # epath: the file may be local or on gs:// (the pod configs keep it in the workdir).
  is_dir = epath.Path(src).is_dir()
  directory = epath.Path(src) if is_dir else epath.Path(src).parent
  path = epath.Path(src) / "tokenizer.json" if is_dir else epath.Path(src)
  if not path.is_file():
    raise ImportFormatError(f"{src}: no tokenizer.json")
  tok = tokenizers.Tokenizer.from_str(path.read_text())

  def read_json(name):
    p = directory / name
    return json.loads(p.read_text()) if p.is_file() else {}

  tcfg = read_json("tokenizer_config.json")
  if eos_id is None:
    eos_id = _token_id(tok, tcfg.get("eos_token"))
  for name in ("generation_config.json", "config.json"):
    if eos_id is None:
      value = read_json(name).get("eos_token_id")
      eos_id = value[0] if isinstance(value, list) else value
  if eos_id is None:
    raise ImportFormatError(f"{src}: no eos token in tokenizer_config.json or config.json; "
                            "pass eos_id")
  return BPEVocabulary(tok, eos_id=int(eos_id), pad_id=pad_id,
                       unk_id=_token_id(tok, tcfg.get("unk_token")),
                       bos_id=_token_id(tok, tcfg.get("bos_token")), name=str(directory))


def load_vocabulary(path: str, **kwargs: Any) -> BPEVocabulary:
  """A .gguf file, an HF model directory with tokenizer.json, or a tokenizer.json file."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return vocabulary_from_gguf(path, **kwargs)
  return vocabulary_from_hf(path, **kwargs)
