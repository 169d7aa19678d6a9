"""The run's tokenizer, written for the exported model: HF files and GGUF metadata.

A run's vocabulary is a BPEVocabulary (a `tokenizers.Tokenizer`: imported, or
task.vocab_path) or a seqio SentencePiece model (the embedded one, or a .model
vocab_path). HF: tokenizer.json (a SentencePiece model is converted by transformers'
own SpmConverter, which follows the model's normalizer and merges) and a
tokenizer_config.json naming the special tokens and the chat template. GGUF: the
tokenizer.ggml.* keys llama.cpp reads: SentencePiece -> model "llama" (pieces, scores,
types from the .model proto); byte-level BPE -> model "gpt2" (tokens, types, merges, pre);
a base imported from a GGUF file that still exists -> that file's own tokenizer keys,
copied (Gemma's SentencePiece scores live only there).
"""
from __future__ import annotations

import json
import os
from typing import Any

import gguf as gguf_lib
import ml_dtypes
import numpy as np
import tokenizers

from restem_jax.export import ExportError

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_BYTE_LEVEL_PRE = {  # pre-tokenizer (as tokenizer.json serialises it) -> tokenizer.ggml.pre
    ("ByteLevel",): "gpt2", ("Digits", "ByteLevel"): "smollm"}


def numpy_dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ExportError(f"--dtype={name!r} is not one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _sentencepiece_proto(vocab: Any) -> Any:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(vocab.sp_model)
  return proto


def is_sentencepiece(vocab: Any) -> bool:
  return hasattr(vocab, "sp_model")


def as_tokenizer(vocab: Any) -> tokenizers.Tokenizer:
  """The vocabulary as a `tokenizers.Tokenizer` (encodes to the run's ids)."""
  if not is_sentencepiece(vocab):
    return vocab.tokenizer
  # pylint: disable=import-outside-toplevel
  from transformers.convert_slow_tokenizer import SpmConverter
  proto = _sentencepiece_proto(vocab)
  return SpmConverter.build_tokenizer_from_spm_proto(
      proto, {p.piece: i for i, p in enumerate(proto.pieces)})


def _ids(vocab: Any) -> dict[str, int | None]:
  def get(name):
    value = getattr(vocab, name, None)
    return None if value is None or int(value) < 0 else int(value)
  return {"bos": get("bos_id"), "eos": get("eos_id"), "pad": get("pad_id"), "unk": get("unk_id")}


def special_ids(vocab: Any) -> dict[str, int | None]:
  """bos/eos/pad token ids for config.json and generation_config.json."""
  ids = _ids(vocab)
  return {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad")}


def write_hf_tokenizer(out: str, vocab: Any, max_len: int) -> None:
  tok = as_tokenizer(vocab)
  tok.save(os.path.join(out, "tokenizer.json"))
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                            "model_max_length": max_len,
                            "add_bos_token": bool(getattr(vocab, "add_bos", False)),
                            "add_eos_token": False}
  for k, i in _ids(vocab).items():
    if i is not None:
      config[f"{k}_token"] = tok.id_to_token(i)
  template = getattr(vocab, "chat_template", None)
  if template:
    config["chat_template"] = template
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def copy_gguf_tokenizer(writer: gguf_lib.GGUFWriter, src: str) -> None:
  """Every tokenizer.* key of the GGUF file `src`, as stored."""
  from restem_jax.importers.gguf import open_reader  # pylint: disable=import-outside-toplevel
  for key, field in open_reader(src).fields.items():
    if not key.startswith("tokenizer."):
      continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf_lib.GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), vtype, sub)


def _pre_name(tok: tokenizers.Tokenizer) -> str | None:
  pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
  parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  return _BYTE_LEVEL_PRE.get(tuple(p.get("type") for p in parts))


def write_gguf_tokenizer(writer: gguf_lib.GGUFWriter, vocab: Any) -> None:
  """tokenizer.ggml.* of a SentencePiece or byte-level BPE vocabulary (module docstring)."""
  ids = _ids(vocab)
  if is_sentencepiece(vocab):
    proto = _sentencepiece_proto(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
  else:
    tok = vocab.tokenizer
    pre = _pre_name(tok)
    model = json.loads(tok.to_str())["model"]
    if model.get("type") != "BPE" or pre is None:
      raise ExportError(
          "the run's tokenizer is not one GGUF export can write (supported: SentencePiece "
          "models, byte-level BPE with the GPT-2 or SmolLM pre-tokenizer, or a base imported "
          "from a GGUF file that still exists); export --format=hf instead")
    n = tok.get_vocab_size(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    tokens = [tok.id_to_token(i) for i in range(n)]
    types = [(gguf_lib.TokenType.CONTROL if added[i].special else gguf_lib.TokenType.USER_DEFINED)
             if i in added else gguf_lib.TokenType.NORMAL for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
  for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                   ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
    if ids[key] is not None:
      add(ids[key])
  writer.add_add_bos_token(bool(getattr(vocab, "add_bos", False)))
  writer.add_add_eos_token(False)
  template = getattr(vocab, "chat_template", None)
  if template:
    writer.add_chat_template(template)


def run_vocabulary(workdir: str) -> tuple[Any, str | None]:
  """(the run's tokenizer, a GGUF file whose tokenizer keys it came from, or None).

  As the run resolves it (run.load_vocabulary): task.vocab_path, else the imported base's
  WORKDIR/tokenizer.json, else the task's embedded SentencePiece model.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from restem_jax import checkpoints, importers, tasks, workdir as wd
  config_path = os.path.join(workdir, "config.json")
  if not wd.exists(config_path):
    raise ExportError(f"{workdir}: no config.json, so the run's tokenizer is unknown; pass "
                      "--workdir=the run's workdir")
  config = ml_collections.ConfigDict(wd.read_json(config_path))
  path = config.task.vocab_path or ""
  imported = importers.tokenizer_path(wd.Layout(workdir).base.model)
  source_gguf = None
  if not path and wd.exists(imported):
    path = imported
    source = checkpoints.read_metadata(wd.Layout(workdir).base.model).get("source") or {}
    if source.get("format") == "gguf" and os.path.isfile(source.get("path", "")):
      source_gguf = source["path"]
  if not path:
    return tasks.embedded_vocabulary(), None
  if path.endswith(".model"):
    import seqio  # pylint: disable=import-outside-toplevel
    return seqio.SentencePieceVocabulary(path), None
  if path.endswith(".gguf"):
    source_gguf = path
  return importers.load_vocabulary(path), source_gguf
