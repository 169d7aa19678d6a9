"""A decoder-only transformer in Flax linen: Llama 3.x, Qwen 2.5 / 3, Gemma 2 / 3.

One Block serves every family: each difference is a ModelConfig switch (RoPE
scaling, qkv bias, QK-norm, (1 + w) norms, GeGLU, sandwich norms, soft-caps,
sliding-window local layers with their own RoPE base), read by training,
prefill and decode_step alike. Per-layer differences (local vs global
attention) are a per-layer flag of the same Block, not a second layer body.

One forward serves training, scoring and prefill:
  * no cache: attention over the L given tokens (training, no-cache reference);
  * with a cache: the L new tokens' keys/values are written into the cache at
    their per-row positions and the queries attend to cache slots <= their own
    position. Prefill is L = prompt bucket.

Positions are per row, so right-padded prompts of different lengths share one
batch: row b's next token goes to slot positions[b], which overwrites the
padding the prefill left there (never attended to, since a query at position p
sees only slots <= p and slots < p hold real tokens).

Each layer owns its params (params["layers_0"], params["layers_1"], ...;
`layer_params` lists them) and the forward applies the layers in a Python loop.
Why not nn.scan over params stacked [layers, ...] (compile time flat in depth):
a while loop can only read a layer of a stacked array by slicing it, and XLA
materialises the slice. Token-by-token decoding (`decode_step`, inside the
sampler's loop) then either copied every layer's weights on every step or, split
once before the loop, held a second copy of all the weights for the whole call
(benchmarks/sampler.py --memory measures it; benchmarks/README.md). Per-layer arrays
are read in place by training, prefill and decode_step alike; the cost is compile
time that grows with depth. Checkpoints written with the stacked layout are
converted when restored (checkpoints.py). RoPE uses the rotate-half (Hugging
Face Llama) layout, so HF checkpoints import without permutation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from restem_jax import configlib, errors, partitioning

# KV caches keep heads ahead of length ([batch, kv_heads, length, head_dim]) so
# attention is a dot_general batched over the leading (batch, kv_heads) dims,
# reading the cache in place; with length ahead of heads XLA transposed (or, on
# CPU, strided-reduced) the whole cache in every layer of every decode step.
Cache = dict[str, jax.Array]  # {"k", "v"}: [layers, batch, kv_heads, max_seq_len, head_dim]
LayerCache = dict[str, jax.Array]  # {"k", "v"}: [batch, kv_heads, max_seq_len, head_dim]

_DTYPES = {name: getattr(jnp, name) for name in configlib.CHOICES["model.dtype"]}
ROPE_SCALINGS = configlib.CHOICES["model.rope_scaling"]
MLP_ACTIVATIONS = configlib.CHOICES["model.mlp_activation"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters; see configlib.default_config().model."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int = 0
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 256
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Family switches (meanings: configlib.default_config().model). Defaults are plain Llama.
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  rope_local_base: float = 0.0
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_unit_offset: bool = False
  embed_scale: bool = False
  mlp_activation: str = "silu"
  post_norms: bool = False
  query_pre_attn_scalar: float = 0.0
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  sliding_window: int = 0
  sliding_window_pattern: int = 0

  def __post_init__(self):
    errors.raise_if(configlib.model_shape_problems(self))
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict | dict) -> "ModelConfig":
    d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise errors.ConfigError(
          f"unknown model config keys {unknown}; known keys are {sorted(known)}")
    return cls(**d)

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: True for a sliding-window (local) layer."""
    w, period = self.sliding_window, self.sliding_window_pattern
    return tuple(w > 0 and (period == 0 or (i + 1) % period != 0) for i in range(self.n_layers))

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


# What a run chooses for itself rather than what the weights were trained with: a
# checkpoint's value of these may differ from the run's config.
RUN_FIELDS = ("max_seq_len", "dtype", "param_dtype")


def config_mismatches(got: ModelConfig, want: ModelConfig, ignore: Sequence[str] = (),
                      label: str = "checkpoint", limit: int = 4) -> str:
  """'' when `got` (what a checkpoint holds) equals `want` (the run's config.model) on
  every field but `ignore`; else one line naming up to `limit` differing fields as
  `model.<field>=<want> (<label>: <got>)`."""
  diff = [f.name for f in dataclasses.fields(got)
          if f.name not in ignore and getattr(got, f.name) != getattr(want, f.name)]
  pairs = ", ".join(f"model.{n}={getattr(want, n)!r} ({label}: {getattr(got, n)!r})"
                    for n in diff[:limit])
  return pairs + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def cache_shape(cfg: ModelConfig, batch: int, length: int | None = None) -> tuple[int, ...]:
  """Shape of a stacked Cache; [1:] is a LayerCache's."""
  length = cfg.max_seq_len if length is None else length
  return (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, dtype: Any | None = None) -> Cache:
  shape = cache_shape(cfg, batch)
  dtype = cfg.compute_dtype if dtype is None else dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("cache_layers", "cache_batch", "act_kv_heads", "cache_len", "head_dim")
LAYER_CACHE_AXES = CACHE_AXES[1:]


@flax.struct.dataclass
class SharedPrefixCache:
  """One layer's KV cache for decoding N samples of each of P prompts (B = P * N rows).

  Row b = p * N + j holds sample j of prompt p. Every sample of a prompt starts
  from the same prompt, so its keys/values are stored once per prompt and read
  by all N rows: the prompt part of attention is then one [N * G, L] x [L, H]
  product per (prompt, kv head) instead of N matrix-vector products over N
  copies, and the cache holds P * L + B * T slots instead of B * (L + T). (A
  ReST-EM E-step samples N = 32-64 times from few-shot prompts longer than the
  answers, so the prompt part is most of the cache.)

  Generated tokens go to slot `step`, the same slot for every row (rows differ
  in position, not in slot: RoPE rotates each key by its own position before
  it is stored, and attention only needs the set of visible keys), so a step
  writes with one dynamic_update_slice instead of a per-row scatter.

  The generated slots are split into chunks (separate arrays), and only the
  first `active` chunks are read: a decode loop run in phases (phase j writes
  chunk j) then attends over the slots filled so far instead of all T (on
  average (J + 1) / 2J of them with J chunks) without slicing a big array,
  which would copy it. Values keep length minor ([B, K, H, C]): the probs x
  values product then reads them along their minor axis (on CPU 2.4x faster
  than [B, K, C, H] in the decode loop, measured).

  Sliding-window (local) layers keep the same full-length cache as global ones
  and apply the window as a mask (prompt slot i is position i; generated slot s
  is position q - (t - s)). A window-sized ring buffer would only save slots
  beyond the window: with the prompt stored once per prompt, the B x T
  generated part dominates, and it is within the window whenever T <= window
  (Gemma 3: 512 / 1024, vs ~512 new tokens on MATH), so it would save little.
  """
  prompt_k: jax.Array  # [P, K, L, H] ([K, P, L, H] in pool mode)
  prompt_v: jax.Array  # [P, K, L, H] ([K, P, L, H] in pool mode)
  prompt_valid: jax.Array  # [P, L] bool: which prompt slots the rows attend to
  k: tuple[jax.Array, ...]  # chunks [B, K, C_i, H]; slot `step` is written next
  v: tuple[jax.Array, ...]  # chunks [B, K, H, C_i]
  step: jax.Array  # int32 []: generated slots filled so far
  active: int = flax.struct.field(pytree_node=False, default=1)  # chunks read; the last is written
  # Ring mode (the refilling sampler): one chunk of C slots, step t writes slot
  # t % C, and row b sees the slots written at steps start[b]..t (its own
  # tokens: a row refilled with a new prompt at step start[b] must not see the
  # previous occupant's). A row generates at most C tokens, so none is overwritten.
  start: Any = None  # int32 [B] or None (not ring mode)
  # Pool mode (per-row refill, refill.py): the P prompt caches are a pool of
  # slots, stored [K, P, L, H] (kv heads leading) and replicated over the batch
  # axes, and row b reads slot row_slot[b] (any row, any slot) instead of slot
  # b // N. Every row's query meets every slot's keys in one product (P x the
  # prompt FLOPs, each slot read once, in place) and the other slots are masked
  # out: no per-row copy of a prompt's keys.
  row_slot: Any = None  # int32 [B] or None (rows grouped by prompt)

  @classmethod
  def create(cls, prompt: LayerCache, prompt_valid_PxL: jax.Array, num_samples: int,
             chunk_sizes: Sequence[int]) -> "SharedPrefixCache":
    """Empty generated chunks after a prefill of the prompts (a LayerCache of P rows)."""
    p, kh, _, h = prompt["k"].shape
    b, dt = p * num_samples, prompt["k"].dtype
    return cls(prompt_k=prompt["k"], prompt_v=prompt["v"], prompt_valid=prompt_valid_PxL,
               k=tuple(jnp.zeros((b, kh, c, h), dt) for c in chunk_sizes),
               v=tuple(jnp.zeros((b, kh, h, c), dt) for c in chunk_sizes),
               step=jnp.int32(0))

  def constrain(self, mesh: Mesh | None) -> "SharedPrefixCache":
    """Sharding constraints: prompts and rows over the batch axes, kv heads over tensor."""
    cons = lambda x, axes: partitioning.constrain(x, mesh, axes)
    v_axes = ("cache_batch", "act_kv_heads", "head_dim", "cache_len")
    pool = self.row_slot is not None  # [K, P, L, H], replicated over batch: any row, any slot
    p_axes = ("act_kv_heads", None, "cache_len", "head_dim") if pool else LAYER_CACHE_AXES
    return self.replace(
        prompt_k=cons(self.prompt_k, p_axes),
        prompt_v=cons(self.prompt_v, p_axes),
        prompt_valid=cons(self.prompt_valid, (None if pool else "cache_batch", None)),
        k=tuple(cons(c, LAYER_CACHE_AXES) for c in self.k),
        v=tuple(cons(c, v_axes) for c in self.v))


def _shared_prefix_attention(cfg: ModelConfig, q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array,
                             v_BxLxKxH: jax.Array, positions_BxL: jax.Array,
                             cache: SharedPrefixCache, is_local: IsLocal
                             ) -> tuple[jax.Array, SharedPrefixCache]:
  """Attention of one new token per row over its prompt and its generated tokens so far."""
  b, l, n, h = q_BxLxNxH.shape
  if l != 1:
    raise ValueError(f"SharedPrefixCache decodes one token per row per step, got {l}")
  dt = cfg.compute_dtype
  p, kh, prompt_len, _ = cache.prompt_k.shape
  if cache.row_slot is not None:  # pool layout [K, P, L, H]
    kh, p = p, kh
  ns, g, t, w = b // p, n // kh, cache.step, cache.active - 1
  ring = cache.start is not None
  if ring and len(cache.k) != 1:
    raise ValueError(f"a ring-mode SharedPrefixCache has one chunk, got {len(cache.k)}")
  # Store this step's key/value in slot `step` (ring: step % C), which is in chunk w
  # (the sampler's phases).
  offset = (t - t % cache.k[0].shape[2]) if ring else sum(c.shape[2] for c in cache.k[:w])
  k_chunks, v_chunks = list(cache.k), list(cache.v)
  k_chunks[w] = jax.lax.dynamic_update_slice(
      k_chunks[w], jnp.swapaxes(k_BxLxKxH, 1, 2).astype(k_chunks[w].dtype), (0, 0, t - offset, 0))
  v_chunks[w] = jax.lax.dynamic_update_slice(
      v_chunks[w], jnp.transpose(v_BxLxKxH, (0, 2, 3, 1)).astype(v_chunks[w].dtype),
      (0, 0, 0, t - offset))
  q_BxKxGxH = q_BxLxNxH.reshape(b, kh, g, h)
  gen_BxKxGxW = _attn_logits(cfg, jnp.concatenate(
      [jnp.einsum("bkgh,bkch->bkgc", q_BxKxGxH, c.astype(dt),
                  preferred_element_type=jnp.float32) for c in k_chunks[:w + 1]], axis=-1))
  slots_W = jnp.arange(gen_BxKxGxW.shape[-1])
  # age_W: steps since slot s was written (its key's position is q - age).
  age_W = (t - slots_W) % slots_W.shape[0] if ring else t - slots_W
  gen_valid_BxW = (age_W[None, :] <= (t - cache.start)[:, None] if ring
                   else (age_W >= 0)[None, :])
  # Prompt slot i holds position i; generated slot s holds position q - age (one
  # slot per step, while the row is active): both in the window iff > q - window.
  window_start_B = positions_BxL[:, 0] - cfg.sliding_window
  if cfg.sliding_window:
    gen_valid_BxW = _window_mask(gen_valid_BxW, (age_W < cfg.sliding_window)[None, :], is_local)
  if cache.row_slot is not None:
    out_BxKxGxH, gen_probs_BxKxGxW = _pool_prompt_attention(
        cfg, q_BxKxGxH, cache, gen_BxKxGxW, gen_valid_BxW, window_start_B, is_local)
  else:
    # The rows of prompt p read its keys in one [N * G, L] product.
    q_PxNxKxGxH = q_BxLxNxH.reshape(p, ns, kh, g, h)
    prompt_PxKxNxGxL = _attn_logits(cfg, jnp.einsum(
        "pnkgh,pklh->pkngl", q_PxNxKxGxH, cache.prompt_k.astype(dt),
        preferred_element_type=jnp.float32))
    prompt_BxKxGxL = jnp.swapaxes(prompt_PxKxNxGxL, 1, 2).reshape(b, kh, g, prompt_len)
    prompt_valid_BxL = jnp.repeat(cache.prompt_valid, ns, axis=0)
    if cfg.sliding_window:
      prompt_valid_BxL = _window_mask(
          prompt_valid_BxL, jnp.arange(prompt_len)[None, :] > window_start_B[:, None], is_local)
    logits_BxKxGxS = jnp.concatenate(
        [jnp.where(prompt_valid_BxL[:, None, None], prompt_BxKxGxL, -1e30),
         jnp.where(gen_valid_BxW[:, None, None], gen_BxKxGxW, -1e30)], axis=-1)
    probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(dt)
    probs_PxNxKxGxL = probs_BxKxGxS[..., :prompt_len].reshape(p, ns, kh, g, prompt_len)
    out_BxKxGxH = jnp.einsum("pnkgl,pklh->pnkgh", probs_PxNxKxGxL,
                             cache.prompt_v.astype(dt)).reshape(b, kh, g, h)
    gen_probs_BxKxGxW = probs_BxKxGxS[..., prompt_len:]
  start = 0
  for c in v_chunks[:w + 1]:
    size = c.shape[3]
    out_BxKxGxH = out_BxKxGxH + jnp.einsum("bkgc,bkhc->bkgh",
                                           gen_probs_BxKxGxW[..., start:start + size], c.astype(dt))
    start += size
  return (out_BxKxGxH.reshape(b, 1, n, h),
          cache.replace(k=tuple(k_chunks), v=tuple(v_chunks), step=t + 1))


def _pool_prompt_attention(cfg: ModelConfig, q_BxKxGxH: jax.Array, cache: SharedPrefixCache,
                           gen_BxKxGxW: jax.Array, gen_valid_BxW: jax.Array,
                           window_start_B: jax.Array, is_local: IsLocal
                           ) -> tuple[jax.Array, jax.Array]:
  """Pool mode: (prompt part of the attention output, the generated slots' probs).

  The pool is [K, P, L, H] (kv heads leading), so each kv head's queries of all B
  rows (Q = B x G of them) meet all X = P x L pool keys in one [Q, H] x [H, X]
  product reading the pool in place; the softmax then takes the row's own slot
  only. It runs head-major too: only the small generated part is transposed.
  """
  dt = cfg.compute_dtype
  b, kh, g, h = q_BxKxGxH.shape
  _, p, prompt_len, _ = cache.prompt_k.shape
  x, w = p * prompt_len, gen_BxKxGxW.shape[-1]
  head_major = lambda a: jnp.transpose(a, (1, 0, 2, 3)).reshape(kh, b * g, a.shape[-1])
  prompt_KxQxX = _attn_logits(cfg, jnp.einsum(
      "kqh,kxh->kqx", head_major(q_BxKxGxH), cache.prompt_k.reshape(kh, x, h).astype(dt),
      preferred_element_type=jnp.float32))
  # Softmax over the row's own slot only (its L logits gathered), then its probs
  # spread back over the P x L pool with zeros at the other slots for the values.
  slot_Q = jnp.repeat(cache.row_slot, g)
  own_KxQxL = jnp.take_along_axis(prompt_KxQxX.reshape(kh, b * g, p, prompt_len),
                                  slot_Q[None, :, None, None], axis=2)[:, :, 0]
  valid_BxL = cache.prompt_valid[cache.row_slot]
  if cfg.sliding_window:
    valid_BxL = _window_mask(valid_BxL, jnp.arange(prompt_len)[None, :] > window_start_B[:, None],
                             is_local)
  logits_KxQxS = jnp.concatenate(
      [jnp.where(jnp.repeat(valid_BxL, g, axis=0)[None], own_KxQxL, -1e30),
       head_major(jnp.where(gen_valid_BxW[:, None, None], gen_BxKxGxW, -1e30))], axis=-1)
  probs_KxQxS = jax.nn.softmax(logits_KxQxS, axis=-1).astype(dt)
  mine_QxP = slot_Q[:, None] == jnp.arange(p)[None, :]
  spread_KxQxX = jnp.where(mine_QxP[None, :, :, None], probs_KxQxS[:, :, None, :prompt_len],
                           jnp.zeros((), dt)).reshape(kh, b * g, x)
  out_KxQxH = jnp.einsum("kqx,kxh->kqh", spread_KxQxX,
                         cache.prompt_v.reshape(kh, x, h).astype(dt))
  back = lambda a: jnp.transpose(a.reshape(kh, b, g, a.shape[-1]), (1, 0, 2, 3))
  return back(out_KxQxH), back(probs_KxQxS[..., prompt_len:])


def split_layers(tree: Any, n_layers: int) -> list[Any]:
  """Per-layer slices of a tree whose leaves carry a leading layers axis (a Cache)."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n_layers)]


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any, dtype: Any) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * w, or * (1 + w) with unit_offset (Gemma; w is stored as in the checkpoint)."""
  eps: float
  param_dtype: Any
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), init, self.param_dtype)
    # Normalise in float32: bfloat16 mean-of-squares loses too many bits.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale32 = scale.astype(jnp.float32)
    return (y * (1.0 + scale32 if self.unit_offset else scale32)).astype(x.dtype)


def _norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
  return RMSNorm(cfg.norm_eps, cfg.weight_dtype, cfg.norm_unit_offset, name=name)


RopeTables = tuple[jax.Array, jax.Array]  # (cos, sin), each [B, L, 1, H/2] float32
# (global layers' tables, local layers' tables or None when they are the same).
LayerRopeTables = tuple[RopeTables, RopeTables | None]


def inv_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
  """RoPE inverse frequencies [H/2] (float32) of global or local (sliding-window) layers.

  Local layers use rope_local_base (when set) and never the scaling, as in
  Gemma 3; the llama3 and linear scalings follow transformers'
  modeling_rope_utils step by step, in float32 like it.
  """
  h = cfg.head_dim
  base = (cfg.rope_local_base or cfg.rope_base) if local else cfg.rope_base
  inv_freq_F = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if local or cfg.rope_scaling == "none":
    return inv_freq_F
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    return inv_freq_F / factor
  # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
  low, high, orig = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
  wavelen_F = 2 * math.pi / inv_freq_F
  scaled_F = jnp.where(wavelen_F > orig / low, inv_freq_F / factor, inv_freq_F)
  smooth_F = (orig / wavelen_F - low) / (high - low)
  smoothed_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
  medium_F = ~(wavelen_F < orig / high) & ~(wavelen_F > orig / low)
  return jnp.where(medium_F, smoothed_F, scaled_F)


def rope_tables(positions_BxL: jax.Array, inv_freq_F: jax.Array) -> RopeTables:
  """cos and sin of the rotary angles of each position.

  Computed once per forward pass and passed to every layer: computed inside
  the layers, XLA fused them into each layer's q and k products and evaluated
  the transcendentals again per head and per layer (~4% of a CPU decode step).
  """
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F
  return jnp.cos(angles_BxLxF)[:, :, None, :], jnp.sin(angles_BxLxF)[:, :, None, :]


def layer_rope_tables(cfg: ModelConfig, positions_BxL: jax.Array) -> LayerRopeTables:
  """Tables of global layers, and of local layers when their frequencies differ."""
  tables = rope_tables(positions_BxL, inv_frequencies(cfg))
  if not any(cfg.local_layers) or (cfg.rope_local_base in (0.0, cfg.rope_base)
                                   and cfg.rope_scaling == "none"):
    return tables, None
  return tables, rope_tables(positions_BxL, inv_frequencies(cfg, local=True))


def rope(x_BxLxNxH: jax.Array, tables: RopeTables) -> jax.Array:
  """Rotary embedding, rotate-half layout (pairs i and i + H/2)."""
  h = x_BxLxNxH.shape[-1]
  cos, sin = tables
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


# A layer's kind: a Python bool (the layers are applied in a Python loop), or a
# traced bool scalar for a caller that scans Block over stacked layers.
IsLocal = bool | jax.Array

LAYER_PREFIX = "layers_"  # params[f"layers_{i}"] holds layer i's params.


def layer_name(i: int) -> str:
  return f"{LAYER_PREFIX}{i}"


def layer_params(cfg: ModelConfig, params: Any) -> list[Any]:
  """The per-layer param trees, in order (views of `params`, no copy)."""
  return [params[layer_name(i)] for i in range(cfg.n_layers)]


STACKED_KEY = "layers"  # Where the earlier (nn.scan) layout kept all layers, stacked.


def stacked_layout(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """`params` (arrays or ShapeDtypeStructs) in the stacked layout of older checkpoints:
  params["layers"] leaves are [n_layers, ...] (for a ShapeDtypeStruct, the sharding
  gains an unsharded leading axis)."""
  def stack(*leaves):
    a = leaves[0]
    if isinstance(a, jax.ShapeDtypeStruct):
      sharding = a.sharding
      if sharding is not None:
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
      return jax.ShapeDtypeStruct((len(leaves),) + a.shape, a.dtype, sharding=sharding)
    return jnp.stack(leaves)
  out = {k: v for k, v in params.items() if not k.startswith(LAYER_PREFIX)}
  out[STACKED_KEY] = jax.tree.map(stack, *layer_params(cfg, params))
  return out


def unstack_layout(cfg: ModelConfig, stacked: dict[str, Any], shardings: Any) -> dict[str, Any]:
  """The per-layer params of a stacked-layout tree, placed on `shardings` (per-layer
  param shardings). Each stacked array is deleted once split, so the devices hold
  the params plus one stacked array at most."""
  out = {k: v for k, v in stacked.items() if k != STACKED_KEY}
  paths_leaves = jax.tree_util.tree_flatten_with_path(stacked[STACKED_KEY])[0]
  layers = [{} for _ in range(cfg.n_layers)]
  for path, x in paths_leaves:
    keys = [k.key for k in path]
    for i in range(cfg.n_layers):
      sharding = shardings[layer_name(i)]
      for k in keys:
        sharding = sharding[k]
      tree = layers[i]
      for k in keys[:-1]:
        tree = tree.setdefault(k, {})
      tree[keys[-1]] = jax.device_put(x[i], sharding)
    x.delete()
  out.update({layer_name(i): layers[i] for i in range(cfg.n_layers)})
  return out


def _static_kind(cfg: ModelConfig, is_local: IsLocal) -> IsLocal:
  kinds = set(cfg.local_layers)
  return kinds.pop() if len(kinds) == 1 else is_local


def _pick(is_local: IsLocal, local: Any, global_: Any) -> Any:
  if isinstance(is_local, bool):
    return local if is_local else global_
  return jax.tree.map(lambda a, b: jnp.where(is_local, a, b), local, global_)


def _window_mask(mask: jax.Array, in_window: jax.Array, is_local: IsLocal) -> jax.Array:
  """mask, restricted to the sliding window on a local layer."""
  if isinstance(is_local, bool):
    return mask & in_window if is_local else mask
  return mask & (in_window | ~is_local)


def _attn_logits(cfg: ModelConfig, qk: jax.Array) -> jax.Array:
  """Scaled (and, for Gemma 2, soft-capped) float32 attention logits."""
  logits = qk * cfg.attn_scale
  cap = cfg.attn_logit_softcap
  return cap * jnp.tanh(logits / cap) if cap else logits


class Block(nn.Module):
  """Pre-norm block: GQA attention + gated MLP, with the family switches of ModelConfig.
  Transformer and decode_step apply it layer by layer."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, rope_BxL: LayerRopeTables,
               is_local: IsLocal, key_pos_BxS: jax.Array | None,
               key_valid_BxS: jax.Array | None, cache: LayerCache | SharedPrefixCache | None,
               lora: Any = None, segments_BxL: jax.Array | None = None
               ) -> tuple[jax.Array, LayerCache | SharedPrefixCache | None]:
    """Returns (new residual stream, this layer's updated cache or None).

    is_local: whether this is a sliding-window layer (IsLocal). With a SharedPrefixCache
    (decoding), key_pos_BxS and key_valid_BxS are unused. lora: None, or this layer's
    LoRA adapters (lora.LayerAdapters; see _project). segments_BxL: see Transformer.
    """
    cfg, dt, pdt = self.cfg, self.cfg.compute_dtype, self.cfg.weight_dtype
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(stddev=d ** -0.5)
    cons = lambda t, axes: partitioning.constrain(t, self.mesh, axes)
    is_local = _static_kind(cfg, is_local)

    # --- Attention. ---
    hx = _norm(cfg, "attn_norm")(x_BxLxD)
    wq = _param(self, "q", (d, n, h), ("embed", "heads", "head_dim"), init, pdt)
    wk = _param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), init, pdt)
    wv = _param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), init, pdt)
    wo = _param(self, "o", (n, h, d), ("heads", "head_dim", "embed"),
                nn.initializers.normal(stddev=(n * h) ** -0.5), pdt)
    q_BxLxNxH = _project(lora, "q", "bld,dnh->blnh", hx, wq, dt)
    k_BxLxKxH = _project(lora, "k", "bld,dkh->blkh", hx, wk, dt)
    v_BxLxKxH = _project(lora, "v", "bld,dkh->blkh", hx, wv, dt)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxLxNxH += _param(self, "q_bias", (n, h), ("heads", "head_dim"), zeros, pdt).astype(dt)
      k_BxLxKxH += _param(self, "k_bias", (k, h), ("kv_heads", "head_dim"), zeros, pdt).astype(dt)
      v_BxLxKxH += _param(self, "v_bias", (k, h), ("kv_heads", "head_dim"), zeros, pdt).astype(dt)
    if cfg.qk_norm:  # Per head, over head_dim, before RoPE.
      q_BxLxNxH = _norm(cfg, "q_norm")(q_BxLxNxH)
      k_BxLxKxH = _norm(cfg, "k_norm")(k_BxLxKxH)
    global_tables, local_tables = rope_BxL
    tables = global_tables if local_tables is None else _pick(is_local, local_tables,
                                                              global_tables)
    q_BxLxNxH = cons(rope(q_BxLxNxH, tables), ("act_batch", "act_len", "act_heads", None))
    k_BxLxKxH = rope(k_BxLxKxH, tables)

    if isinstance(cache, SharedPrefixCache):
      attn_BxLxNxH, cache = _shared_prefix_attention(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                                     positions_BxL, cache, is_local)
    else:
      attn_BxLxNxH, cache = _attention(cfg, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, positions_BxL,
                                       key_pos_BxS, key_valid_BxS, cache, is_local,
                                       segments_BxL)
    attn_BxLxNxH = cons(attn_BxLxNxH, ("act_batch", "act_len", "act_heads", None))
    out_BxLxD = _project(lora, "o", "blnh,nhd->bld", attn_BxLxNxH, wo, dt)
    if cfg.post_norms:
      out_BxLxD = _norm(cfg, "post_attn_norm")(out_BxLxD)
    x_BxLxD = cons(x_BxLxD + out_BxLxD, ("act_batch", "act_len", "act_embed"))

    # --- Gated MLP: SwiGLU, or GeGLU (tanh GELU). ---
    hx = _norm(cfg, "mlp_norm")(x_BxLxD)
    w_gate = _param(self, "gate", (d, cfg.d_ff), ("embed", "mlp"), init, pdt)
    w_up = _param(self, "up", (d, cfg.d_ff), ("embed", "mlp"), init, pdt)
    w_down = _param(self, "down", (cfg.d_ff, d), ("mlp", "embed"),
                    nn.initializers.normal(stddev=cfg.d_ff ** -0.5), pdt)
    gate_BxLxF = _project(lora, "gate", "bld,df->blf", hx, w_gate, dt)
    up_BxLxF = _project(lora, "up", "bld,df->blf", hx, w_up, dt)
    act = (jax.nn.silu if cfg.mlp_activation == "silu"
           else lambda x: jax.nn.gelu(x, approximate=True))
    hidden_BxLxF = cons(act(gate_BxLxF) * up_BxLxF, ("act_batch", "act_len", "act_mlp"))
    out_BxLxD = _project(lora, "down", "blf,fd->bld", hidden_BxLxF, w_down, dt)
    if cfg.post_norms:
      out_BxLxD = _norm(cfg, "post_mlp_norm")(out_BxLxD)
    x_BxLxD = cons(x_BxLxD + out_BxLxD, ("act_batch", "act_len", "act_embed"))
    return x_BxLxD, cache


def _project(lora: Any, name: str, subscripts: str, x: jax.Array, w: Any, dt: Any) -> jax.Array:
  """x W by `subscripts`. With a LoRA hook (lora.LayerAdapters, train.lora.rank > 0) the
  hook computes it: x W + s (x A) B, W dequantized (a quantized base leaf is a qwix
  QArray: Flax's param shape check pairs its first leaf, qvalue, with W's shape). The
  hook's math lives in lora.py; without one (full fine-tuning, sampling) this is the
  plain einsum, the same computation as without the hook."""
  if lora is None:
    return jnp.einsum(subscripts, x, w.astype(dt))
  return lora.project(name, subscripts, x, w, dt)


def _attention(cfg: ModelConfig, q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array,
               v_BxLxKxH: jax.Array, positions_BxL: jax.Array, key_pos_BxS: jax.Array,
               key_valid_BxS: jax.Array, cache: LayerCache | None, is_local: IsLocal,
               segments_BxL: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
  """Attention of L new tokens per row: over themselves, or over a per-row cache.
  segments_BxL (no cache): see Transformer."""
  b, l, n, h = q_BxLxNxH.shape
  k = k_BxLxKxH.shape[2]
  dt = cfg.compute_dtype
  # keys/values are [B, S, K, H] (the L new tokens, S = L) without a cache and
  # the cache's own [B, K, S, H] with one; the einsums take either layout as is.
  if cache is None:
    kv_layout, keys, values = "bskh", k_BxLxKxH, v_BxLxKxH
  else:
    # Scatter the new keys/values into each row's slots, in place (nothing
    # reads the old cache after this).
    b_idx_Bx1 = jnp.arange(b)[:, None]
    cache = {
        "k": cache["k"].at[b_idx_Bx1, :, positions_BxL].set(
            k_BxLxKxH.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[b_idx_Bx1, :, positions_BxL].set(
            v_BxLxKxH.astype(cache["v"].dtype), mode="drop")}
    kv_layout, keys, values = "bksh", cache["k"].astype(dt), cache["v"].astype(dt)

  g = n // k
  q_BxLxKxGxH = q_BxLxNxH.reshape(b, l, k, g, h)
  logits_BxKxGxLxS = _attn_logits(cfg, jnp.einsum(f"blkgh,{kv_layout}->bkgls", q_BxLxKxGxH, keys,
                                                  preferred_element_type=jnp.float32))
  # Causal by position (not by index): a query at position p sees keys at
  # positions <= p that are valid (not padding); on a local layer only the
  # last `sliding_window` of them (positions > p - window).
  mask_BxLxS = ((key_pos_BxS[:, None, :] <= positions_BxL[:, :, None])
                & key_valid_BxS[:, None, :])
  if segments_BxL is not None:  # Keys of the shared segment 0, or of the query's own.
    mask_BxLxS &= ((segments_BxL[:, None, :] == 0)
                   | (segments_BxL[:, None, :] == segments_BxL[:, :, None]))
  if cfg.sliding_window:
    in_window_BxLxS = key_pos_BxS[:, None, :] > positions_BxL[:, :, None] - cfg.sliding_window
    mask_BxLxS = _window_mask(mask_BxLxS, in_window_BxLxS, is_local)
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, -1e30)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(dt)
  attn_BxLxKxGxH = jnp.einsum(f"bkgls,{kv_layout}->blkgh", probs_BxKxGxLxS, values)
  return attn_BxLxKxGxH.reshape(b, l, n, h), cache


def _cache_keys(b: int, s: int) -> tuple[jax.Array, jax.Array]:
  """(key positions, key validity) [B, S] of a cache: slot i holds position i."""
  return (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), jnp.ones((b, s), bool))


def _embed(cfg: ModelConfig, mesh: Mesh | None, embedding_VxD: jax.Array,
           tokens_BxL: jax.Array) -> jax.Array:
  x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(cfg.compute_dtype)
  if cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the compute dtype first as it does.
    x_BxLxD = x_BxLxD * jnp.asarray(cfg.d_model ** 0.5, cfg.compute_dtype)
  return partitioning.constrain(x_BxLxD, mesh, ("act_batch", "act_len", "act_embed"))


def _unembed(cfg: ModelConfig, mesh: Mesh | None, x_BxLxD: jax.Array,
             w_out_DxV: jax.Array) -> jax.Array:
  logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_out_DxV.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
  cap = cfg.final_logit_softcap
  if cap:
    logits_BxLxV = cap * jnp.tanh(logits_BxLxV / cap)
  return partitioning.constrain(logits_BxLxV, mesh, ("act_batch", "act_len", "act_vocab"))


class Transformer(nn.Module):
  """Decoder-only LM. `mesh` only places sharding constraints on activations."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None, *,
               input_mask_BxL: jax.Array | None = None,
               cache: Cache | None = None,
               logits_at_BxT: jax.Array | None = None,
               lora: Any = None,
               segments_BxL: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    """Returns (float32 logits [B, L, V], updated cache or None).

    Args:
      tokens_BxL: token ids.
      positions_BxL: position of each token (defaults to 0..L-1). With a cache
        these are also the slots the tokens are written to.
      input_mask_BxL: 1 for real tokens. Without a cache, padding keys are
        masked out; with a cache, slot validity follows from positions alone.
      cache: None, or init_cache(...) / a cache returned by a previous call.
      logits_at_BxT: if given, logits only at these indices into each row's L
        positions ([B, T, V]). Training needs logits only where there is a target
        (a ReST-EM batch is mostly prompt): the output projection, the largest
        matmul of a big-vocabulary model, then costs T/L of the full one.
      lora: None, or LoRA adapters applied inside each Block (lora.ModelAdapters: its
        layer(i) is layer i's hook, or None); the params are then the frozen base.
      segments_BxL: None, or (no cache) several sequences sharing a prefix in one row
        (batches.make_shared_batch): a token sees the keys of segment 0 (the shared
        prompt) and of its own segment, causally by position; -1 marks padding, which
        no other segment sees. Positions then restart after the prompt in each segment.
    """
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if segments_BxL is not None and cache is not None:
      raise ValueError("Transformer: segments_BxL is for training rows, not with a cache")
    if cache is None:
      key_pos_BxS = positions_BxL
      key_valid_BxS = (jnp.ones((b, l), bool) if input_mask_BxL is None
                       else input_mask_BxL.astype(bool))
    else:
      key_pos_BxS, key_valid_BxS = _cache_keys(b, cache["k"].shape[3])

    # std d^-1/2: with tied embeddings the same matrix is the output projection,
    # and std 1 would start training from logits of std sqrt(d).
    embedding = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                       nn.initializers.normal(stddev=cfg.d_model ** -0.5), cfg.weight_dtype)
    x_BxLxD = _embed(cfg, self.mesh, embedding, tokens_BxL)

    # Layer i's cache is its slice of the stacked cache (a copy per call, fine
    # for prefill; token-by-token decoding uses decode_step on per-layer caches).
    tables = layer_rope_tables(cfg, positions_BxL)
    new_caches = []
    for i, is_local in enumerate(cfg.local_layers):
      layer_cache = None if cache is None else {k: c[i] for k, c in cache.items()}
      x_BxLxD, layer_cache = Block(cfg, self.mesh, name=layer_name(i))(
          x_BxLxD, positions_BxL, tables, is_local, key_pos_BxS, key_valid_BxS, layer_cache,
          None if lora is None else lora.layer(i), segments_BxL)
      new_caches.append(layer_cache)
    new_cache = None if cache is None else {
        k: partitioning.constrain(jnp.stack([c[k] for c in new_caches]), self.mesh, CACHE_AXES)
        for k in cache}

    if logits_at_BxT is not None:
      x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_BxT[..., None], axis=1)
    x_BxLxD = _norm(cfg, "final_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      w_out_DxV = embedding.T
    else:
      w_out_DxV = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                         nn.initializers.normal(stddev=cfg.d_model ** -0.5), cfg.weight_dtype)
    return _unembed(cfg, self.mesh, x_BxLxD, w_out_DxV), new_cache


def decode_step(cfg: ModelConfig, mesh: Mesh | None, params: dict[str, Any],
                tokens_BxL: jax.Array, positions_BxL: jax.Array,
                layer_caches: Sequence[LayerCache] | Sequence[SharedPrefixCache],
                lora: Any = None) -> tuple[jax.Array, list[Any]]:
  """Transformer(cfg, mesh).apply(..., cache=...) for per-layer weights and caches.

  Same math as the cached Transformer call (the same Block, layer by layer), but
  shaped for a lax.while_loop that feeds one token per step. The caches are
  either per-row LayerCaches or SharedPrefixCaches (the Sampler's). Each
  layer's weights and cache are their own arrays, read (and the cache updated)
  in place: reading a layer out of a stacked array copies it (module docstring).
  Returns (float32 logits [B, L, V], the updated per-layer caches). lora: as for
  Transformer (benchmarks/lora_sampling_memory.py; the Sampler passes merged weights).
  """
  b = tokens_BxL.shape[0]
  if isinstance(layer_caches[0], SharedPrefixCache):
    key_pos_BxS = key_valid_BxS = None
  else:
    key_pos_BxS, key_valid_BxS = _cache_keys(b, layer_caches[0]["k"].shape[2])
  x_BxLxD = _embed(cfg, mesh, params["embedding"], tokens_BxL)
  tables = layer_rope_tables(cfg, positions_BxL)
  block = Block(cfg, mesh)
  new_caches = []
  for i, (weights, cache, is_local) in enumerate(zip(layer_params(cfg, params), layer_caches,
                                                     cfg.local_layers)):
    x_BxLxD, cache = block.apply({"params": weights}, x_BxLxD, positions_BxL, tables, is_local,
                                 key_pos_BxS, key_valid_BxS, cache,
                                 None if lora is None else lora.layer(i))
    new_caches.append(cache)
  x_BxLxD = _norm(cfg).apply({"params": params["final_norm"]}, x_BxLxD)
  w_out_DxV = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
  return _unembed(cfg, mesh, x_BxLxD, w_out_DxV), new_caches


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the params, no FLOPs."""
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda r: model.init(r, tokens), jax.random.key(0))["params"]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
  """NamedShardings for the (unboxed) param tree, from the logical-axis rules."""
  return partitioning.tree_shardings(mesh, abstract_params(cfg))


def init_params(cfg: ModelConfig, mesh: Mesh, rng: jax.Array) -> Any:
  """Random params created directly in their shards (no full host copy)."""
  model = Transformer(cfg)
  shardings = param_shardings(cfg, mesh)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(model.init(r, tokens)["params"]), out_shardings=shardings)
  return init(rng)


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
