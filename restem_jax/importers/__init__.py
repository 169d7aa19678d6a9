"""Import pretrained models and their tokenizers, offline: HF safetensors (Llama 3.x, Qwen 2.5 / 3,
Gemma 2 / 3; see hf.SUPPORTED_ARCHITECTURES), GGUF (llama, qwen2, qwen3, gemma2, gemma3;
gguf.SUPPORTED_ARCHITECTURES) and pip model packages.

    cfg, params = import_model("gguf", "/path/model.gguf", mesh)   # sharded on `mesh`
    import_to_checkpoint("gguf", src, workdir + "/base", mesh)      # + Orbax base checkpoint
    vocab = load_vocabulary(src)                                    # seqio.Vocabulary
    import_to(workdir + "/base", "package:gemma3_270m", mesh)       # once per workdir (base.source
                                                                    # = "import"), + tokenizer.json

The CLI (`python -m restem_jax.importers --format=gguf --src=... --out=WORKDIR/base`)
does the last line (tokenizer to WORKDIR/tokenizer.json). See common.py for the memory bound of the conversion.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any

import jax
from jax.sharding import Mesh

from restem_jax import model as model_lib
from restem_jax.importers import packages
from restem_jax.importers.common import ImportFormatError, model_config_dict

FORMATS = ("gguf", "hf")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

__all__ = ["FORMATS", "ImportFormatError", "ImportResult", "import_model", "import_to",
           "import_to_checkpoint", "load_vocabulary", "model_config_dict", "checkpoint_metadata",
           "peek_model_config", "resolve_source", "tokenizer_path"]


def import_model(fmt: str, src: str, mesh: Mesh, *, max_seq_len: int = 2048,
                 dtype: str = "float32", param_dtype: str = "float32"
                 ) -> tuple[model_lib.ModelConfig, dict]:
  """Reads `src` (a .gguf file or an HF directory) into params sharded on `mesh`.

  max_seq_len: the ModelConfig's context is min(the model's own, this) since the
  KV cache is allocated at that length.
  """
  kwargs = dict(max_seq_len=max_seq_len, dtype=dtype, param_dtype=param_dtype)
  if not os.path.exists(src):
    raise ImportFormatError(f"{src}: no such file or directory")
  if fmt == "gguf":
    from restem_jax.importers import gguf as gguf_importer
    return gguf_importer.load_gguf(src, mesh, **kwargs)
  if fmt == "hf":
    from restem_jax.importers import hf
    return hf.load_hf(src, mesh, **kwargs)
  raise ImportFormatError(f"format {fmt!r} is not one of {FORMATS}")


def peek_model_config(fmt: str, src: str, *, max_seq_len: int = 2048, dtype: str = "float32",
                      param_dtype: str = "float32") -> model_lib.ModelConfig:
  """The ModelConfig import_model would return, from the metadata only (seconds)."""
  kwargs = dict(max_seq_len=max_seq_len, dtype=dtype, param_dtype=param_dtype)
  if fmt == "gguf":
    from restem_jax.importers import gguf as gguf_importer
    return gguf_importer.model_config_from_gguf(gguf_importer.open_reader(src), **kwargs)
  from restem_jax.importers import hf
  return hf.model_config_from_hf(hf.read_hf_config(src), **kwargs)


def checkpoint_metadata(fmt: str, src: str, cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """What the base checkpoint records: the model config and where the tokenizer lives."""
  src = os.path.abspath(src)
  return {"model": model_config_dict(cfg),
          "tokenizer": {"kind": fmt, "path": src},
          "source": {"format": fmt, "path": src}}


def import_to_checkpoint(fmt: str, src: str, out: str, mesh: Mesh, **kwargs: Any
                         ) -> model_lib.ModelConfig:
  """import_model, then checkpoints.save_params(out, params, metadata)."""
  from restem_jax import checkpoints  # Orbax; only needed when writing.
  cfg, params = import_model(fmt, src, mesh, **kwargs)
  checkpoints.save_params(out, params, metadata=checkpoint_metadata(fmt, src, cfg))
  return cfg


def load_vocabulary(path: str, **kwargs: Any):
  """seqio-compatible BPEVocabulary from a .gguf file, an HF tokenizer.json (or its directory)
  or a model package spec "package:NAME" (imports seqio)."""
  from restem_jax.importers import tokenizer
  return tokenizer.load_vocabulary(resolve_source(path)[1], **kwargs)


def resolve_source(spec: str, fmt: str = "auto") -> tuple[str, str]:
  """(format, local path) of a model source: "package:NAME" (packages.PACKAGES), a .gguf
  file or an HF directory. fmt "auto" infers it; "gguf"/"hf" must agree with the source."""
  if fmt not in FORMATS + ("auto",):
    raise ImportFormatError(f"base.format={fmt!r} is not one of {FORMATS + ('auto',)}")
  if packages.is_package_spec(spec):
    pkg = packages.package_of(spec)
    path, found = packages.resolve(spec), pkg.fmt
  else:
    path = str(spec)
    if not os.path.exists(path):
      known = ", ".join(packages.PREFIX + n for n in packages.PACKAGES)
      raise ImportFormatError(f"{path}: no such file or directory (a model source is a .gguf "
                              f"file, an HF directory or one of {known})")
    found = "hf" if os.path.isdir(path) else "gguf"
  if fmt not in ("auto", found):
    raise ImportFormatError(f"{spec} is a {found} source but base.format={fmt!r}")
  return found, path


def tokenizer_path(out: str) -> str:
  """Where import_to writes the tokenizer of the checkpoint `out`: beside it
  (WORKDIR/base -> WORKDIR/tokenizer.json, with WORKDIR/tokenizer_config.json)."""
  # posixpath on the string as given: os.path.normpath would turn gs://b into gs:/b.
  return posixpath.join(posixpath.dirname(str(out).rstrip("/")), TOKENIZER_FILE)


@dataclasses.dataclass(frozen=True)
class ImportResult:
  model: model_lib.ModelConfig  # What the checkpoint holds (config.model must equal it).
  params_path: str  # The Orbax checkpoint (`out`).
  tokenizer_path: str  # A tokenizer.json for task.vocab_path.
  imported: bool  # False when `out` already held the import (resume).


def _check_matches(got: model_lib.ModelConfig, expect: model_lib.ModelConfig | None,
                   spec: str) -> None:
  if expect is None:
    return
  diff = model_lib.config_mismatches(got, expect, label="imported")
  if diff:
    raise ImportFormatError(f"the config does not describe {spec}: {diff}; set these "
                            "config.model fields to the imported values")


def _write_tokenizer(vocab: Any, path: str) -> None:
  """tokenizer.json + tokenizer_config.json (the ids tokenizer.vocabulary_from_hf reads back)."""
  from restem_jax import workdir as wd  # epath: the workdir may be gs://.
  tok = vocab.tokenizer

  def piece(i):
    return None if i is None else tok.id_to_token(int(i))

  wd.write_text_atomic(path, tok.to_str())
  wd.write_json_atomic(posixpath.join(posixpath.dirname(path), TOKENIZER_CONFIG_FILE), {
      "eos_token": piece(vocab.eos_id), "bos_token": piece(vocab.bos_id),
      "unk_token": piece(vocab.unk_id), "pad_token": piece(vocab.pad_id),
      "add_bos_token": vocab.add_bos,
      # task.prompt_format = "chat" renders prompts with it (a resumed run reads it here).
      **({"chat_template": vocab.chat_template} if vocab.chat_template else {})})


def import_to(out: str, spec: str, mesh: Mesh, *, fmt: str = "auto",
              expect: model_lib.ModelConfig | None = None, max_seq_len: int = 2048,
              dtype: str = "float32", param_dtype: str = "float32") -> ImportResult:
  """Imports `spec` (resolve_source) into the Orbax checkpoint `out` once, and its tokenizer
  to tokenizer_path(out).

  If `out` already exists (a resumed run) nothing is read from `spec`. `out` appears
  last (save_params renames it into place), so its existence means the import and the
  tokenizer are complete. `expect` (the run's config.model): the imported config must
  equal it, max_seq_len/dtype/param_dtype default to its values; ImportFormatError names
  the fields that differ.
  """
  from restem_jax import checkpoints, workdir as wd  # Orbax; only needed when writing.
  if expect is not None:
    max_seq_len, dtype, param_dtype = expect.max_seq_len, expect.dtype, expect.param_dtype
  tok_path = tokenizer_path(out)
  if wd.exists(out):
    cfg = model_lib.ModelConfig.from_config(checkpoints.read_metadata(out)["model"])
    _check_matches(cfg, expect, out)
    return ImportResult(cfg, out, tok_path, imported=False)
  fmt, src = resolve_source(spec, fmt)
  kwargs = dict(max_seq_len=max_seq_len, dtype=dtype, param_dtype=param_dtype)
  _check_matches(peek_model_config(fmt, src, **kwargs), expect, spec)  # Before the long work.
  if jax.process_index() == 0:
    _write_tokenizer(load_vocabulary(src), tok_path)
  cfg, params = import_model(fmt, src, mesh, **kwargs)
  meta = checkpoint_metadata(fmt, src, cfg)
  meta["tokenizer"] = {"kind": "hf", "path": tok_path}
  meta["source"]["spec"] = str(spec)
  checkpoints.save_params(out, params, metadata=meta)
  return ImportResult(cfg, out, tok_path, imported=True)
