"""Hugging Face safetensors directories -> params: Llama 3.x, Mistral, Qwen 2.5 / 3, Gemma 2 / 3.

A directory holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors are read lazily, one at a time, through
`safetensors.safe_open` (memory-mapped), so the host never holds the whole model.

config.json -> ModelConfig: each family's differences are ModelConfig switches
(model.py); anything else a config asks for (an unknown architecture,
activation, RoPE type, layer pattern) fails here in one line naming the field
and the supported values, before any tensor is read. Both config layouts are
read: transformers >= 5 (`rope_parameters`, for Gemma 3 one block per layer
type, and `layer_types`) and 4.x (top-level `rope_theta` / `rope_scaling` /
`rope_local_base_freq`, `sliding_window_pattern`). Gemma 3's multimodal
checkpoints (Gemma3ForConditionalGeneration, 4B and up) import their text
model: `text_config` and the language_model.* tensors; the vision tower is
left out.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Family:
  """What an architecture's HF modeling code fixes, and its config class's defaults."""
  model_type: str  # config.json's model_type (export writes it with the architecture).
  tie: bool  # tie_word_embeddings default.
  rope_theta: float  # rope_theta default (global layers).
  gemma: int = 0  # 2 or 3: (1 + w) norms, embed scale, sandwich norms, query_pre_attn_scalar.
  qkv_bias: bool = False  # Qwen2Attention has q/k/v biases whatever the config says.
  qk_norm: bool = False
  head_dim: int = 0  # head_dim default; 0 = hidden_size // num_attention_heads.
  # The config class's defaults of the size keys, for config.json files that omit them:
  # transformers saves only values that differ from the defaults, so e.g. Gemma 3 4B's
  # text_config has no vocab_size or head counts. Checked against transformers'
  # config classes in tests/test_import.py.
  defaults: tuple[tuple[str, Any], ...] = ()


def _sizes(vocab: int, d: int, ff: int, layers: int, heads: int, kv: int | None,
           context: int) -> tuple[tuple[str, Any], ...]:
  return (("vocab_size", vocab), ("hidden_size", d), ("intermediate_size", ff),
          ("num_hidden_layers", layers), ("num_attention_heads", heads),
          ("num_key_value_heads", kv), ("max_position_embeddings", context))


_GEMMA3 = dict(model_type="gemma3_text", tie=True, rope_theta=1e6, gemma=3, qk_norm=True, head_dim=256,
               defaults=_sizes(262208, 2304, 9216, 26, 8, 4, 131072))
FAMILIES = {
    # num_key_value_heads None: as many as query heads.
    "LlamaForCausalLM": Family("llama", tie=False, rope_theta=10000.0,
                                defaults=_sizes(32000, 4096, 11008, 32, 32, None, 2048)),
    # Mistral only without a sliding window that the context would reach (checked below).
    "MistralForCausalLM": Family("mistral", tie=False, rope_theta=10000.0,
                                  defaults=_sizes(32000, 4096, 14336, 32, 32, 8, 131072)),
    "Qwen2ForCausalLM": Family("qwen2", tie=False, rope_theta=10000.0, qkv_bias=True,
                                defaults=_sizes(151936, 4096, 22016, 32, 32, 32, 32768)),
    "Qwen3ForCausalLM": Family("qwen3", tie=False, rope_theta=10000.0, qk_norm=True, head_dim=128,
                                defaults=_sizes(151936, 4096, 22016, 32, 32, 32, 32768)),
    "Gemma2ForCausalLM": Family("gemma2", tie=True, rope_theta=10000.0, gemma=2, head_dim=256,
                                 defaults=_sizes(256000, 2304, 9216, 26, 8, 4, 8192)),
    "Gemma3ForCausalLM": Family(**_GEMMA3),
    "Gemma3ForConditionalGeneration": Family(**{**_GEMMA3, "model_type": "gemma3"}),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

# HF activation name -> model.py's mlp_activation (both used in a gated MLP).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# HF rope_type -> model.py's rope_scaling.
ROPE_TYPES = {"default": "none", "llama3": "llama3", "linear": "linear"}
_LAYER_TYPES = ("full_attention", "sliding_attention")

# Buffers some exporters save that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Tensors of a multimodal checkpoint that the text model does not use.
_IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


def read_hf_config(src: str) -> dict[str, Any]:
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ImportFormatError(f"{src}: no config.json (not a Hugging Face model directory)")
  with open(path) as f:
    return json.load(f)


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
  """The language model's config: `text_config` when nested (Gemma 3 multimodal)."""
  if not isinstance(hf.get("text_config"), dict):
    return hf
  text = dict(hf["text_config"])
  if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
    text["tie_word_embeddings"] = hf["tie_word_embeddings"]
  return text


def _rope_fields(hf: dict[str, Any], fam: Family) -> dict[str, Any]:
  """ModelConfig RoPE fields: rope_parameters (transformers 5) or rope_theta/rope_scaling (4.x)."""
  params = hf.get("rope_parameters") or {}
  per_type = any(isinstance(params.get(t), dict) for t in _LAYER_TYPES)
  block = dict(hf.get("rope_scaling") or {})
  block.update((params.get("full_attention") or {}) if per_type else params)
  where = ("rope_parameters.full_attention" if per_type
           else "rope_parameters" if params else "rope_scaling")
  kind = block.get("rope_type", block.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ImportFormatError(
        f"{where}.rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
  partial = block.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if float(partial) != 1.0:
    raise ImportFormatError(f"partial_rotary_factor={partial} is not supported; supported: 1.0")

  def need(key: str) -> float:
    if block.get(key) is None:
      raise ImportFormatError(f"{where}.{key} is missing (needed by rope_type {kind!r})")
    return float(block[key])

  out: dict[str, Any] = {
      "rope_base": float(block.get("rope_theta", hf.get("rope_theta", fam.rope_theta))),
      "rope_scaling": ROPE_TYPES[kind]}
  if kind in ("linear", "llama3"):
    out["rope_scaling_factor"] = need("factor")
  if kind == "llama3":
    out["rope_low_freq_factor"] = need("low_freq_factor")
    out["rope_high_freq_factor"] = need("high_freq_factor")
    out["rope_original_max_len"] = int(need("original_max_position_embeddings"))
  local = (params.get("sliding_attention") or {}) if per_type else {}
  local_kind = local.get("rope_type", "default")
  if local_kind != "default":
    raise ImportFormatError(f"rope_parameters.sliding_attention.rope_type={local_kind!r} is not "
                            "supported; supported: default")
  if "rope_theta" in local:
    out["rope_local_base"] = float(local["rope_theta"])
  elif fam.gemma == 3:
    out["rope_local_base"] = float(hf.get("rope_local_base_freq", 10000.0))
  return out


def _local_layers(hf: dict[str, Any], arch: str, fam: Family, n_layers: int) -> list[bool]:
  """Which layers use sliding-window attention, as the family's modeling code decides."""
  types = hf.get("layer_types")
  if types is not None:
    bad = sorted(set(types) - set(_LAYER_TYPES))
    if bad:
      raise ImportFormatError(
          f"layer_types value {bad[0]!r} is not supported; supported: {', '.join(_LAYER_TYPES)}")
    if len(types) != n_layers:
      raise ImportFormatError(
          f"layer_types has {len(types)} entries but num_hidden_layers={n_layers}")
    return [t == "sliding_attention" for t in types]
  if fam.gemma == 2:
    return [(i + 1) % 2 != 0 for i in range(n_layers)]
  if fam.gemma == 3:
    period = int(hf.get("sliding_window_pattern", 6))
    return [(i + 1) % period != 0 for i in range(n_layers)]
  if arch.startswith("Qwen") and hf.get("use_sliding_window") and hf.get("sliding_window"):
    return [i >= int(hf.get("max_window_layers", 28)) for i in range(n_layers)]
  return [False] * n_layers


def _window_fields(local: list[bool], window: Any) -> dict[str, int]:
  """sliding_window / sliding_window_pattern reproducing `local` (model.py's layer rule)."""
  if not any(local):
    return {"sliding_window": 0, "sliding_window_pattern": 0}
  if not window:
    raise ImportFormatError(
        "layer_types has sliding_attention layers but sliding_window is not set")
  n = len(local)
  for period in [0] + list(range(2, n + 1)):
    if all(is_local == (period == 0 or (i + 1) % period != 0) for i, is_local in enumerate(local)):
      return {"sliding_window": int(window), "sliding_window_pattern": period}
  raise ImportFormatError(
      f"layer_types {['S' if x else 'F' for x in local]} (S = sliding_attention) is not supported; "
      "supported: every layer sliding, or layer i full iff (i + 1) % p == 0 for some p")


def model_config_from_hf(hf: dict[str, Any], *, max_seq_len: int = 2048,
                         dtype: str = "float32", param_dtype: str = "float32"
                         ) -> model_lib.ModelConfig:
  """ModelConfig for an HF config.json dict; ImportFormatError on unsupported features."""
  archs = hf.get("architectures") or [f"<model_type {hf.get('model_type')!r}>"]
  arch = archs[0]
  if arch not in FAMILIES:
    raise ImportFormatError(
        f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  fam = FAMILIES[arch]
  hf = {**{k: v for k, v in fam.defaults if v is not None}, **_text_config(hf)}
  act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
  act = hf.get(act_key) or ("gelu_pytorch_tanh" if fam.gemma else "silu")
  if act not in ACTIVATIONS:
    raise ImportFormatError(
        f"{act_key}={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ImportFormatError(f"{flag}=true is not supported (model.py has no o/MLP biases)")
  if hf.get("use_bidirectional_attention"):
    raise ImportFormatError("use_bidirectional_attention=true is not supported; supported: false")
  seq = min(int(hf.get("max_position_embeddings", max_seq_len)), int(max_seq_len))
  n_layers = int(hf["num_hidden_layers"])
  if arch == "MistralForCausalLM":
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and int(window) < seq:
      raise ImportFormatError(
          f"{arch} with sliding_window={window} < max_seq_len={seq} is not supported "
          "(model.py attends to the full context)")
    windows = _window_fields([False] * n_layers, None)
  else:
    windows = _window_fields(_local_layers(hf, arch, fam, n_layers),
                             hf.get("sliding_window", 4096 if fam.gemma else None))
  rope = _rope_fields(hf, fam)
  if windows["sliding_window"] and rope["rope_scaling"] != "none" and fam.gemma != 3:
    # Only Gemma 3 keeps its sliding-window layers' RoPE unscaled, as model.py does.
    raise ImportFormatError(
        f"{arch} with sliding-window layers and RoPE scaling {rope['rope_scaling']!r} is not "
        "supported; supported: RoPE scaling without sliding windows, or Gemma 3")
  d = int(hf["hidden_size"])
  n = int(hf["num_attention_heads"])
  gemma = bool(fam.gemma)
  # transformers' Gemma3Attention never applies attn_logit_softcapping (only Gemma 2 does);
  # Gemma2Config's defaults are 50 / 30, Gemma3's None (an explicit null turns a cap off).
  attn_cap = hf.get("attn_logit_softcapping", 50.0) if fam.gemma == 2 else None
  final_cap = hf.get("final_logit_softcapping", 30.0 if fam.gemma == 2 else None) if gemma else None
  return model_lib.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d,
      n_layers=n_layers,
      n_heads=n,
      n_kv_heads=int(hf.get("num_key_value_heads") or n),
      head_dim=int(hf.get("head_dim") or fam.head_dim or d // n),
      d_ff=int(hf["intermediate_size"]),
      # The config classes' default when the key is absent.
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      # An absent lm_head with tie=False fails loudly later.
      tie_embeddings=bool(hf.get("tie_word_embeddings", fam.tie)),
      max_seq_len=seq,
      dtype=dtype,
      param_dtype=param_dtype,
      **rope,
      qkv_bias=fam.qkv_bias,
      qk_norm=fam.qk_norm,
      norm_unit_offset=gemma,
      embed_scale=gemma,
      mlp_activation=ACTIVATIONS[act],
      post_norms=gemma,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256) if gemma else 0.0,
      attn_logit_softcap=float(attn_cap or 0.0),
      final_logit_softcap=float(final_cap or 0.0),
      **windows,
  )


class SafetensorsSource:
  """Lazy HF-layout tensors from one or more .safetensors files, by text-model name.

  A multimodal checkpoint's language model ("language_model.model.layers.0...",
  transformers 4.5x and 5.x on save; "model.language_model.layers.0..." in
  5.x's in-memory layout) is read under the plain names ("model.layers.0...");
  its vision tensors are not listed.
  """

  def __init__(self, src: str):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      file_of = {name: os.path.join(src, fname) for name, fname in weight_map.items()}
    else:
      files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
      if not files:
        raise ImportFormatError(f"{src}: no *.safetensors files")
      file_of = {}
      for fname in files:
        with safe_open(fname, framework="numpy") as f:
          file_of.update({name: fname for name in f.keys()})
    # name -> (file, stored name).
    self._where = {_text_name(name): (fname, name) for name, fname in file_of.items()
                   if not name.startswith(_IGNORED_PREFIXES)}
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return {n for n in self._where if not n.endswith(_IGNORED_SUFFIXES)}

  def has(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    fname, stored = self._where[name]
    if fname not in self._handles:
      self._handles[fname] = safe_open(fname, framework="numpy")
    handle = self._handles[fname]
    try:
      return handle.get_tensor(stored)
    except (TypeError, ValueError):
      # numpy has no bfloat16: safetensors' numpy backend refuses BF16, so read
      # the raw little-endian bytes and view them with ml_dtypes.
      return _read_raw(fname, stored)


def _text_name(name: str) -> str:
  for prefix, plain in (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head.")):
    if name.startswith(prefix):
      return plain + name[len(prefix):]
  return name


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
  """Imports an HF safetensors directory (SUPPORTED_ARCHITECTURES) onto `mesh`: (cfg, params)."""
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
