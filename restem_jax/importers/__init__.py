"""Import pretrained models and their tokenizers, offline: HF safetensors (Llama 3.x, Qwen 2.5 / 3,
Gemma 2 / 3; see hf.SUPPORTED_ARCHITECTURES) and GGUF.

    cfg, params = import_model("gguf", "/path/model.gguf", mesh)   # sharded on `mesh`
    import_to_checkpoint("gguf", src, workdir + "/base", mesh)      # + Orbax base checkpoint
    vocab = load_vocabulary(src)                                    # seqio.Vocabulary

The CLI (`python -m restem_jax.importers --format=gguf --src=... --out=WORKDIR/base`)
does the second line. See common.py for the memory bound of the conversion.
"""
from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from restem_jax import model as model_lib
from restem_jax.importers.common import ImportFormatError, model_config_dict

FORMATS = ("gguf", "hf")

__all__ = ["FORMATS", "ImportFormatError", "import_model", "import_to_checkpoint",
           "load_vocabulary", "model_config_dict", "checkpoint_metadata"]


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
  """seqio-compatible BPEVocabulary from a .gguf file or an HF tokenizer.json (imports seqio)."""
  from restem_jax.importers import tokenizer
  return tokenizer.load_vocabulary(path, **kwargs)
