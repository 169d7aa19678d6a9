"""ModelConfig + params -> a Hugging Face directory (config.json, safetensors, tokenizer).

The importer run backwards: the architecture is the importers/hf.py family whose fixed
switches (qkv bias, QK-norm, Gemma 2/3 norms and embeddings) the ModelConfig has, and
config.json is written in transformers 5's layout (`rope_parameters`, `layer_types`).
Every config.json is read back by the importer before a tensor is written: a ModelConfig
that the family cannot express (a switch its modeling code does not have, e.g. a Llama
with sliding windows or soft-caps) fails in one line naming the fields, instead of
exporting a model that transformers would run differently. Tensors go through the same
TensorSpec table as import (importers/common.py), one at a time.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from restem_jax import model as model_lib
from restem_jax.export import tokenizer as tok_export
from restem_jax.export import ExportError
from restem_jax.importers import common, hf as hf_importer

# One file up to this many bytes; larger models are sharded with an index (as transformers).
SHARD_BYTES = 5 * 1024 ** 3
_ACTIVATIONS = {ours: hf for hf, ours in hf_importer.ACTIVATIONS.items()}
_ROPE_TYPES = {ours: hf for hf, ours in hf_importer.ROPE_TYPES.items()}


def architecture(cfg: model_lib.ModelConfig) -> str:
  """The HF architecture whose fixed switches are cfg's (Gemma 2 / 3, Qwen 2 / 3, Llama)."""
  if cfg.post_norms or cfg.norm_unit_offset or cfg.embed_scale:
    return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
  if cfg.qkv_bias:
    return "Qwen2ForCausalLM"
  return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def _rope(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  block: dict[str, Any] = {"rope_type": _ROPE_TYPES[cfg.rope_scaling], "rope_theta": cfg.rope_base}
  if cfg.rope_scaling in ("linear", "llama3"):
    block["factor"] = cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":
    block.update(low_freq_factor=cfg.rope_low_freq_factor,
                 high_freq_factor=cfg.rope_high_freq_factor,
                 original_max_position_embeddings=cfg.rope_original_max_len)
  return block


def hf_config(cfg: model_lib.ModelConfig, special_ids: dict[str, int | None] | None = None
              ) -> dict[str, Any]:
  """config.json of cfg; ExportError when the family's modeling code would run another model."""
  arch = architecture(cfg)
  fam = hf_importer.FAMILIES[arch]
  out: dict[str, Any] = {
      "architectures": [arch], "model_type": fam.model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "dtype": "float32", "use_cache": True,
      ("hidden_activation" if fam.gemma else "hidden_act"): _ACTIVATIONS[cfg.mlp_activation],
  }
  if arch == "LlamaForCausalLM":
    out["mlp_bias"] = False
  out.update({k: v for k, v in (special_ids or {}).items() if v is not None})
  rope = _rope(cfg)
  if fam.gemma:
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    out["final_logit_softcapping"] = cfg.final_logit_softcap or None
    if fam.gemma == 2:
      out["attn_logit_softcapping"] = cfg.attn_logit_softcap or None
  if fam.gemma == 3:
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_base or 10000.0}
    out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
  else:
    out["rope_parameters"] = rope
  if cfg.sliding_window:
    if not fam.gemma:
      raise ExportError(f"model.sliding_window={cfg.sliding_window}: {arch} runs every layer "
                        "on the full context in transformers; export supports sliding windows "
                        "for Gemma 2 / 3 only")
    out["sliding_window"] = cfg.sliding_window
  out["layer_types"] = ["sliding_attention" if local else "full_attention"
                        for local in cfg.local_layers]
  check_round_trip(cfg, hf_importer.model_config_from_hf(
      out, max_seq_len=cfg.max_seq_len, dtype=cfg.dtype, param_dtype=cfg.param_dtype), arch)
  return out


def check_round_trip(cfg: model_lib.ModelConfig, back: model_lib.ModelConfig, what: str) -> None:
  """The exported metadata must import back to cfg: else the format cannot express it."""
  diff = model_lib.config_mismatches(back, cfg, label=f"{what} would run", limit=6)
  if diff:
    raise ExportError(f"this model cannot be exported as {what}: {diff} (the family's "
                      "modeling code fixes these)")


def generation_config(special_ids: dict[str, int | None]) -> dict[str, Any]:
  out = {k: v for k, v in special_ids.items() if v is not None}
  return {**out, "do_sample": False}


def _write_tensors(out: str, tensors: Any) -> None:
  """model.safetensors, or model-0000i-of-0000n.safetensors + index past SHARD_BYTES. Each
  shard is written once full, so the host holds at most one shard of tensors."""
  meta = {"format": "pt"}  # transformers refuses safetensors without it.
  written: list[tuple[str, list[str], int]] = []  # (temp file, names, bytes)
  shard: dict[str, np.ndarray] = {}

  def flush() -> None:
    tmp = os.path.join(out, f".shard-{len(written)}.safetensors")
    save_file(shard, tmp, metadata=meta)
    written.append((tmp, list(shard), sum(w.nbytes for w in shard.values())))
    shard.clear()

  for name, w in tensors:
    if shard and sum(x.nbytes for x in shard.values()) + w.nbytes > SHARD_BYTES:
      flush()
    shard[name] = w
  flush()
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(out, "model.safetensors"))
    return
  weight_map = {}
  for i, (tmp, names, _) in enumerate(written):
    fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
    os.replace(tmp, os.path.join(out, fname))
    weight_map.update({name: fname for name in names})
  _write_json(os.path.join(out, "model.safetensors.index.json"),
              {"metadata": {"total_size": sum(n for _, _, n in written)},
               "weight_map": weight_map})


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def write_hf(out: str, cfg: model_lib.ModelConfig, params: Any, vocab: Any = None,
             dtype: str = "float32") -> None:
  """Writes the HF directory `out` (created; existing files are overwritten).

  vocab: the run's tokenizer (a BPEVocabulary or seqio.SentencePieceVocabulary); None
  writes the model without tokenizer files. dtype: float32, bfloat16 or float16.
  """
  special = tok_export.special_ids(vocab) if vocab is not None else {}
  config = hf_config(cfg, special)  # Refuses before anything is written.
  config["dtype"] = dtype
  np_dtype = tok_export.numpy_dtype(dtype)
  os.makedirs(out, exist_ok=True)
  _write_json(os.path.join(out, "config.json"), config)
  _write_json(os.path.join(out, "generation_config.json"), generation_config(special))
  # Tied heads are the embedding: HF names no lm_head tensor for them.
  _write_tensors(out, common.hf_tensors(cfg, params, np_dtype))
  if vocab is not None:
    tok_export.write_hf_tokenizer(out, vocab, cfg.max_seq_len)
