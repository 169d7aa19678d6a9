r"""Sampling with LoRA adapters: merge W' = W + s A B once per call (what the Sampler
gets, Trainer.model_params) vs apply them inside each Block in every decode step
(model.decode_step(..., lora=...)): peak RSS of one generation call.

    JAX_PLATFORMS=cpu python benchmarks/lora_sampling_memory.py [--base_dtypes=,int8]

SmolLM2-135M's shapes (random weights: memory does not depend on the values), rank 16
on all 7 matrices with a nonzero B, 16 prompts x 64 tokens, 64 greedy new tokens, a
KV cache per row. Each (way, base dtype) runs in its own process: it builds the frozen
base (quantized ones replace the float params, as a QLoRA run would hold only them),
compiles the call (from shapes: no merged copy yet), then runs it once inside the sampled
peak (lora_memory.PeakRSS; "merge" compiles its merge inside it); XLA's memory analysis
of the compiled call gives the same comparison without the allocator's noise.
"merge": the call merges a copy (Adapters.merged) and generates from it; "in_block":
it generates from the base and the adapters. Both print their tokens' agreement with
"merge" of the same base (greedy, float32 compute).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from restem_jax import configlib, lora, model as M, partitioning, recipes  # noqa: E402
from lora_memory import PeakRSS, _rss  # noqa: E402

P, PROMPT, NEW, RANK = 16, 64, 64, 16


def _generate(cfg, params, prompts_PxL, hook):
  """Greedy: prefill the prompts, then NEW decode steps of per-layer caches."""
  shape = M.cache_shape(cfg, P, PROMPT + NEW)
  cache = {k: jnp.zeros(shape, cfg.compute_dtype) for k in ("k", "v")}
  logits, cache = M.Transformer(cfg).apply({"params": params}, prompts_PxL, cache=cache,
                                           lora=hook)
  tok_P = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  caches = M.split_layers(cache, cfg.n_layers)

  def body(t, carry):
    tok_P, caches, out_PxT = carry
    pos = jnp.full((P, 1), PROMPT + t, jnp.int32)
    logits, caches = M.decode_step(cfg, None, params, tok_P[:, None], pos, caches, hook)
    out_PxT = out_PxT.at[:, t].set(tok_P)
    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), caches, out_PxT

  _, _, out = jax.lax.fori_loop(0, NEW, body, (tok_P, caches, jnp.zeros((P, NEW), jnp.int32)))
  return out


def run(way: str, base_dtype: str) -> dict:
  c = configlib.default_config()
  recipes.smollm2_135m(c)
  c.model.max_seq_len = PROMPT + NEW
  cfg = M.ModelConfig.from_config(c.model)
  mesh = partitioning.make_mesh(c.mesh)
  ad = lora.Adapters(cfg, lora.LoraConfig(RANK, 32.0, configlib.LORA_TARGETS, base_dtype),
                     mesh)
  base = ad.prepare_base(M.init_params(cfg, mesh, jax.random.key(0)))
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.01, x.shape), jnp.float32),
                          ad.abstract())
  prompts = jnp.asarray(rng.integers(1, cfg.vocab_size, (P, PROMPT)), jnp.int32)
  jax.block_until_ready((base, adapters))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  held = nbytes(base) + nbytes(adapters)  # alive through the call either way
  if way == "merge":
    gen = jax.jit(lambda p, x: _generate(cfg, p, x, None))
    call = lambda: gen(ad.merged(base, adapters), prompts)
    merged_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              jax.eval_shape(ad.merged, base, adapters))
    compiled = gen.lower(merged_abs, prompts).compile()  # compile outside the peak
  else:
    gen = jax.jit(lambda b, a, x: _generate(cfg, b, x, ad.apply(a)))
    call = lambda: gen(base, adapters, prompts)
    compiled = gen.lower(base, adapters, prompts).compile()
  mem = compiled.memory_analysis()
  # XLA's own account of the call: its arguments (the merged copy, or base + adapters),
  # its temporaries (KV cache, activations, any weights it materialises) and outputs.
  xla_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
  if way == "merge":
    xla_bytes += held  # the base and adapters stay alive beside the merged copy
  before = _rss()
  with PeakRSS() as peak:
    out = np.asarray(call())
  return {"way": way, "base_dtype": base_dtype or "float32", "rss_before_gb": before / 1e9,
          "peak_rss_gb": peak.peak / 1e9, "tokens": out.tolist(),
          "xla_live_gb": xla_bytes / 1e9, "xla_temp_gb": mem.temp_size_in_bytes / 1e9,
          "load_1m": os.getloadavg()[0]}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--child", default="")
  ap.add_argument("--base_dtypes", default=",int8")
  args = ap.parse_args()
  if args.child:
    way, bd = args.child.split(":")
    print(json.dumps(run(way, bd)))
    return
  print(f"| base | way | RSS before the call GB | peak RSS GB | peak - before GB | "
        f"XLA: held + args + temp + out GB | of which temp GB | tokens equal to merge |")
  print("|---|---|---|---|---|---|---|---|")
  for bd in args.base_dtypes.split(","):
    rows = {}
    for way in ("merge", "in_block"):
      p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={way}:{bd}"],
                         capture_output=True, text=True, env=dict(os.environ))
      if p.returncode:
        print(f"{way}:{bd} failed\n{p.stderr[-2000:]}")
        continue
      rows[way] = r = json.loads(p.stdout.strip().splitlines()[-1])
      same = (np.mean(np.asarray(r["tokens"]) == np.asarray(rows["merge"]["tokens"]))
              if "merge" in rows else float("nan"))
      print(f"| {r['base_dtype']} | {way} | {r['rss_before_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{r['peak_rss_gb'] - r['rss_before_gb']:.2f} | {r['xla_live_gb']:.2f} | "
            f"{r['xla_temp_gb']:.2f} | {same:.3f} | load {r['load_1m']:.1f}",
            flush=True)


if __name__ == "__main__":
  main()
