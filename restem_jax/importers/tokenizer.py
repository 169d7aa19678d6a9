"""Pretrained tokenizers (GGUF-embedded or HF tokenizer.json) as seqio vocabularies.

`BPEVocabulary` is a seqio.Vocabulary over a `tokenizers.Tokenizer`, so tasks,
prompts and the sampler use a pretrained model's tokenizer exactly as they use
the embedded SentencePiece one. Two GGUF vocabularies are rebuilt:
  * byte-level BPE (`tokenizer.ggml.model = gpt2`: SmolLM2, Llama 3, Qwen):
    the file lists vocabulary and merges;
  * SentencePiece BPE (`tokenizer.ggml.model = llama` with arch gemma*: Gemma):
    pieces, scores and token types, no merges (see `_sentencepiece_bpe`).

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
The chat template stored with the tokenizer (GGUF tokenizer.chat_template, HF
tokenizer_config.json "chat_template") rides along as `chat_template` for
task.prompt_format = "chat" (tasks/chat.py); None when there is none.
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
from tokenizers import decoders, models, normalizers, pre_tokenizers

from restem_jax.importers.common import ImportFormatError

# llama.cpp's `tokenizer.ggml.pre` names -> whether digits are split one by one
# before the GPT-2 regex (the rest of the pre-tokenization is identical).
_GGUF_PRE_SPLIT_DIGITS = {
    "gpt2": False, "default": False, "mpt": False, "olmo": False, "jais": False,
    "smollm": True, "starcoder": True, "refact": True, "command-r": True, "codeshell": True,
    "exaone": True, "minerva-7b": True,
}
_GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_BYTE = 3, 4, 6  # gguf.TokenType values
# GGUF architectures whose `llama` (SentencePiece) vocabulary we rebuild: Gemma's
# conventions (no dummy prefix, byte fallback, whitespace-run pieces) are assumed.
_SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_SPACE = "\u2581"  # SentencePiece's visible space.


def _byte_level(split_digits: bool) -> tuple[Any, Any]:
  """GPT-2 byte-level pre-tokenizer (its regex included) and decoder."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
         if split_digits else byte_level)
  return pre, decoders.ByteLevel()


class BPEVocabulary(seqio.Vocabulary):
  """A seqio.Vocabulary over a `tokenizers.Tokenizer` (see the module docstring for ids)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int, pad_id: int | None = None,
               unk_id: int | None = None, bos_id: int | None = None, add_bos: bool = False,
               name: str = "", chat_template: str | None = None):
    self._tokenizer = tokenizer
    self.chat_template = chat_template or None
    self._eos_id = int(eos_id)
    self._unk_id = unk_id
    self._bos_id = bos_id
    if add_bos and bos_id is None:
      raise ImportFormatError(f"{name}: add_bos needs a bos token id")
    # Whether the model expects BOS first in every sequence (Gemma: yes, it was trained
    # so; SmolLM2: no). encode() never adds it: targets are encoded alone and appended
    # to prompts, so only prompt encoding (encode_prompt) may start with it.
    self.add_bos = bool(add_bos)
    self._special_ids = frozenset(int(i) for i, t in tokenizer.get_added_tokens_decoder().items()
                                  if t.special)
    if pad_id is None:
      pad_id = seqio.vocabularies.PAD_ID if seqio.vocabularies.PAD_ID in self._special_ids \
          else self._eos_id
    self._pad_id = int(pad_id)
    # Cached: tokenizers builds the whole vocabulary map to count it (Gemma 3: 262k entries
    # per call), and seqio's decode asks for it every time.
    self._size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    # Never in decoded text (Gemma 3 has ~6k special ids: built once, not per decode).
    self._dropped_ids = self._special_ids | {self._pad_id, self._eos_id}
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
    return self._size

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def special_tokens(self) -> dict[str, str]:
    """bos_token / eos_token as text: the variables chat templates use (as transformers
    passes them)."""
    out = {}
    for name, i in (("bos_token", self._bos_id), ("eos_token", self._eos_id)):
      if i is not None:
        out[name] = self._tokenizer.id_to_token(int(i))
    return out

  def _encode(self, s: str) -> list[int]:
    return list(self._tokenizer.encode(s, add_special_tokens=False).ids)

  def encode_prompt(self, s: str) -> list[int]:
    """Ids of a text that starts a sequence: BOS first when the model expects it."""
    return ([int(self._bos_id)] if self.add_bos else []) + self._encode(s)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in
            self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode(self._kept_ids(ids), skip_special_tokens=True)

  def _kept_ids(self, ids: Iterable[int]) -> list[int]:
    size, drop = self._base_vocab_size, self._dropped_ids
    return [int(i) for i in ids if 0 <= int(i) < size and int(i) not in drop]

  def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
    """[decode(r) for r in rows] in one call into the Rust tokenizer: the stop tables
    decode every id of the vocabulary twice (262k ids for Gemma 3: minutes one by one)."""
    eos, unk, size = self._eos_id, self._unk_id, self._base_vocab_size
    clean = []
    for r in rows:  # seqio.Vocabulary.decode's cleaning: unk for ids past the vocabulary,
      r = [unk if unk is not None and int(i) >= size else int(i) for i in r]
      if eos is not None and eos in r:  # then cut after the first EOS.
        r = r[:r.index(eos) + 1]
      clean.append(self._kept_ids(r))
    return self._tokenizer.decode_batch(clean, skip_special_tokens=True)

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
    # What changes token ids: bos only through encode_prompt.
    ids = [self._eos_id, self._pad_id, self._unk_id] + ([self._bos_id] if self.add_bos else [])
    blob = self._tokenizer.to_str() + json.dumps(ids)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def __repr__(self) -> str:
    return (f"BPEVocabulary({self.name!r}, size={self.vocab_size}, eos={self.eos_id}, "
            f"pad={self.pad_id}, unk={self.unk_id}, bos={self.bos_id}, add_bos={self.add_bos})")


def _byte_level_bpe(path: str, pieces: list[str], field: Any) -> tokenizers.Tokenizer:
  """GPT-2-style byte-level BPE: the file lists the merges; `pre` names the split regex."""
  pre = field("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE_SPLIT_DIGITS:
    raise ImportFormatError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
        f"{', '.join(sorted(_GGUF_PRE_SPLIT_DIGITS))}")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
  tok = tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                        merges=merges, fuse_unk=False))
  tok.pre_tokenizer, tok.decoder = _byte_level(_GGUF_PRE_SPLIT_DIGITS[pre])
  return tok


def _sentencepiece_bpe(path: str, pieces: list[str], scores: Sequence[float],
                       types: Sequence[int], unk_id: int | None) -> tokenizers.Tokenizer:
  """Gemma's SentencePiece BPE model as a `tokenizers` BPE with byte fallback.

  SentencePiece BPE (bpe_model.cc) encodes by repeatedly merging the adjacent pair
  whose concatenation is the best-scored piece of the vocabulary; user-defined pieces
  are matched whole first; characters outside the vocabulary become <0xXX> byte
  pieces. A `tokenizers` BPE does the same given merges ranked by that order, so the
  merges are every split (left, right) of a piece into two pieces, ranked by the
  merged piece: user-defined pieces first (SentencePiece matches them before merging;
  llama.cpp overwrites their score with -1000, so their file order is used), then
  normal pieces by score. Control and byte pieces are never produced by merging.
  Gemma's normalizer only makes spaces visible (no dummy prefix, add_space_prefix is
  false in its GGUF), and nothing pre-splits the text.
  """
  # llama.cpp writes the whitespace-run pieces ("\u2581\u2581", ...) with real spaces
  # (their HF added-token spelling); inside SentencePiece a space is always \u2581.
  pieces = [p.replace(" ", _SPACE) if p and not p.strip(" ") else p for p in pieces]
  vocab = {p: i for i, p in enumerate(pieces)}
  if len(vocab) != len(pieces):
    raise ImportFormatError(f"{path}: tokenizer.ggml.tokens has duplicate pieces")
  user = [i for i, t in enumerate(types) if t == _GGUF_USER_DEFINED]
  normal = sorted((i for i, t in enumerate(types) if t == 1), key=lambda i: -scores[i])
  merges = []
  for i in user + normal:
    piece = pieces[i]
    merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab)
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
      unk_token=pieces[unk_id] if unk_id is not None else None))
  tok.normalizer = normalizers.Replace(" ", _SPACE)
  tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  return tok


def vocabulary_from_gguf(path: str, *, eos_id: int | None = None,
                         pad_id: int | None = None) -> BPEVocabulary:
  """The tokenizer embedded in a GGUF file (tokenizer.ggml.*): byte-level BPE or Gemma's
  SentencePiece BPE (see the module docstring)."""
  from restem_jax.importers.gguf import open_reader  # The weights' importer shares the parse.
  reader = open_reader(path)

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  kind, arch = field("tokenizer.ggml.model"), field("general.architecture")
  pieces = field("tokenizer.ggml.tokens")
  if not pieces:
    raise ImportFormatError(f"{path}: no tokenizer.ggml.tokens (this GGUF carries no tokenizer)")
  types = field("tokenizer.ggml.token_type", [1] * len(pieces))
  unk = field("tokenizer.ggml.unknown_token_id")
  if kind == "gpt2":
    tok = _byte_level_bpe(path, pieces, field)
  elif kind == "llama" and arch in _SENTENCEPIECE_ARCHITECTURES:
    tok = _sentencepiece_bpe(path, pieces, field("tokenizer.ggml.scores"), types, unk)
  else:
    raise ImportFormatError(
        f"{path}: tokenizer.ggml.model={kind!r} with architecture {arch!r} is not supported; "
        "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece) with architecture "
        f"{'/'.join(_SENTENCEPIECE_ARCHITECTURES)}")
  vocab = tok.get_vocab(with_added_tokens=False)
  # Control tokens (<|im_start|>, <start_of_turn>, ...) match as whole units in text and
  # keep their ids; so do user-defined ones (<b>, "\n\n", ...) that the model kept
  # under their own spelling (Gemma's respelled whitespace runs are ordinary pieces).
  tok.add_special_tokens([tokenizers.AddedToken(pieces[i], special=True, normalized=False)
                          for i, t in enumerate(types) if t == _GGUF_CONTROL])
  tok.add_tokens([tokenizers.AddedToken(pieces[i], special=False, normalized=False)
                  for i, t in enumerate(types)
                  if t == _GGUF_USER_DEFINED and vocab.get(pieces[i]) == i])
  eos = field("tokenizer.ggml.eos_token_id") if eos_id is None else eos_id
  if eos is None:
    raise ImportFormatError(f"{path}: tokenizer.ggml.eos_token_id is missing; pass eos_id")
  # llama.cpp's default when the flag is absent: SentencePiece vocabularies add BOS.
  add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama"))
  return BPEVocabulary(tok, eos_id=int(eos), pad_id=pad_id, unk_id=unk,
                       bos_id=field("tokenizer.ggml.bos_token_id"), add_bos=add_bos,
                       name=os.path.basename(path),
                       chat_template=field("tokenizer.chat_template"))


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
  bos_id = _token_id(tok, tcfg.get("bos_token"))
  template = tcfg.get("chat_template")
  if isinstance(template, list):  # Named templates (older HF files): the default one.
    template = {t.get("name"): t.get("template") for t in template}.get("default")
  if (directory / "chat_template.jinja").is_file():  # Where newer transformers saves it.
    template = (directory / "chat_template.jinja").read_text()
  add_bos = tcfg.get("add_bos_token")
  if add_bos is None and bos_id is not None:
    # Not stated (Llama 3: its tokenizer.json's post-processor prepends <|begin_of_text|>):
    # the post-processor decides, as in transformers' fast tokenizers.
    add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
  return BPEVocabulary(tok, eos_id=int(eos_id), pad_id=pad_id,
                       unk_id=_token_id(tok, tcfg.get("unk_token")), bos_id=bos_id,
                       add_bos=bool(add_bos) and bos_id is not None,
                       name=str(directory), chat_template=template)


def load_vocabulary(path: str, **kwargs: Any) -> BPEVocabulary:
  """A .gguf file, an HF model directory with tokenizer.json, or a tokenizer.json file."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return vocabulary_from_gguf(path, **kwargs)
  return vocabulary_from_hf(path, **kwargs)
