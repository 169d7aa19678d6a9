"""GGUF files (llama.cpp; architectures llama, qwen2, qwen3, gemma2, gemma3) -> params.

The format's quirks are undone here, so common.build_params sees plain HF-layout
float32 tensors under HF names:
  * tensor names: llama.cpp's ("blk.3.attn_q.weight") come from the `gguf`
    package's own per-architecture name map (gguf.get_tensor_name_map), the table
    llama.cpp's converter writes with;
  * tensor dims are stored in ggml's `ne` order (fastest-varying first), the
    reverse of numpy's: a tensor listed as [576, 49152] is a [49152, 576] array;
  * weights may be quantized (Q4_1, Q8_0, Q4_K, Q6_K, ...): gguf.quants.dequantize
    expands one tensor at a time;
  * llama: the converter permutes the rows of q_proj/k_proj so that each head's
    rotary pairs are adjacent (interleaved RoPE, pairs 2i and 2i+1), while
    model.py uses the HF rotate-half layout (pairs i and i + H/2). `unpermute_rows`
    is the inverse of that row permutation. Gemma is converted unpermuted (llama.cpp
    runs it with NeoX-style = rotate-half RoPE), and so are Qwen 2 / 3.
  * gemma2, gemma3: the converter stores every RMSNorm weight as 1 + w (Gemma3Model.norm_shift
    in llama.cpp's convert_hf_to_gguf.py: "Gemma3RMSNorm adds 1.0 to the norm value"),
    since ggml's RMSNorm multiplies by the stored weight. model.py's norm_unit_offset
    computes x * (1 + w) from the checkpoint's w, so 1 is subtracted back here (as
    transformers' GGUF loader does).
  * gemma3 settings the file does not store are llama.cpp's fixed values for the
    architecture (src/llama-model.cpp, LLM_ARCH_GEMMA3): five local layers to one
    global (pattern 6), local RoPE base 10000, attention scale head_dim^-0.5 except
    the 27B (62 layers): (d_model / n_heads)^-0.5. Keys a newer converter writes
    (attention.sliding_window_pattern, rope.freq_base_swa) take precedence.
  * llama with Llama 3 RoPE scaling: no metadata key, a rope_freqs.weight tensor of
    per-frequency divisors, turned back into llama3 parameters by rope_freqs.py.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import gguf as gguf_lib
import numpy as np
from jax.sharding import Mesh

from restem_jax import model as model_lib
from restem_jax.importers import common, rope_freqs
from restem_jax.importers.common import ImportFormatError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")

GGUF_ARCH = {"llama": gguf_lib.MODEL_ARCH.LLAMA, "qwen2": gguf_lib.MODEL_ARCH.QWEN2,
             "qwen3": gguf_lib.MODEL_ARCH.QWEN3, "gemma2": gguf_lib.MODEL_ARCH.GEMMA2,
             "gemma3": gguf_lib.MODEL_ARCH.GEMMA3}
# Architectures whose RMSNorm weights are stored as 1 + w (module docstring).
NORM_SHIFTED = ("gemma2", "gemma3")
# llama.cpp's hard-coded Gemma 3 values (see the module docstring).
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62
_GEMMA2_27B_LAYERS = 46  # llama.cpp's Gemma 2 27B: attention scale (d_model / n_heads)^-0.5.
_GEMMA2_PATTERN = 2  # llama.cpp's Gemma 2: every other layer local.


def unpermute_rows(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE).

  Within each head of H rows, GGUF stores row 2j as HF row j and row 2j+1 as
  HF row j + H/2.
  """
  h = w_RxC.shape[0] // n_heads
  return (w_RxC.reshape(n_heads, h // 2, 2, *w_RxC.shape[1:])
          .swapaxes(1, 2).reshape(w_RxC.shape))


def permute_rows(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (rotate-half -> interleaved), unpermute_rows' inverse."""
  h = w_RxC.shape[0] // n_heads
  return (w_RxC.reshape(n_heads, 2, h // 2, *w_RxC.shape[1:])
          .swapaxes(1, 2).reshape(w_RxC.shape))


def gguf_tensor_name(names: gguf_lib.TensorNameMap, hf_name: str, arch: str) -> str:
  """llama.cpp's name of an HF tensor ("model.layers.3.self_attn.q_proj.weight" ->
  "blk.3.attn_q.weight"), from the gguf package's map for the architecture."""
  base, _, suffix = hf_name.rpartition(".")  # "...q_proj" + "weight"
  name = names.get_name(base)
  if name is None:
    raise ImportFormatError(f"tensor {hf_name} has no GGUF name for architecture {arch}")
  return f"{name}.{suffix}"


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> gguf_lib.GGUFReader:
  del size, mtime_ns  # Cache key only: a rewritten file is read again.
  return gguf_lib.GGUFReader(path)


def open_reader(path: str) -> gguf_lib.GGUFReader:
  """A (memory-mapped) GGUFReader, shared by the weight and tokenizer importers.

  Parsing the metadata of a 262k-token vocabulary takes GGUFReader ~10 s of CPU, so
  one process parses a file once.
  """
  path = os.path.realpath(path)
  try:
    st = os.stat(path)
    return _cached_reader(path, st.st_size, st.st_mtime_ns)
  except (OSError, ValueError) as e:
    raise ImportFormatError(f"{path}: not a readable GGUF file ({e})") from e


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
  """Dequantized HF-layout tensors under HF names, from a GGUFReader (memory-mapped file)."""

  def __init__(self, reader: gguf_lib.GGUFReader, arch: str, cfg: model_lib.ModelConfig):
    self._tensors = {t.name: t for t in reader.tensors}
    self._arch, self._cfg = arch, cfg
    self._names = gguf_lib.get_tensor_name_map(GGUF_ARCH[arch], cfg.n_layers)

  def gguf_names(self) -> set[str]:
    return set(self._tensors)

  def gguf_name(self, hf_name: str) -> str:
    return gguf_tensor_name(self._names, hf_name, self._arch)

  def has(self, name: str) -> bool:
    return self.gguf_name(name) in self._tensors

  def get(self, name: str) -> np.ndarray:
    tensor = self._tensors[self.gguf_name(name)]
    shape = tuple(int(s) for s in reversed(tensor.shape))  # ne order -> numpy order
    w = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
    w = np.asarray(w, np.float32).reshape(shape)
    if self._arch == "llama":
      if name.endswith("q_proj.weight"):
        w = unpermute_rows(w, self._cfg.n_heads)
      elif name.endswith("k_proj.weight"):
        w = unpermute_rows(w, self._cfg.n_kv_heads)
    elif self._arch in NORM_SHIFTED and name.endswith("norm.weight"):
      w = w - np.float32(1.0)  # Stored as 1 + w (module docstring).
    return w


def _gemma3_pattern(reader: gguf_lib.GGUFReader, arch: str, n_layers: int) -> int:
  """Period of the local/global layer pattern; a per-layer bool list must be periodic."""
  value = _field(reader, f"{arch}.attention.sliding_window_pattern", _GEMMA3_PATTERN)
  if not isinstance(value, list):
    return int(value)
  for period in range(1, n_layers + 1):
    if all(bool(value[i]) == ((i + 1) % period != 0) for i in range(n_layers)):
      return period
  raise ImportFormatError(f"GGUF {arch}.attention.sliding_window_pattern={value} is not a "
                          "periodic local/global pattern ((i + 1) % p != 0 = local)")


def _family_fields(reader: gguf_lib.GGUFReader, arch: str, d: int, n: int, head_dim: int,
                   n_layers: int) -> dict[str, Any]:
  """ModelConfig switches of the architecture (model_fields: defaults are plain Llama)."""
  scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
  # Linear scaling (Gemma 3 4B and up) applies to the global layers only, as in llama.cpp.
  allowed = ("none", None, "linear") if arch == "gemma3" else ("none", None)
  if scaling not in allowed:
    raise ImportFormatError(f"GGUF RoPE scaling {scaling!r} is not supported for {arch}; "
                            f"supported: {', '.join(str(a) for a in allowed if a)}")
  if arch in ("llama", "qwen2", "qwen3"):
    fields = {"qkv_bias": arch == "qwen2", "qk_norm": arch == "qwen3"}
    tensor = {t.name: t for t in reader.tensors}.get(rope_freqs.TENSOR)
    if arch == "llama" and tensor is not None:  # Llama 3.x (module docstring).
      factors = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
      fields.update(rope_freqs.llama3_fields(
          factors, _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)), head_dim))
    return fields
  big = _GEMMA3_27B_LAYERS if arch == "gemma3" else _GEMMA2_27B_LAYERS
  fields: dict[str, Any] = dict(
      norm_unit_offset=True, embed_scale=True, mlp_activation="gelu_tanh", post_norms=True,
      qk_norm=arch == "gemma3",
      sliding_window=int(_required(reader, f"{arch}.attention.sliding_window")),
      query_pre_attn_scalar=float(d // n if n_layers == big else head_dim),
      final_logit_softcap=_f32(_field(reader, f"{arch}.final_logit_softcapping",
                                      30.0 if arch == "gemma2" else 0.0)))
  if arch == "gemma2":  # llama.cpp's defaults when the keys are absent: 50 / 30.
    fields.update(sliding_window_pattern=_GEMMA2_PATTERN, attn_logit_softcap=_f32(
        _field(reader, f"{arch}.attn_logit_softcapping", 50.0)))
    return fields
  fields.update(
      sliding_window_pattern=_gemma3_pattern(reader, arch, n_layers),
      rope_local_base=_f32(_field(reader, f"{arch}.rope.freq_base_swa",
                                  _GEMMA3_LOCAL_ROPE_BASE)),
      attn_logit_softcap=_f32(_field(reader, f"{arch}.attn_logit_softcapping", 0.0)))
  if scaling == "linear":
    fields.update(rope_scaling="linear",
                  rope_scaling_factor=_f32(_required(reader, f"{arch}.rope.scaling.factor")))
  return fields


def model_config_from_gguf(reader: gguf_lib.GGUFReader, *, max_seq_len: int = 2048,
                           dtype: str = "float32", param_dtype: str = "float32"
                           ) -> model_lib.ModelConfig:
  """ModelConfig from the GGUF metadata; ImportFormatError on unsupported features."""
  arch = _required(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ImportFormatError(
        f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise ImportFormatError("GGUF tensor token_embd.weight is missing")
  d = int(_required(reader, f"{arch}.embedding_length"))
  n = int(_required(reader, f"{arch}.attention.head_count"))
  n_layers = int(_required(reader, f"{arch}.block_count"))
  head_dim = int(_field(reader, f"{arch}.attention.key_length", d // n))
  value_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
  if value_dim != head_dim:
    raise ImportFormatError(f"GGUF {arch}.attention.value_length={value_dim} differs from "
                            f"key_length={head_dim}; model.py has one head_dim")
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
      n_layers=n_layers,
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
      **_family_fields(reader, arch, d, n, head_dim, n_layers),
  )


def load_gguf(src: str, mesh: Mesh, *, max_seq_len: int = 2048, dtype: str = "float32",
              param_dtype: str = "float32") -> tuple[model_lib.ModelConfig, dict]:
  """Imports a GGUF file (SUPPORTED_ARCHITECTURES) onto `mesh`: (ModelConfig, params)."""
  reader = open_reader(src)
  cfg = model_config_from_gguf(reader, max_seq_len=max_seq_len, dtype=dtype,
                               param_dtype=param_dtype)
  arch = _required(reader, "general.architecture")
  source = GGUFSource(reader, arch, cfg)
  expected = {source.gguf_name(n) for n in common.expected_hf_names(cfg)}
  if arch == "llama":
    expected.add(rope_freqs.TENSOR)  # Read into cfg's RoPE scaling.
  common.check_no_extra(source.gguf_names(), expected, src)
  return cfg, common.build_params(cfg, mesh, source)
