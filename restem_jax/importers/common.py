"""Shared machinery of the importers: HF-layout tensors -> this project's param tree.

Every format is read through a `TensorSource` that yields tensors under their
Hugging Face Llama names and in HF layout (Linear weights [out, in]). The
per-format modules (hf.py, gguf.py) only translate names, dequantize and undo
format quirks; the layout conversion, shape checks and device placement live
here, once.

Memory bound (why params are built this way): tensors are converted and placed
one at a time, each device_put straight onto its sharding and freed on the host
before the next one (every layer's params are their own arrays, model.py). So the
host holds at most one source tensor plus its converted copy at a time (2 x the
largest single tensor: for SmolLM2-135M the 49152 x 576 float32 embedding,
113 MB; for a 70B Llama one 8192 x 28672 MLP matrix, 0.9 GB), and the devices
hold only the final params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from restem_jax import model as model_lib


class ImportFormatError(ValueError):
  """A checkpoint this importer cannot convert; the message names the cause in one line."""


class TensorSource(Protocol):
  """Tensors by HF name ("model.layers.3.self_attn.q_proj.weight"), HF layout (Llama,
  Qwen, Gemma: one naming; which tensors exist follows the ModelConfig's switches)."""

  def get(self, name: str) -> np.ndarray: ...

  def has(self, name: str) -> bool: ...


def layer_name(i: int, suffix: str) -> str:
  return f"model.layers.{i}.{suffix}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One param: its HF name (suffix), HF shape and ours. Linear weights are transposed
  (HF [out, in], ours [in, ...out] with heads split out); the rest only reshaped. Both
  directions read this one table: import (to_ours) and export (to_hf)."""
  hf_name: str
  hf_shape: tuple[int, ...]
  our_shape: tuple[int, ...]
  transposed: bool = False

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return (w.T if self.transposed else w).reshape(self.our_shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.transposed:
      return w.reshape(self.hf_shape[::-1]).T
    return w.reshape(self.hf_shape)


# Per-layer params: our path under params["layers_<i>"] -> its TensorSpec (HF suffix).
# Norm weights are copied as stored (Gemma's (1 + w) is model.py's norm_unit_offset).
def _layer_specs(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  lin = lambda name, hf, ours: TensorSpec(name, hf, ours, transposed=True)
  vec = lambda name, size, ours=None: TensorSpec(name, (size,), ours or (size,))
  specs = {
      ("attn_norm", "scale"): vec("input_layernorm.weight", d),
      ("q",): lin("self_attn.q_proj.weight", (n * h, d), (d, n, h)),
      ("k",): lin("self_attn.k_proj.weight", (k * h, d), (d, k, h)),
      ("v",): lin("self_attn.v_proj.weight", (k * h, d), (d, k, h)),
      ("o",): lin("self_attn.o_proj.weight", (d, n * h), (n, h, d)),
      ("gate",): lin("mlp.gate_proj.weight", (f, d), (d, f)),
      ("up",): lin("mlp.up_proj.weight", (f, d), (d, f)),
      ("down",): lin("mlp.down_proj.weight", (d, f), (f, d)),
  }
  if cfg.post_norms:
    # Gemma 2/3 "sandwich": HF's post_attention_layernorm is *after* attention here.
    specs[("post_attn_norm", "scale")] = vec("post_attention_layernorm.weight", d)
    specs[("mlp_norm", "scale")] = vec("pre_feedforward_layernorm.weight", d)
    specs[("post_mlp_norm", "scale")] = vec("post_feedforward_layernorm.weight", d)
  else:
    specs[("mlp_norm", "scale")] = vec("post_attention_layernorm.weight", d)
  if cfg.qkv_bias:
    specs[("q_bias",)] = vec("self_attn.q_proj.bias", n * h, (n, h))
    specs[("k_bias",)] = vec("self_attn.k_proj.bias", k * h, (k, h))
    specs[("v_bias",)] = vec("self_attn.v_proj.bias", k * h, (k, h))
  if cfg.qk_norm:
    specs[("q_norm", "scale")] = vec("self_attn.q_norm.weight", h)
    specs[("k_norm", "scale")] = vec("self_attn.k_norm.weight", h)
  return specs


def _top_specs(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
  v, d = cfg.vocab_size, cfg.d_model
  specs = {
      ("embedding",): TensorSpec("model.embed_tokens.weight", (v, d), (v, d)),
      ("final_norm", "scale"): TensorSpec("model.norm.weight", (d,), (d,)),
  }
  if not cfg.tie_embeddings:
    specs[("lm_head",)] = TensorSpec("lm_head.weight", (v, d), (d, v), transposed=True)
  return specs


def _all_specs(cfg: model_lib.ModelConfig
               ) -> Iterator[tuple[tuple[str, ...], str, TensorSpec]]:
  """(our path, HF name, spec) of every param, top-level ones first."""
  for path, spec in _top_specs(cfg).items():
    yield path, spec.hf_name, spec
  for i in range(cfg.n_layers):
    for path, spec in _layer_specs(cfg).items():
      yield (model_lib.layer_name(i),) + path, layer_name(i, spec.hf_name), spec


def expected_hf_names(cfg: model_lib.ModelConfig) -> set[str]:
  return {name for _, name, _ in _all_specs(cfg)}


def hf_tensors(cfg: model_lib.ModelConfig, params: Any, dtype: Any = np.float32
               ) -> Iterator[tuple[str, np.ndarray]]:
  """The export direction of build_params: (HF name, HF-layout host array) per param, one
  at a time (the host holds one tensor plus its converted copy, as on import)."""
  for path, name, spec in _all_specs(cfg):
    w = np.asarray(jax.device_get(_get_path(params, path)))
    yield name, np.ascontiguousarray(spec.to_hf(w), dtype=dtype)


def _fetch(source: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if not source.has(name):
    raise ImportFormatError(f"tensor {name} is missing from the checkpoint")
  w = source.get(name)
  if tuple(w.shape) != shape:
    raise ImportFormatError(
        f"tensor {name} has shape {tuple(w.shape)} but the config implies {shape}")
  return w


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def build_params(cfg: model_lib.ModelConfig, mesh: Mesh, source: TensorSource) -> dict:
  """Converts every tensor of `source` into the sharded param tree of `cfg`.

  Raises ImportFormatError naming the tensor on a missing tensor or a shape
  that does not match the config.
  """
  shardings = model_lib.param_shardings(cfg, mesh)
  dtype = cfg.weight_dtype
  params: dict = {}
  for path, name, spec in _all_specs(cfg):
    host = np.ascontiguousarray(spec.to_ours(_fetch(source, name, spec.hf_shape)), dtype=dtype)
    _set_path(params, path, jax.device_put(host, _get_path(shardings, path)))
    del host  # Free before the next tensor: the host bound is one tensor.

  # The tree must be exactly what the model expects (catches drift with model.py).
  want = jax.tree.structure(jax.tree.map(lambda s: 0, shardings))
  got = jax.tree.structure(jax.tree.map(lambda s: 0, params))
  if want != got:
    raise ImportFormatError(f"imported param tree {got} differs from the model's {want}")
  return params


def model_config_dict(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """The ModelConfig as a plain dict (config.model fields), e.g. for checkpoint metadata."""
  return dataclasses.asdict(cfg)


def check_no_extra(found: set[str], expected: set[str], what: str) -> None:
  """Unknown tensors mean an architecture feature we would silently drop (biases, ...)."""
  extra = sorted(found - expected)
  if extra:
    more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
    raise ImportFormatError(
        f"{what} has tensors this importer does not use: {', '.join(extra[:3])}{more} "
        "(unsupported architecture feature, e.g. attention/MLP biases)")
