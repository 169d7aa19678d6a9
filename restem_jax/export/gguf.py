"""ModelConfig + params -> one GGUF file (llama.cpp), written with the `gguf` package.

The GGUF importer run backwards (importers/gguf.py undoes each of these):
  * architecture llama, qwen2, qwen3, gemma2 or gemma3 (the HF family, export/hf.py),
    tensor names from the gguf package's own map for it;
  * llama: q/k rows permuted to llama.cpp's interleaved RoPE layout (permute_rows);
  * gemma2 / gemma3: every RMSNorm weight stored as 1 + w (llama.cpp multiplies by it);
  * tensor types: f32, f16, bf16 or q8_0 for matrices (gguf.quants writes them; a row
    length that is not a multiple of the block size falls back to f16, as llama.cpp's
    converter does); norms and biases stay f32.
The metadata is what llama.cpp reads for the architecture. Settings it hard-codes
(Gemma's attention scale, Gemma 2's layer pattern) cannot be stored, so the written file
is read back by our importer and must give the same ModelConfig, else it is deleted and
the export refused in one line. Llama 3 RoPE scaling (llama) is written as llama.cpp's
converter writes it: no scaling key, a float32 rope_freqs.weight tensor of per-frequency
divisors (importers/rope_freqs.py); the file keeps only those, so the read-back compares
them rather than the llama3 parameters. transformers' GGUF loader ignores the tensor.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import gguf as gguf_lib
import numpy as np

from restem_jax import model as model_lib
from restem_jax.export import ExportError
from restem_jax.export import hf as hf_export
from restem_jax.export import tokenizer as tok_export
from restem_jax.importers import ImportFormatError, common
from restem_jax.importers import gguf as gguf_importer
from restem_jax.importers import rope_freqs

TENSOR_TYPES = {"f32": gguf_lib.GGMLQuantizationType.F32,
                "f16": gguf_lib.GGMLQuantizationType.F16,
                "bf16": gguf_lib.GGMLQuantizationType.BF16,
                "q8_0": gguf_lib.GGMLQuantizationType.Q8_0}
_FILE_TYPES = {"f32": gguf_lib.LlamaFileType.ALL_F32, "f16": gguf_lib.LlamaFileType.MOSTLY_F16,
               "bf16": gguf_lib.LlamaFileType.MOSTLY_BF16,
               "q8_0": gguf_lib.LlamaFileType.MOSTLY_Q8_0}
_ARCH_OF = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}


def gguf_architecture(cfg: model_lib.ModelConfig) -> str:
  return _ARCH_OF[hf_export.architecture(cfg)]


def _metadata(w: gguf_lib.GGUFWriter, cfg: model_lib.ModelConfig, arch: str, ttype: str) -> None:
  w.add_name("restem-jax export")
  w.add_file_type(_FILE_TYPES[ttype])
  w.add_vocab_size(cfg.vocab_size)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.n_layers)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_base)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  if cfg.rope_scaling == "linear":
    w.add_rope_scaling_type(gguf_lib.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scaling_factor)
  if arch in gguf_importer.NORM_SHIFTED:
    w.add_sliding_window(cfg.sliding_window)
    w.add_final_logit_softcapping(cfg.final_logit_softcap)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
  if arch == "gemma3":
    w.add_rope_freq_base_swa(cfg.rope_local_base or 10000.0)
    w.add_sliding_window_pattern(list(cfg.local_layers))


def _to_gguf(name: str, w: np.ndarray, cfg: model_lib.ModelConfig, arch: str) -> np.ndarray:
  if arch == "llama" and name.endswith("q_proj.weight"):
    return gguf_importer.permute_rows(w, cfg.n_heads)
  if arch == "llama" and name.endswith("k_proj.weight"):
    return gguf_importer.permute_rows(w, cfg.n_kv_heads)
  if arch in gguf_importer.NORM_SHIFTED and name.endswith("norm.weight"):
    return w + np.float32(1.0)
  return w


def _add_tensor(writer: gguf_lib.GGUFWriter, name: str, w: np.ndarray, ttype: str) -> None:
  qtype = TENSOR_TYPES[ttype]
  if w.ndim == 1 or qtype == gguf_lib.GGMLQuantizationType.F32:
    writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    return
  block, _ = gguf_lib.GGML_QUANT_SIZES[qtype]
  if w.shape[-1] % block:
    qtype = gguf_lib.GGMLQuantizationType.F16
  if qtype == gguf_lib.GGMLQuantizationType.F16:
    writer.add_tensor(name, np.ascontiguousarray(w, np.float16))
    return
  writer.add_tensor(name, gguf_lib.quants.quantize(np.ascontiguousarray(w, np.float32), qtype),
                    raw_dtype=qtype)


def check_exportable(cfg: model_lib.ModelConfig, tensor_type: str = "f32") -> None:
  """What can be refused before the weights are read (the rest: the read-back check)."""
  if tensor_type not in TENSOR_TYPES:
    raise ExportError(f"--gguf_type={tensor_type!r} is not one of {sorted(TENSOR_TYPES)}")
  hf_export.hf_config(cfg)  # The HF family must express cfg (one line if not).
  if cfg.rope_scaling == "llama3" and gguf_architecture(cfg) != "llama":
    raise ExportError(f"model.rope_scaling='llama3': llama.cpp reads its rope_freqs tensor "
                      f"for GGUF llama only, not {gguf_architecture(cfg)}; use --format=hf")


def write_gguf(path: str, cfg: model_lib.ModelConfig, params: Any, vocab: Any = None,
               tensor_type: str = "f32", tokenizer_gguf: str | None = None) -> None:
  """Writes the GGUF file `path`.

  vocab: the run's tokenizer (None: no tokenizer keys; llama.cpp needs them, transformers'
  loader does not). tokenizer_gguf: a GGUF file whose tokenizer keys are copied instead.
  """
  check_exportable(cfg, tensor_type)
  arch = gguf_architecture(cfg)
  names = gguf_lib.get_tensor_name_map(gguf_importer.GGUF_ARCH[arch], cfg.n_layers)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  writer = gguf_lib.GGUFWriter(tmp, arch)
  try:
    _metadata(writer, cfg, arch, tensor_type)
    if tokenizer_gguf:
      tok_export.copy_gguf_tokenizer(writer, tokenizer_gguf)
    elif vocab is not None:
      tok_export.write_gguf_tokenizer(writer, vocab)
    if cfg.rope_scaling == "llama3":  # llama only (check_exportable).
      writer.add_tensor(rope_freqs.TENSOR, rope_freqs.freq_factors(cfg).astype(np.float32))
    for name, w in common.hf_tensors(cfg, params):
      _add_tensor(writer, gguf_importer.gguf_tensor_name(names, name, arch),
                  _to_gguf(name, w, cfg, arch), tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _check_reads_back(tmp, cfg, arch)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_reads_back(path: str, cfg: model_lib.ModelConfig, arch: str) -> None:
  try:
    back = gguf_importer.model_config_from_gguf(
        gguf_importer.open_reader(path), max_seq_len=cfg.max_seq_len, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype)
  except ImportFormatError as e:
    raise ExportError(f"this model cannot be exported as GGUF {arch}: {e}") from e
  if cfg.rope_scaling == "llama3" and np.allclose(
      rope_freqs.freq_factors(back), rope_freqs.freq_factors(cfg), rtol=1e-5, atol=0):
    # Same factors, hence the same RoPE: the file keeps no llama3 parameters to compare.
    back = dataclasses.replace(back, **{f: getattr(cfg, f) for f in rope_freqs.FIELDS})
  hf_export.check_round_trip(cfg, back, f"GGUF {arch} (llama.cpp)")
