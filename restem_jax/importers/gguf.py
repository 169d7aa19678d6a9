"""GGUF files (llama.cpp, "llama" architecture) -> params.

Three quirks of the format are undone here, so common.build_params sees plain
HF-layout float32 tensors:
  * tensor dims are stored in ggml's `ne` order (fastest-varying first), the
    reverse of numpy's: a tensor listed as [576, 49152] is a [49152, 576] array;
  * weights may be quantized (Q4_1, Q8_0, ...): gguf.quants.dequantize expands
    one tensor at a time;
  * llama.cpp's converter permutes the rows of q_proj/k_proj so that each head's
    rotary pairs are adjacent (interleaved RoPE, pairs 2i and 2i+1), while
    model.py uses the HF rotate-half layout (pairs i and i + H/2). `unpermute_rows`
    is the inverse of that row permutation.
"""
from __future__ import annotations

from typing import Any

import gguf as gguf_lib
import numpy as np
from jax.sharding import Mesh

from restem_jax import model as model_lib
from restem_jax.importers import common
from restem_jax.importers.common import ImportFormatError

SUPPORTED_ARCHITECTURES = ("llama",)

# HF suffix -> GGUF tensor name (per layer: "blk.{i}." + name).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def unpermute_rows(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE).

  Within each head of H rows, GGUF stores row 2j as HF row j and row 2j+1 as
  HF row j + H/2.
  """
  rows = w_RxC.shape[0]
  h = rows // n_heads
  return (w_RxC.reshape(n_heads, h // 2, 2, *w_RxC.shape[1:])
          .swapaxes(1, 2).reshape(w_RxC.shape))


def _field(reader: gguf_lib.GGUFReader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _f32(value: Any) -> float:
  """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest
  decimal that round-trips the float32 is the value the converter was given."""
  return float(str(np.float32(value)))


def _required(reader: gguf_lib.GGUFReader, key: str) -> Any:
  value = _field(reader, key)
  if value is None:
    raise ImportFormatError(f"GGUF metadata key {key} is missing")
  return value


class GGUFSource:
  """Dequantized HF-layout tensors from a GGUFReader (memory-mapped file)."""

  def __init__(self, reader: gguf_lib.GGUFReader, n_heads: int, n_kv_heads: int):
    self._tensors = {t.name: t for t in reader.tensors}
    self._n_heads, self._n_kv_heads = n_heads, n_kv_heads

  def gguf_names(self) -> set[str]:
    return set(self._tensors)

  @staticmethod
  def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
      return _TOP_NAMES[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)  # model.layers.{i}.{suffix}
    return f"blk.{layer}.{_LAYER_NAMES[suffix]}"

  def has(self, name: str) -> bool:
    return self.gguf_name(name) in self._tensors

  def get(self, name: str) -> np.ndarray:
    tensor = self._tensors[self.gguf_name(name)]
    shape = tuple(int(s) for s in reversed(tensor.shape))  # ne order -> numpy order
    w = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
    w = np.asarray(w, np.float32).reshape(shape)
    if name.endswith("q_proj.weight"):
      w = unpermute_rows(w, self._n_heads)
    elif name.endswith("k_proj.weight"):
      w = unpermute_rows(w, self._n_kv_heads)
    return w


def model_config_from_gguf(reader: gguf_lib.GGUFReader, *, max_seq_len: int = 2048,
                           dtype: str = "float32", param_dtype: str = "float32"
                           ) -> model_lib.ModelConfig:
  """ModelConfig from the GGUF metadata; ImportFormatError on unsupported features."""
  arch = _required(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ImportFormatError(
        f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ImportFormatError(f"GGUF RoPE scaling {scaling!r} is not supported")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise ImportFormatError("GGUF tensor token_embd.weight is missing")
  d = int(_required(reader, f"{arch}.embedding_length"))
  n = int(_required(reader, f"{arch}.attention.head_count"))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", d // n))
  rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
  if rot != head_dim:
    raise ImportFormatError(
        f"partial rotary embeddings (rope.dimension_count={rot} < head_dim={head_dim}) "
        "are not supported")
  # The embedding's row count is the model's vocabulary (may exceed the tokenizer's).
  vocab = int(tensors["token_embd.weight"].shape[-1])
  context = int(_field(reader, f"{arch}.context_length", max_seq_len))
  return model_lib.ModelConfig(
      vocab_size=vocab,
      d_model=d,
      n_layers=int(_required(reader, f"{arch}.block_count")),
      n_heads=n,
      n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n)),
      head_dim=head_dim,
      d_ff=int(_required(reader, f"{arch}.feed_forward_length")),
      rope_base=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=_f32(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
      # llama.cpp's converter drops output.weight when the head is tied.
      tie_embeddings="output.weight" not in tensors,
      max_seq_len=min(context, int(max_seq_len)),
      dtype=dtype,
      param_dtype=param_dtype,
  )


def load_gguf(src: str, mesh: Mesh, *, max_seq_len: int = 2048, dtype: str = "float32",
              param_dtype: str = "float32") -> tuple[model_lib.ModelConfig, dict]:
  """Imports a llama-architecture GGUF file onto `mesh`: (ModelConfig, params)."""
  try:
    reader = gguf_lib.GGUFReader(src)
  except (OSError, ValueError) as e:
    raise ImportFormatError(f"{src}: not a readable GGUF file ({e})") from e
  cfg = model_config_from_gguf(reader, max_seq_len=max_seq_len, dtype=dtype,
                               param_dtype=param_dtype)
  source = GGUFSource(reader, cfg.n_heads, cfg.n_kv_heads)
  expected = {source.gguf_name(n) for n in common.expected_hf_names(cfg)}
  common.check_no_extra(source.gguf_names(), expected, src)
  return cfg, common.build_params(cfg, mesh, source)
