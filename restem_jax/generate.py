"""Generate (E-step): sample N solutions per problem, score, keep <= cap correct.

Problems are processed in chunks of `max_batch // num_samples` prompts, so
memory is flat in the number of problems. Each chunk writes two files with
atomic renames:
  samples/shard_CCCCC.jsonl   one line per KEPT sample: {problem_id, prompt,
                              sample, reward, iteration, seed}
  samples/stats_CCCCC.jsonl   one line per problem: {problem_id, level,
                              num_samples, num_correct, num_kept} (written
                              last: its presence marks the chunk complete)
A restarted E-step skips complete chunks. Randomness is keyed by (seed,
iteration, problem index) - both the sampler's PRNG and the choice of which
correct samples to keep - so a resumed run writes exactly the same shards.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from restem_jax import distributed, sampling, workdir as wd
from restem_jax.tasks import Problem


def decode_completions(vocab: Any, out: sampling.SampleOutput) -> list[list[str]]:
  """[B][N] completion texts, cut at EOS."""
  texts = []
  for b in range(out.tokens.shape[0]):
    row = []
    for n in range(out.tokens.shape[1]):
      ids = [int(t) for t in out.tokens[b, n, : out.lengths[b, n]]]
      if ids and ids[-1] == vocab.eos_id:
        ids = ids[:-1]
      row.append(vocab.decode(ids))
    texts.append(row)
  return texts


def choose_kept(rewards: Sequence[float], cap: int, seed: Sequence[int]) -> list[int]:
  """Indices of at most `cap` correct samples, chosen at random with `seed`."""
  correct = [i for i, r in enumerate(rewards) if r > 0]
  if len(correct) <= cap:
    return correct
  rng = np.random.default_rng(list(seed))
  return sorted(rng.choice(correct, size=cap, replace=False).tolist())


def generate(*, params: Any, sampler: sampling.Sampler, task: Any,
             problems: Sequence[Problem], sampling_cfg: ml_collections.ConfigDict,
             max_per_problem: int, iteration: int, out_dir: str, seed: int,
             log: Callable[[str], None] = logging.info) -> dict:
  """Runs the E-step over `problems`, writing shards to `out_dir`; returns counts."""
  if not problems:
    raise ValueError("the E-step got no training problems; check task.num_train and the data")
  n = sampling_cfg.num_samples
  per_chunk = max(1, sampling_cfg.max_batch // n)
  chunks = [range(s, min(s + per_chunk, len(problems))) for s in range(0, len(problems), per_chunk)]
  mine = distributed.process_shard(len(chunks))
  mode = sampling.SamplingMode(temperature=sampling_cfg.temperature, top_k=sampling_cfg.top_k,
                               top_p=sampling_cfg.top_p)
  key = jax.random.fold_in(jax.random.key(seed), iteration)
  vocab = task.vocabulary
  os.makedirs(out_dir, exist_ok=True)
  t0, done_problems = time.time(), 0
  todo = [c for c in mine if not os.path.exists(_stats_path(out_dir, c))]
  total = sum(len(chunks[c]) for c in todo)
  for c in todo:
    idx = chunks[c]
    chunk = [problems[i] for i in idx]
    prompts = [vocab.encode(p.prompt) for p in chunk]
    out = sampler.sample(params, prompts, num_samples=n,
                         max_new_tokens=sampling_cfg.max_new_tokens, mode=mode, rng=key,
                         prompt_ids=list(idx))
    texts = decode_completions(vocab, out)
    flat_problems = [p for p in chunk for _ in range(n)]
    rewards = task.score(flat_problems, [t for row in texts for t in row])
    kept_rows, stat_rows = [], []
    for j, (i, p) in enumerate(zip(idx, chunk)):
      r = rewards[j * n:(j + 1) * n]
      keep = choose_kept(r, max_per_problem, (seed, iteration, i))
      kept_rows += [dict(problem_id=p.id, prompt=p.prompt, sample=texts[j][k], reward=float(r[k]),
                         iteration=iteration, seed=seed) for k in keep]
      stat_rows.append(dict(problem_id=p.id, level=p.level, num_samples=n,
                            num_correct=int(sum(x > 0 for x in r)), num_kept=len(keep)))
    wd.write_lines_atomic(os.path.join(out_dir, f"shard_{c:05d}.jsonl"), kept_rows)
    wd.write_lines_atomic(_stats_path(out_dir, c), stat_rows)  # last: marks the chunk done
    done_problems += len(idx)
    rate = done_problems / max(time.time() - t0, 1e-9)
    log(f"generate iter {iteration}: {done_problems}/{total} problems, {rate:.1f} problems/s, "
        f"ETA {(total - done_problems) / max(rate, 1e-9):.0f}s")
  distributed.sync(f"generate_{iteration}")
  return summarize(out_dir)


def _stats_path(out_dir: str, chunk: int) -> str:
  return os.path.join(out_dir, f"stats_{chunk:05d}.jsonl")


def read_stats(out_dir: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(out_dir, "stats_*.jsonl"))):
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def summarize(out_dir: str) -> dict:
  rows = read_stats(out_dir)
  return dict(problems=len(rows), samples=sum(r["num_samples"] for r in rows),
              correct=sum(r["num_correct"] for r in rows),
              kept=sum(r["num_kept"] for r in rows),
              problems_solved=sum(r["num_correct"] > 0 for r in rows))
