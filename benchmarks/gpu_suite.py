"""The one-GPU benchmark suite (sized for <= 8 minutes on one H100/H200): README-ready rows.

    python benchmarks/gpu_suite.py                # on the GPU machine
    python benchmarks/gpu_suite.py --tiny         # CPU dry run, tiny sizes (tests/test_gpu_suite.py)

Parts, each timed after a warm-up (compile) call, medians of --repeats:
  1. decode: Sampler decode step at batch 1 / 64 / 256 (greedy and top-k 40, T 0.7) on the
     SmolLM2-135M architecture (random bf16 weights: bandwidth does not depend on the
     values), step time = (call with 129 new tokens - call with 1) / 128, and the HBM
     bandwidth it implies: bytes per step = all weights + the KV slots the step actually
     reads (the prompt bucket, plus the generated chunks 0..j of decode phase j, averaged
     over the call; sampling.decode_chunks), as % of the card's peak.
  2. kv-cache vs no-cache at batch 64 (benchmarks/sampler.py's jitted no-cache loop,
     greedy; tokens compared).
  3. vs_tunix.py (sampling and train step) on SmolLM2-135M and Gemma-3-270M in bf16, as a
     subprocess; skipped with a message when google-tunix is not installed.
  4. train-step MFU on a 0.74B-param Llama (d 1536, 24 layers, GQA 12/4, d_ff 4096, vocab
     32000) at 256 x 1024 = 262,144 tokens per step in 32 micro-batches, bf16 compute,
     float32 params + AdamW state (~12 GB; activations of one micro-batch without remat
     stay well under 80 GB). MFU = model FLOPs (train_step.py's count) / step time /
     dense bf16 peak (989 TFLOP/s on H100/H200 SXM).

Each part prints its rows as it finishes; a failing part prints one FAILED row and the
suite goes on (--tiny re-raises, so the dry-run test fails loudly instead).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sampler as sampler_bench  # noqa: E402  (benchmarks/sampler.py)
import train_step as train_bench  # noqa: E402  (benchmarks/train_step.py)
from restem_jax import batches, configlib, model as M, partitioning, sampling as S, training  # noqa: E402

HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, SXM
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense FLOP/s


@dataclasses.dataclass
class Sizes:
  decode_model: dict
  batches: tuple[int, ...]
  prompt_len: int
  steps: int
  nocache_batch: int
  nocache_new: int
  train_model: dict
  train_batch: int
  train_len: int
  micro_batches: int
  train_steps: int
  tunix_args: tuple[str, ...]


SMOLLM2 = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
               d_ff=1536, rope_base=1e5, tie_embeddings=True, max_seq_len=512)
FULL = Sizes(
    decode_model=SMOLLM2, batches=(1, 64, 256), prompt_len=128, steps=128, nocache_batch=64,
    nocache_new=64,
    train_model=dict(vocab_size=32000, d_model=1536, n_layers=24, n_heads=12, n_kv_heads=4,
                     d_ff=4096, tie_embeddings=False, max_seq_len=1024),
    train_batch=256, train_len=1024, micro_batches=32, train_steps=3,
    tunix_args=("--model", "MODEL", "--dtype", "bfloat16", "--repeats", "5"))
TINY = Sizes(
    decode_model=dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, tie_embeddings=True, max_seq_len=64),
    batches=(1, 4), prompt_len=16, steps=8, nocache_batch=4, nocache_new=8,
    train_model=dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     tie_embeddings=False, max_seq_len=32),
    train_batch=4, train_len=32, micro_batches=2, train_steps=1,
    tunix_args=("--model", "tiny", "--repeats", "1", "--prompts", "2", "--samples", "2",
                "--new_tokens", "8", "--check_tokens", "4", "--train_batch", "2",
                "--train_len", "96"))


def _peak(table: dict[str, float]) -> float:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in table.items() if k in kind), float("nan"))


def _pct(x: float) -> str:
  return "n/a" if np.isnan(x) else f"{x:.0%}"


def _median_s(fn: Callable, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _mesh():
  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  return partitioning.make_mesh(c.mesh, jax.devices()[:1])


def part_decode(sz: Sizes, dtype: str, repeats: int) -> list[str]:
  cfg = M.ModelConfig(**sz.decode_model, dtype=dtype, param_dtype=dtype)
  mesh = _mesh()
  params = M.init_params(cfg, mesh, jax.random.key(0))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  sampler = S.Sampler(cfg, mesh, eos_id=sampler_bench.NO_EOS)
  chunks = S.decode_chunks(sz.steps + 1, sampler.max_decode_phases)
  gen_slots = float(np.dot(chunks, np.cumsum(chunks))) / (sz.steps + 1)  # mean slots read
  peak = _peak(HBM_PEAK)
  rng = np.random.default_rng(1)
  rows = []
  for name, mode in (("greedy", S.GREEDY), ("top-k 40 T 0.7", S.SamplingMode(0.7, 40))):
    for batch in sz.batches:
      prompts = rng.integers(3, cfg.vocab_size, (batch, sz.prompt_len)).astype(np.int32)
      call = lambda t: lambda: sampler.sample(params, prompts, num_samples=1, max_new_tokens=t,
                                              mode=mode, rng=jax.random.key(0))
      step = (_median_s(call(sz.steps + 1), repeats) - _median_s(call(1), repeats)) / sz.steps
      # N = 1: every row has its own prompt, so prompt slots are read per row.
      kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize * batch * (
          sz.prompt_len + gen_slots)
      bw = (weight_bytes + kv) / step
      rows.append(f"| decode {name} | {M.count_params(params) / 1e6:.0f}M {dtype} | batch {batch}, "
                  f"prompt {sz.prompt_len} | {step * 1e3:.2f} ms/step, {batch / step:,.0f} tok/s | "
                  f"{bw / 1e12:.2f} TB/s = {_pct(bw / peak)} of HBM peak (weights "
                  f"{weight_bytes / 1e6:.0f} MB + KV {kv / 1e6:.0f} MB per step) |")
  return rows


def part_nocache(sz: Sizes, dtype: str, repeats: int) -> list[str]:
  cfg = M.ModelConfig(**sz.decode_model, dtype=dtype, param_dtype=dtype)
  mesh = _mesh()
  params = M.init_params(cfg, mesh, jax.random.key(0))
  prompts = np.random.default_rng(0).integers(
      3, cfg.vocab_size, (sz.nocache_batch, sz.prompt_len)).astype(np.int32)
  sampler = S.Sampler(cfg, mesh, eos_id=sampler_bench.NO_EOS)
  kv_out, ref = [], []
  t_kv = _median_s(lambda: kv_out.append(sampler.sample(
      params, prompts, num_samples=1, max_new_tokens=sz.nocache_new, mode=S.GREEDY,
      rng=jax.random.key(0))) or kv_out[-1].tokens, repeats)
  base = sampler_bench.no_cache_greedy(cfg, sz.nocache_new)
  t_nc = _median_s(lambda: ref.append(base(params, jnp.asarray(prompts))) or ref[-1], repeats)
  agree = float((np.asarray(ref[-1]) == kv_out[-1].tokens[:, 0]).mean())
  return [f"| kv-cache vs no-cache | {M.count_params(params) / 1e6:.0f}M {dtype} | batch "
          f"{sz.nocache_batch}, prompt {sz.prompt_len}, {sz.nocache_new} new | {t_kv * 1e3:.1f} vs "
          f"{t_nc * 1e3:.1f} ms = {t_nc / t_kv:.1f}x | greedy tokens equal at {agree:.0%} of "
          "positions (bf16 cached vs uncached sums can differ after a near-tie) |"]


def part_tunix(sz: Sizes, tiny: bool) -> list[str]:
  if importlib.util.find_spec("tunix") is None:
    return ["| vs google-tunix | - | - | skipped: google-tunix is not installed "
            "(pip install -e '.[bench]') | - |"]
  rows = []
  for model in (("tiny",) if tiny else ("smollm2", "gemma3_270m")):
    args = [a if a != "MODEL" else model for a in sz.tunix_args]
    out = subprocess.run([sys.executable, os.path.join(HERE, "vs_tunix.py"), *args],
                         capture_output=True, text=True, check=False)
    table = [l for l in out.stdout.splitlines() if l.startswith(f"| {model} |")]
    if out.returncode or not table:
      last = (out.stderr.strip().splitlines() or ["no output"])[-1]
      raise RuntimeError(f"vs_tunix.py --model {model} failed (rc {out.returncode}): {last}")
    rows += table
  return rows


def part_mfu(sz: Sizes, dtype: str) -> list[str]:
  cfg = M.ModelConfig(**sz.train_model, dtype=dtype)  # float32 params, `dtype` compute
  c = configlib.default_config()
  c.train.batch_size, c.train.micro_batches = sz.train_batch, sz.micro_batches
  c.train.max_steps, c.train.warmup_steps = 1000, 10
  mesh = _mesh()
  trainer = training.Trainer(cfg, c.train, mesh)
  params = M.init_params(cfg, mesh, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompt = 16
  batch = batches.make_batch(
      [list(rng.integers(1, cfg.vocab_size, prompt)) for _ in range(sz.train_batch)],
      [list(rng.integers(1, cfg.vocab_size, sz.train_len - prompt)) for _ in range(sz.train_batch)],
      [1.0] * sz.train_batch, sz.train_len)
  state = trainer.init_state(params)
  t = time.perf_counter()
  state, _ = trainer.step(state, batch)
  first = time.perf_counter() - t
  times = []
  for _ in range(sz.train_steps):
    t = time.perf_counter()
    state, m = trainer.step(state, batch)  # returns once the metrics are on the host
    times.append(time.perf_counter() - t)
  step = float(np.median(times))
  flops = train_bench.model_flops_per_step(cfg, params, sz.train_batch, sz.train_len)
  tokens = sz.train_batch * sz.train_len
  mfu = flops / step / _peak(BF16_PEAK)
  return [f"| train step MFU | {M.count_params(params) / 1e6:.0f}M, {cfg.n_layers} layers, "
          f"{dtype} compute | {sz.train_batch} x {sz.train_len} = {tokens:,} tokens, "
          f"{sz.micro_batches} micro-batches | {step:.2f} s/step, {tokens / step:,.0f} tok/s, "
          f"{flops / step / 1e12:.1f} TFLOP/s | MFU {_pct(mfu)} (compile + first step "
          f"{first:.0f} s; loss {m['loss']:.3f}) |"]


def main(argv: list[str] | None = None) -> list[str]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU dry run)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip", default="", help="comma list of: decode,nocache,tunix,mfu")
  args = ap.parse_args(argv)
  sz = TINY if args.tiny else FULL
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  repeats = 1 if args.tiny else args.repeats
  dev = jax.devices()[0]
  cuda = getattr(dev.client, "platform_version", "")
  print(f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {cuda}, python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}", flush=True)
  print("| what | model | setting | figure | notes |\n|---|---|---|---|---|", flush=True)
  parts = {"decode": lambda: part_decode(sz, dtype, repeats),
           "nocache": lambda: part_nocache(sz, dtype, repeats),
           "tunix": lambda: part_tunix(sz, args.tiny),
           "mfu": lambda: part_mfu(sz, dtype)}
  skip = set(filter(None, args.skip.split(",")))
  rows, t0 = [], time.perf_counter()
  for name, fn in parts.items():
    if name in skip:
      continue
    t = time.perf_counter()
    try:
      new = fn()
    except Exception as e:  # pylint: disable=broad-except
      if args.tiny:
        raise
      traceback.print_exc()
      new = [f"| {name} | - | - | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]} | - |"]
    for r in new:
      print(r, flush=True)
    rows += new
    print(f"<!-- {name}: {time.perf_counter() - t:.0f} s, suite so far "
          f"{time.perf_counter() - t0:.0f} s -->", flush=True)
  return rows


if __name__ == "__main__":
  main()
