"""Low-rank adapters (LoRA) on the params pytree, over a frozen, optionally quantized base.

For each target matrix W (`train.lora.targets`: q, k, v, o, gate, up, down of every layer)
the adapted projection is x W + s (x A) B with s = alpha / rank, A: [in, rank] random,
B: [rank, out] zeros (so the adapted model starts as the base). Adapters mirror the params'
layout (adapters["layers_<i>"][target] = {"a", "b"}) and carry W's logical axes (rank
unsharded), so they shard by partitioning.LOGICAL_RULES like the base.

In the train step the base is a jit argument that is never differentiated and each Block
applies its adapters itself (model._project -> LayerAdapters.project): no merged W' and no
full-size dW exist, only dA, dB. A bfloat16 or quantized base leaf ("int8" per-channel
absmax, "nf4" blocks of 64, via google/qwix) is converted where the layer reads it, under
jax.checkpoint. Rank 0 passes no hook: the step is the full fine-tune's program.
`train.lora.dropout` drops the adapter input (keys folded with the step: resume-exact).
The sampler gets one merged copy W + s A B; an iteration is saved as its adapters plus the
base's path, and restored by the same jitted merge. qwix's own LoRA is not used: it picks
weights by module path (our seven matrices share one Block) and wraps the base in pytrees
our checkpoint and sharding code does not read. Memory measurements: benchmarks/README.md.
"""
from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from jax.sharding import Mesh

from restem_jax import configlib, errors, partitioning
from restem_jax import model as model_lib

TARGETS = configlib.LORA_TARGETS
BASE_DTYPES = configlib.LORA_BASE_DTYPES
# The einsum's contracted (input) axes of each target; W's other axes are outputs.
IN_AXES = {"q": ("embed",), "k": ("embed",), "v": ("embed",), "o": ("heads", "head_dim"),
           "gate": ("embed",), "up": ("embed",), "down": ("mlp",)}
NF4_BLOCK = 64  # QLoRA's block size along the input axis.
DROPOUT_SEED = 0  # train.lora.dropout's masks: key(DROPOUT_SEED) folded with the step.

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """train.lora as plain values; see configlib.default_config().train.lora."""
  rank: int
  alpha: float
  targets: tuple[str, ...]
  base_dtype: str = ""
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank

  def metadata(self) -> dict:
    """What a checkpoint of these adapters records to be read back (not dropout: training only)."""
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "base_dtype": self.base_dtype}

  @classmethod
  def from_metadata(cls, meta: dict) -> "LoraConfig":
    return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
               targets=tuple(meta["targets"]), base_dtype=str(meta.get("base_dtype", "")))

  @classmethod
  def from_train_config(cls, train_cfg: ml_collections.ConfigDict) -> "LoraConfig | None":
    """None when train.lora is absent or rank = 0 (full fine-tuning)."""
    lc = train_cfg.get("lora") if hasattr(train_cfg, "get") else None
    if lc is None or int(lc.rank) == 0:
      return None
    errors.raise_if(configlib.lora_problems(lc))
    return cls(rank=int(lc.rank), alpha=float(lc.alpha), targets=tuple(lc.targets),
               base_dtype=str(lc.base_dtype), dropout=float(lc.dropout))


@dataclasses.dataclass(frozen=True)
class _Target:
  path: Path  # (layers_<i>, name)
  names: tuple[str, ...]  # W's logical axes: input, then output axes
  shape: tuple[int, ...]
  n_in: int

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.shape[:self.n_in]

  @property
  def a_names(self) -> tuple[str | None, ...]:
    return self.names[:self.n_in] + (None,)

  @property
  def b_names(self) -> tuple[str | None, ...]:
    return (None,) + self.names[self.n_in:]

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return self.shape[:self.n_in] + (rank,)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return (rank,) + self.shape[self.n_in:]

  def delta_subscripts(self) -> str:
    """einsum "A,B->W" for A: [in..., r], B: [r, out...]."""
    letters = iter(c for c in string.ascii_lowercase if c != "r")
    it = "".join(next(letters) for _ in range(self.n_in))
    ot = "".join(next(letters) for _ in range(len(self.shape) - self.n_in))
    return f"{it}r,r{ot}->{it}{ot}"


def _targets(model_cfg: model_lib.ModelConfig, names: tuple[str, ...]) -> list[_Target]:
  """The target matrices of every layer, with their axes split in / out."""
  boxed = traverse_util.flatten_dict(model_lib.abstract_params(model_cfg))
  out = []
  for path, leaf in sorted(boxed.items()):
    if path[-1] not in names:
      continue
    axes, shape = tuple(leaf.names), tuple(leaf.value.shape)
    n_in = len(IN_AXES[path[-1]])
    if axes[:n_in] != IN_AXES[path[-1]]:
      raise ValueError(f"lora: param {'/'.join(path)} has axes {axes}; expected "
                       f"{IN_AXES[path[-1]]} + output axes")
    out.append(_Target(path, axes, shape, n_in))
  missing = sorted(set(names) - {t.path[-1] for t in out})
  if missing:
    raise errors.ConfigError(f"train.lora.targets: the model has no {missing} matrices")
  return out


def _quant_axes(t: _Target, kind: str) -> tuple[tuple[int, ...], dict[int, int]]:
  """(channelwise axes, tiled axes) of qwix.quantize for target t."""
  last_in = t.n_in - 1
  outs = tuple(range(t.n_in, len(t.shape)))
  if kind == "int8":  # One absmax scale per output channel.
    return outs, {}
  # nf4: one scale per block of 64 inputs, per output channel; the other input axes of a
  # multi-axis input (o: heads) get their own scales.
  others = tuple(range(last_in))
  size = t.shape[last_in]
  tile = NF4_BLOCK if size % NF4_BLOCK == 0 else size
  return others + outs, {last_in: tile}


def _qwix():
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise errors.ConfigError(
        "train.lora.base_dtype int8/nf4 needs google's qwix (pip install -e '.[lora]', "
        "or `make install`); or use base_dtype '' / 'bfloat16'") from e
  return qwix


def quantize(w: jax.Array, t: _Target, kind: str) -> Any:
  """W as a qwix QArray (int8 per-channel absmax, or nf4 blocks of 64)."""
  qwix = _qwix()
  channelwise, tiled = _quant_axes(t, kind)
  qtype = jnp.int8 if kind == "int8" else "nf4"
  return qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=channelwise,
                       tiled_axes=tiled)


def is_quantized(x: Any) -> bool:
  return hasattr(x, "qvalue") and hasattr(x, "scale")


def dequantize(x: Any) -> jax.Array:
  """A base leaf as a float array (float32 for quantized leaves, else its own dtype)."""
  return _qwix().dequantize(x) if is_quantized(x) else x


def _low_rank_subscripts(subscripts: str) -> tuple[str, str]:
  """The einsums of x A and (x A) B for the model's x W einsum "x,w->y": A's axes are W's
  contracted (input) axes + rank, B's are rank + W's output axes (the adapters' layout)."""
  operands, y = subscripts.split("->")
  x, w = operands.split(",")
  r = next(c for c in "rzyxwvu" if c not in subscripts)
  w_in = "".join(c for c in w if c not in y)
  w_out = "".join(c for c in w if c in y)
  x_rest = "".join(c for c in x if c not in w_in)
  return f"{x},{w_in}{r}->{x_rest}{r}", f"{x_rest}{r},{r}{w_out}->{y}"


@dataclasses.dataclass(frozen=True)
class LayerAdapters:
  """One layer's adapters as model.Block applies them (the `lora` hook of model._project)."""
  adapters: dict[str, Any]  # target -> {"a", "b"}
  scale: float
  dropout: float = 0.0
  rng: jax.Array | None = None  # dropout's key for this layer; None: no dropout

  def weight(self, w: Any, dt: Any) -> jax.Array:
    """A base weight in the compute dtype (a quantized one dequantized here, per layer)."""
    return dequantize(w).astype(dt)

  def project(self, name: str, subscripts: str, x: jax.Array, w: Any, dt: Any) -> jax.Array:
    """x W + scale (x A) B for a target (x W alone for the others): no W + s A B and,
    since the base is not differentiated, no dW; the backward pass computes dx, dA, dB."""
    ab = self.adapters.get(name)
    if ab is None:
      return jnp.einsum(subscripts, x, self.weight(w, dt))
    xa_sub, xab_sub = _low_rank_subscripts(subscripts)
    key = None if self.rng is None else jax.random.fold_in(self.rng, TARGETS.index(name))

    def proj(x, w, a, b):
      y = jnp.einsum(subscripts, x, self.weight(w, dt))
      if key is not None:  # Dropout on the adapter's input only (as PEFT): W sees all of x.
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
      xa = jnp.einsum(xa_sub, x, a.astype(dt))
      return y + (self.scale * jnp.einsum(xab_sub, xa, b.astype(dt))).astype(y.dtype)

    if is_quantized(w) or w.dtype != dt:
      # The float W is an intermediate computed from the base alone: jax.grad would keep
      # every layer's as a residual for the backward pass (the whole model's float weights
      # at once). Under remat the residual is the stored base leaf and the backward pass
      # dequantizes again, one layer at a time.
      proj = jax.checkpoint(proj)
    return proj(x, w, ab["a"], ab["b"])


@dataclasses.dataclass(frozen=True)
class ModelAdapters:
  """The `lora` argument of model.Transformer: every layer's adapters (the train state's
  adapters pytree), the scale, and dropout with its key (training only)."""
  adapters: Any  # adapters["layers_<i>"][target] = {"a", "b"}
  scale: float
  dropout: float = 0.0
  rng: jax.Array | None = None

  def layer(self, i: int) -> LayerAdapters | None:
    ad = self.adapters.get(model_lib.layer_name(i))
    if ad is None:
      return None
    use_dropout = self.dropout > 0 and self.rng is not None
    return LayerAdapters(ad, self.scale, self.dropout if use_dropout else 0.0,
                         jax.random.fold_in(self.rng, i) if use_dropout else None)


class Adapters:
  """LoRA adapters of one model config on one mesh: shapes, shardings, init, merge."""

  def __init__(self, model_cfg: model_lib.ModelConfig, lora_cfg: LoraConfig, mesh: Mesh):
    if not 0 <= lora_cfg.dropout < 1:
      raise errors.ConfigError(f"train.lora.dropout={lora_cfg.dropout}: must be in [0, 1)")
    self.model_cfg, self.cfg, self.mesh = model_cfg, lora_cfg, mesh
    self.targets = _targets(model_cfg, lora_cfg.targets)
    self._by_path = {t.path: t for t in self.targets}
    r = lora_cfg.rank
    flat_abs, flat_shard = {}, {}
    for t in self.targets:
      for key, shape, names in (("a", t.a_shape(r), t.a_names), ("b", t.b_shape(r), t.b_names)):
        flat_abs[t.path + (key,)] = jax.ShapeDtypeStruct(shape, jnp.float32)
        flat_shard[t.path + (key,)] = partitioning.sharding_for(mesh, names, shape)
    self._abstract = traverse_util.unflatten_dict(flat_abs)
    self.shardings = traverse_util.unflatten_dict(flat_shard)
    self.param_shardings = model_lib.param_shardings(model_cfg, mesh)
    self.base_shardings = self._base_shardings()
    self._init = jax.jit(self._init_fn, out_shardings=self.shardings)
    self._prepare = jax.jit(self._prepare_fn, in_shardings=(self.param_shardings,),
                            out_shardings=self.base_shardings)
    self._merge = jax.jit(lambda base, ad: self.merge(base, ad, self.model_cfg.weight_dtype),
                          in_shardings=(self.base_shardings, self.shardings),
                          out_shardings=self.param_shardings)

  # --- shapes ------------------------------------------------------------------------

  def abstract(self) -> Any:
    """ShapeDtypeStructs of the adapters, with their shardings (restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self._abstract, self.shardings)

  def count(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self._abstract)))

  def _base_shardings(self) -> Any:
    flat = traverse_util.flatten_dict(self.param_shardings)
    kind = self.cfg.base_dtype
    if kind in ("int8", "nf4"):
      for t in self.targets:
        abstract_q = jax.eval_shape(lambda w, t=t: quantize(w, t, kind),
                                    jax.ShapeDtypeStruct(t.shape, jnp.float32))
        flat[t.path] = jax.tree.map(
            lambda leaf, t=t: partitioning.sharding_for(self.mesh, t.names, leaf.shape),
            abstract_q)
    return traverse_util.unflatten_dict(flat)

  # --- the three operations ------------------------------------------------------------

  def _init_fn(self, rng: jax.Array) -> Any:
    # A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform bound), B = 0.
    flat = {}
    keys = jax.random.split(rng, len(self.targets))
    for key, t in zip(keys, self.targets):
      bound = math.prod(t.in_shape) ** -0.5
      flat[t.path + ("a",)] = jax.random.uniform(key, t.a_shape(self.cfg.rank), jnp.float32,
                                                 -bound, bound)
      flat[t.path + ("b",)] = jnp.zeros(t.b_shape(self.cfg.rank), jnp.float32)
    return traverse_util.unflatten_dict(flat)

  def init(self, rng: jax.Array) -> Any:
    """Fresh adapters (B = 0, so the adapted model equals the base), placed in their shards."""
    return self._init(rng)

  def _prepare_fn(self, params: Any) -> Any:
    kind = self.cfg.base_dtype
    flat = traverse_util.flatten_dict(params)
    for t in self.targets:
      if kind in ("int8", "nf4"):
        flat[t.path] = quantize(flat[t.path], t, kind)
      elif kind:
        flat[t.path] = flat[t.path].astype(kind)
    return traverse_util.unflatten_dict(flat)

  def is_prepared(self, params: Any) -> bool:
    """Whether `params` are a frozen base already (their target matrices in base_dtype)."""
    kind = self.cfg.base_dtype
    if not kind:
      return False
    w = traverse_util.flatten_dict(params)[self.targets[0].path]  # a QArray is one leaf
    return is_quantized(w) if kind in ("int8", "nf4") else w.dtype == jnp.dtype(kind)

  def prepare_base(self, params: Any) -> Any:
    """The frozen base: params with the target matrices cast or quantized per base_dtype.

    With base_dtype "" the params themselves are the base (no copy); a base prepared
    before (is_prepared: the run keeps only that once nothing samples the loaded one) is
    returned as it is."""
    if self.is_prepared(params):
      return params
    params = jax.tree.map(partitioning.put_global, params, self.param_shardings)
    return self._prepare(params) if self.cfg.base_dtype else params

  def delta(self, path: Path, a: jax.Array, b: jax.Array) -> jax.Array:
    """scale * A @ B in W's layout, float32."""
    t = self._by_path[path]
    return self.cfg.scale * jnp.einsum(t.delta_subscripts(), a.astype(jnp.float32),
                                       b.astype(jnp.float32))

  def apply(self, adapters: Any, rng: jax.Array | None = None) -> ModelAdapters:
    """The `lora` argument of model.Transformer for these adapters: the train step applies
    them inside each Block on the frozen base. rng: dropout's key (training); None: none."""
    return ModelAdapters(adapters, self.cfg.scale, self.cfg.dropout, rng)

  def merge(self, base: Any, adapters: Any, dtype: Any = None) -> Any:
    """Params of the adapted model: W + scale * A @ B for every target (computed in
    float32, returned in `dtype`, default W's own); other leaves are the base's. Pure:
    call it inside jit (the train step) or through `merged` (a sharded copy)."""
    flat = traverse_util.flatten_dict(base)  # a quantized leaf (QArray) is not a dict: a leaf
    ad = traverse_util.flatten_dict(adapters)
    for t in self.targets:
      w = dequantize(flat[t.path])
      out_dtype = dtype or (jnp.float32 if is_quantized(flat[t.path]) else w.dtype)
      merged = w.astype(jnp.float32) + self.delta(t.path, ad[t.path + ("a",)],
                                                   ad[t.path + ("b",)])
      flat[t.path] = merged.astype(out_dtype)
    return traverse_util.unflatten_dict(flat)

  def merged(self, base: Any, adapters: Any) -> Any:
    """A sharded copy of the adapted model's params in model.param_dtype (for the sampler,
    checkpoints, the next E-step)."""
    return self._merge(base, adapters)


def make(model_cfg: model_lib.ModelConfig, train_cfg: ml_collections.ConfigDict,
         mesh: Mesh) -> Adapters | None:
  """The Adapters of train.lora, or None for full fine-tuning (rank 0)."""
  lc = LoraConfig.from_train_config(train_cfg)
  return None if lc is None else Adapters(model_cfg, lc, mesh)
