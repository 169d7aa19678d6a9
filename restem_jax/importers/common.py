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
from typing import Any, Callable, Protocol

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


# Per-layer params: our path under params["layers_<i>"] -> (HF suffix, HF shape, to-ours).
# HF Linear weights are [out, in]; ours are [in, ...out] with heads split out.
# Norm weights are copied as stored (Gemma's (1 + w) is model.py's norm_unit_offset).
def _layer_specs(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...],
                                                                             Callable]]:
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  same = lambda w: w
  specs = {
      ("attn_norm", "scale"): ("input_layernorm.weight", (d,), same),
      ("q",): ("self_attn.q_proj.weight", (n * h, d), lambda w: w.T.reshape(d, n, h)),
      ("k",): ("self_attn.k_proj.weight", (k * h, d), lambda w: w.T.reshape(d, k, h)),
      ("v",): ("self_attn.v_proj.weight", (k * h, d), lambda w: w.T.reshape(d, k, h)),
      ("o",): ("self_attn.o_proj.weight", (d, n * h), lambda w: w.T.reshape(n, h, d)),
      ("gate",): ("mlp.gate_proj.weight", (f, d), lambda w: w.T),
      ("up",): ("mlp.up_proj.weight", (f, d), lambda w: w.T),
      ("down",): ("mlp.down_proj.weight", (d, f), lambda w: w.T),
  }
  if cfg.post_norms:
    # Gemma 2/3 "sandwich": HF's post_attention_layernorm is *after* attention here.
    specs[("post_attn_norm", "scale")] = ("post_attention_layernorm.weight", (d,), same)
    specs[("mlp_norm", "scale")] = ("pre_feedforward_layernorm.weight", (d,), same)
    specs[("post_mlp_norm", "scale")] = ("post_feedforward_layernorm.weight", (d,), same)
  else:
    specs[("mlp_norm", "scale")] = ("post_attention_layernorm.weight", (d,), same)
  if cfg.qkv_bias:
    specs[("q_bias",)] = ("self_attn.q_proj.bias", (n * h,), lambda b: b.reshape(n, h))
    specs[("k_bias",)] = ("self_attn.k_proj.bias", (k * h,), lambda b: b.reshape(k, h))
    specs[("v_bias",)] = ("self_attn.v_proj.bias", (k * h,), lambda b: b.reshape(k, h))
  if cfg.qk_norm:
    specs[("q_norm", "scale")] = ("self_attn.q_norm.weight", (h,), same)
    specs[("k_norm", "scale")] = ("self_attn.k_norm.weight", (h,), same)
  return specs


def _top_specs(cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...],
                                                                           Callable]]:
  v, d = cfg.vocab_size, cfg.d_model
  specs = {
      ("embedding",): ("model.embed_tokens.weight", (v, d), lambda w: w),
      ("final_norm", "scale"): ("model.norm.weight", (d,), lambda w: w),
  }
  if not cfg.tie_embeddings:
    specs[("lm_head",)] = ("lm_head.weight", (v, d), lambda w: w.T)
  return specs


def expected_hf_names(cfg: model_lib.ModelConfig) -> set[str]:
  names = {spec[0] for spec in _top_specs(cfg).values()}
  for i in range(cfg.n_layers):
    names.update(layer_name(i, spec[0]) for spec in _layer_specs(cfg).values())
  return names


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

  for path, (name, shape, convert) in _top_specs(cfg).items():
    host = np.ascontiguousarray(convert(_fetch(source, name, shape)), dtype=dtype)
    _set_path(params, path, jax.device_put(host, _get_path(shardings, path)))
    del host  # Free before the next tensor: the host bound is one tensor.

  for i in range(cfg.n_layers):
    layer = model_lib.layer_name(i)
    for path, (suffix, shape, convert) in _layer_specs(cfg).items():
      host = np.ascontiguousarray(convert(_fetch(source, layer_name(i, suffix), shape)),
                                  dtype=dtype)
      _set_path(params, (layer,) + path, jax.device_put(host, _get_path(shardings[layer], path)))
      del host

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
