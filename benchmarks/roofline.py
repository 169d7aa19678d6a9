"""What this machine can do, and what fraction of it a benchmark's figure uses.

Every speed figure of benchmarks/ reads as "% of what this machine can do":
  * `measure()` times, in the calling process, a large jnp.dot (the matmul
    peak in FLOP/s) and a large array copy (y = x + 1: read + write, the copy
    bandwidth in bytes/s), best of a few rounds, on device 0 (times the device
    count on an accelerator; fake CPU devices share the same cores);
  * `forward_flops` / `train_flops` / `decode_step_flops` count the model's
    matmul FLOPs from its ModelConfig (PaLM appendix B: 2 per multiply-add,
    causal attention not halved, backward = 2 x forward);
  * `decode_step_bytes`: the bytes one decode step must read at least (every
    weight once, the KV cache of each row once: the bound of a memory-bound
    decode);
  * `fractions(...)` formats achieved FLOP/s and bytes/s as fractions of the peaks.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from restem_jax import model as M


@dataclasses.dataclass(frozen=True)
class Peaks:
  """Measured matmul FLOP/s and copy bytes/s of this machine (one process)."""
  matmul_flops_per_s: float
  copy_bytes_per_s: float
  dtype: str
  matmul_n: int
  copy_mib: int

  def describe(self) -> str:
    return (f"machine peaks (measured now): {self.matmul_flops_per_s / 1e9:.1f} GFLOP/s "
            f"{self.dtype} matmul ({self.matmul_n}^3 jnp.dot), "
            f"{self.copy_bytes_per_s / 1e9:.1f} GB/s copy ({self.copy_mib} MiB array)")

  def balance(self) -> float:
    """FLOPs per byte at which a program turns from memory- to compute-bound."""
    return self.matmul_flops_per_s / self.copy_bytes_per_s


def _best_seconds(fn, x, rounds: int, reps: int) -> float:
  jax.block_until_ready(fn(x))
  best = float("inf")
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
      out = fn(x)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / reps)
  return best


def measure(dtype: str = "", matmul_n: int = 0, copy_mib: int = 0, rounds: int = 3) -> Peaks:
  """Peaks of device 0 (x device count off CPU). Defaults: float32, 2048^3, 256 MiB on
  CPU; bfloat16, 8192^3, 2 GiB on an accelerator (small products are launch-bound)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  dtype = dtype or ("float32" if on_cpu else "bfloat16")
  matmul_n = matmul_n or (2048 if on_cpu else 8192)
  copy_mib = copy_mib or (256 if on_cpu else 2048)
  scale = 1 if on_cpu else jax.device_count()
  dev = jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), dtype), dev)
  mm = _best_seconds(jax.jit(lambda x: x @ x), a, rounds, 3 if on_cpu else 10)
  del a
  n = copy_mib * 2 ** 20 // 4
  x = jax.device_put(jnp.zeros((n,), jnp.float32), dev)
  cp = _best_seconds(jax.jit(lambda y: y + 1.0), x, rounds, 3 if on_cpu else 20)
  del x
  return Peaks(matmul_flops_per_s=scale * 2 * matmul_n ** 3 / mm,
               copy_bytes_per_s=scale * 2 * n * 4 / cp, dtype=dtype, matmul_n=matmul_n,
               copy_mib=copy_mib)


def matmul_params(cfg: M.ModelConfig) -> int:
  """Weights that take part in a matmul per token: q, k, v, o and the gated MLP of every
  layer, and the output projection (tied or not); not the embedding lookup or norms."""
  d, h = cfg.d_model, cfg.head_dim
  attn = d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2
  return cfg.n_layers * (attn + 3 * d * cfg.d_ff) + d * cfg.vocab_size


def token_flops(cfg: M.ModelConfig, context: int) -> int:
  """Forward FLOPs of one token attending over `context` keys."""
  return 2 * matmul_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def forward_flops(cfg: M.ModelConfig, batch: int, seq_len: int) -> int:
  """A forward over batch x seq_len tokens, each attending over all seq_len keys."""
  return batch * seq_len * token_flops(cfg, seq_len)


def train_flops(cfg: M.ModelConfig, batch: int, seq_len: int) -> int:
  """A training step: forward + backward (2 x forward: input and weight gradients)."""
  return 3 * forward_flops(cfg, batch, seq_len)


def decode_step_flops(cfg: M.ModelConfig, rows: int, context: int) -> int:
  """One decode step: `rows` tokens, each attending over `context` keys."""
  return rows * token_flops(cfg, context)


def param_bytes(cfg: M.ModelConfig) -> int:
  """Bytes of every weight (the embedding table once if tied), in the param dtype."""
  d = cfg.d_model
  n = matmul_params(cfg) + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
  n += cfg.n_layers * 2 * d + d  # the RMSNorm scales
  return n * np.dtype(cfg.weight_dtype).itemsize


def decode_step_bytes(cfg: M.ModelConfig, rows: int, cached_keys: int) -> int:
  """Least bytes one decode step reads: every weight and `cached_keys` key/value slots of
  every layer (for the Sampler: prompts x prompt length + rows x generated length)."""
  kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cached_keys
  return param_bytes(cfg) + kv * np.dtype(cfg.compute_dtype).itemsize


def fractions(peaks: Peaks, flops: float, bytes_: float, seconds: float) -> str:
  """'X GFLOP/s = a% of matmul peak, Y GB/s = b% of copy bandwidth' for one measurement."""
  f, b = flops / seconds, bytes_ / seconds
  return (f"{f / 1e9:.2f} GFLOP/s = {f / peaks.matmul_flops_per_s:.1%} of matmul peak, "
          f"{b / 1e9:.2f} GB/s = {b / peaks.copy_bytes_per_s:.1%} of copy bandwidth")


def sample_call(cfg: M.ModelConfig, prompts: int, rows: int, prompt_len: int,
                new_tokens: int) -> tuple[int, int]:
  """(FLOPs, least bytes) of one sampling call: prefill `prompts` prompts once, then
  `new_tokens` decode steps of `rows` rows over the prompt and, on average, half the
  generated slots (the prompt's keys stored and read once per prompt)."""
  flops = prompts * forward_flops(cfg, 1, prompt_len)
  flops += new_tokens * decode_step_flops(cfg, rows, prompt_len + new_tokens // 2)
  cached = prompts * prompt_len + rows * (new_tokens // 2)
  return flops, param_bytes(cfg) + new_tokens * decode_step_bytes(cfg, rows, cached)


def train_step_bytes(cfg: M.ModelConfig) -> int:
  """Least weight traffic of an AdamW step: params read twice (forward, backward),
  the gradient written and read, both moments read and written, the params written:
  8 x param bytes (activations not counted)."""
  return 8 * param_bytes(cfg)
