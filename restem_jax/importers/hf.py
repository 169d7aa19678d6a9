"""Hugging Face safetensors directories (LlamaForCausalLM family) -> params.

A directory holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors are read lazily, one at a time, through
`safetensors.safe_open` (memory-mapped), so the host never holds the whole model.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open

from restem_jax import model as model_lib
from restem_jax.importers import common
from restem_jax.importers.common import ImportFormatError

# Architectures whose forward is exactly model.Transformer's (pre-norm, RMSNorm,
# rotate-half RoPE, GQA, SwiGLU, no biases). Mistral only without a sliding
# window that the context would reach (checked below).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# Buffers some exporters save that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(src: str) -> dict[str, Any]:
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ImportFormatError(f"{src}: no config.json (not a Hugging Face model directory)")
  with open(path) as f:
    return json.load(f)


def _rope_theta(hf: dict[str, Any]) -> float:
  # transformers >= 5 nests RoPE settings under rope_parameters; 4.x keeps them top-level.
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for block in (params, scaling):
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in ("default", None):
      raise ImportFormatError(
          f"RoPE scaling type {kind!r} is not supported (model.py implements plain RoPE)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], *, max_seq_len: int = 2048,
                         dtype: str = "float32", param_dtype: str = "float32"
                         ) -> model_lib.ModelConfig:
  """ModelConfig for an HF config.json dict; ImportFormatError on unsupported features."""
  archs = hf.get("architectures") or [f"<model_type {hf.get('model_type')!r}>"]
  if archs[0] not in SUPPORTED_ARCHITECTURES:
    raise ImportFormatError(
        f"architecture {archs[0]} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ImportFormatError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ImportFormatError(f"{flag}=true is not supported (model.py has no biases)")
  seq = min(int(hf.get("max_position_embeddings", max_seq_len)), int(max_seq_len))
  window = hf.get("sliding_window")
  if window is not None and hf.get("use_sliding_window", True) and int(window) < seq:
    raise ImportFormatError(
        f"{archs[0]} with sliding_window={window} < max_seq_len={seq} is not supported "
        "(model.py attends to the full context)")
  d = int(hf["hidden_size"])
  n = int(hf["num_attention_heads"])
  return model_lib.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=n,
      n_kv_heads=int(hf.get("num_key_value_heads") or n),
      head_dim=int(hf.get("head_dim") or d // n),
      d_ff=int(hf["intermediate_size"]),
      rope_base=_rope_theta(hf),
      # LlamaConfig's default when the key is absent.
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      # LlamaConfig defaults to untied; an absent lm_head with tie=False fails loudly later.
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=seq,
      dtype=dtype,
      param_dtype=param_dtype,
  )


class SafetensorsSource:
  """Lazy HF-layout tensors from one or more .safetensors files."""

  def __init__(self, src: str):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._file_of = {name: os.path.join(src, fname) for name, fname in weight_map.items()}
    else:
      files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
      if not files:
        raise ImportFormatError(f"{src}: no *.safetensors files")
      self._file_of = {}
      for fname in files:
        with safe_open(fname, framework="numpy") as f:
          self._file_of.update({name: fname for name in f.keys()})
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return {n for n in self._file_of if not n.endswith(_IGNORED_SUFFIXES)}

  def has(self, name: str) -> bool:
    return name in self._file_of

  def get(self, name: str) -> np.ndarray:
    fname = self._file_of[name]
    if fname not in self._handles:
      self._handles[fname] = safe_open(fname, framework="numpy")
    handle = self._handles[fname]
    try:
      return handle.get_tensor(name)
    except (TypeError, ValueError):
      # numpy has no bfloat16: safetensors' numpy backend refuses BF16, so read
      # the raw little-endian bytes and view them with ml_dtypes.
      return _read_raw(fname, name)


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def _read_raw(fname: str, name: str) -> np.ndarray:
  with open(fname, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  info = header[name]
  if info["dtype"] not in _RAW_DTYPES:
    raise ImportFormatError(f"tensor {name}: dtype {info['dtype']} is not supported")
  start, end = info["data_offsets"]
  raw = np.memmap(fname, dtype=np.uint8, mode="r", offset=8 + header_len + start,
                  shape=(end - start,))
  return np.asarray(raw.view(_RAW_DTYPES[info["dtype"]]).reshape(info["shape"]), np.float32)


def load_hf(src: str, mesh: Mesh, *, max_seq_len: int = 2048, dtype: str = "float32",
            param_dtype: str = "float32") -> tuple[model_lib.ModelConfig, dict]:
  """Imports an HF Llama-family safetensors directory onto `mesh`: (ModelConfig, params)."""
  cfg = model_config_from_hf(read_hf_config(src), max_seq_len=max_seq_len, dtype=dtype,
                             param_dtype=param_dtype)
  source = SafetensorsSource(src)
  expected = common.expected_hf_names(cfg)
  found = source.names()
  if cfg.tie_embeddings:
    # Some exporters save the tied head anyway; it is the embedding, so ignore it.
    found.discard("lm_head.weight")
  common.check_no_extra(found, expected, src)
  return cfg, common.build_params(cfg, mesh, source)
