"""Generate (E-step): sample N solutions per problem, score, keep <= cap correct.

Problems are processed in chunks of `max_batch // num_samples` prompts
(sampling.prompt_chunks; sampled by Sampler.sample_chunked, the path evaluation
uses too: one compiled shape for the whole E-step, and the next chunk samples
on the device while this one is scored and written), so memory is flat in the
number of problems. Each chunk writes, per process H,
two files with atomic renames:
  samples/shard_CCCCC_pHHH.jsonl  one line per KEPT sample: {problem_id,
                                  prompt, sample, reward, iteration, seed}
  samples/stats_CCCCC_pHHH.jsonl  one line per problem: {problem_id, level,
                                  num_samples, num_correct, num_kept,
                                  num_faults} (written last)
A chunk is complete when its stats files hold a line for each of its
problems and its files check out (samples.check_files); a restarted E-step
skips complete chunks and redoes the others
(process 0 first deletes their partial files, so nothing is counted twice,
even if the number of processes changed). Randomness is keyed by (seed,
iteration, problem index) - both the sampler's PRNG and the choice of which
correct samples to keep - so a resumed run writes exactly the same samples.

Multi-host: sampling is one SPMD program over the global mesh, so every
process walks the same chunks in the same order (a chunk's rows are spread
over all devices of all hosts: each host's chips sample their share of the
rows). Each process then scores and writes its own contiguous share of the
chunk's problems (`distributed.process_shard`), so reward computation (e.g.
running programs) is spread over the hosts. The workdir must be a filesystem
every host sees (the M-step reads all hosts' shards).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from restem_jax import distributed, preemption, progress, sampling, samples, workdir as wd
from restem_jax.tasks import Problem


def choose_kept(rewards: Sequence[float], cap: int, seed: Sequence[int]) -> list[int]:
  """Indices of at most `cap` correct samples, chosen at random with `seed`."""
  correct = [i for i, r in enumerate(rewards) if r > 0]
  if len(correct) <= cap:
    return correct
  rng = np.random.default_rng(list(seed))
  return sorted(rng.choice(correct, size=cap, replace=False).tolist())


def sampling_settings(sampling_cfg: ml_collections.ConfigDict, stop_strings: Sequence[str]
                      ) -> dict:
  """What a sample's provenance records of how it was drawn (enough to draw it again)."""
  mode = sampling.SamplingMode.from_config(sampling_cfg)
  return {**dataclasses.asdict(mode), "num_samples": int(sampling_cfg.num_samples),
          "max_new_tokens": int(sampling_cfg.max_new_tokens),
          "stop_strings": list(stop_strings)}


def generate(*, params: Any, sampler: sampling.Sampler, task: Any,
             problems: Sequence[Problem], sampling_cfg: ml_collections.ConfigDict,
             max_per_problem: int, iteration: int, out_dir: str, seed: int,
             max_fault_fraction: float = 1.0,
             log: Callable[[str], None] = logging.info, model_path: str = "",
             keep_rejected: int = 0) -> dict:
  """Runs the E-step over `problems`, writing shards to `out_dir`; returns counts.

  model_path: the checkpoint of `params`, recorded with each sample. keep_rejected:
  also store the first that many failed samples of each problem (rejected_ files).

  Raises GraderFaultError if more than `max_fault_fraction` of all its samples
  got no verdict from the grader (samples.ProblemStats.num_faults).
  """
  if not problems:
    raise ValueError("the E-step got no training problems; check task.num_train and the data")
  n = sampling_cfg.num_samples
  chunks = sampling.prompt_chunks(len(problems), n, sampling_cfg.max_batch)
  key = jax.random.fold_in(jax.random.key(seed), iteration)
  vocab = task.vocabulary
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  todo = _chunks_to_do(out_dir, chunks)
  provenance = dict(model=model_path, sampling=sampling_settings(sampling_cfg, task.stop_strings),
                    rng_key=[int(x) for x in np.asarray(jax.random.key_data(key)).ravel()])
  me = jax.process_index()
  left = sum(len(chunks[c]) for c in todo)
  # Problems this host scored / solved (>= 1 correct, hence >= 1 kept, sample).
  scored = solved = 0
  faults_so_far = 0
  # Every prompt, finished chunks included: they set the one padded shape, so a
  # resumed E-step samples with the same program as an uninterrupted one.
  outputs = sampler.sample_chunked(
      params, [sampling.encode_prompt(vocab, p.prompt) for p in problems], num_samples=n,
      max_new_tokens=sampling_cfg.max_new_tokens, mode=sampling.SamplingMode.from_config(
          sampling_cfg), rng=key, max_batch=sampling_cfg.max_batch, chunks=todo,
      stop_strings=task.stop_strings)
  bar = progress.Progress(f"generate iter {iteration}", len(problems), "problems",
                          initial=len(problems) - left, log=log, enabled=me == 0)
  for c, (_, out) in zip(todo, outputs):
    idx = chunks[c]
    chunk = [problems[i] for i in idx]
    share = distributed.process_shard(len(chunk))  # this host scores and writes these
    texts = sampling.decode_completions(vocab, out)[share.start:share.stop]
    mine = [(idx[j], chunk[j]) for j in share]
    flat_problems = [p for _, p in mine for _ in range(n)]
    rewards, faults = _score(task, flat_problems, [t for row in texts for t in row])
    kept_rows, stat_rows, rejected_rows = [], [], []
    for j, (i, p) in enumerate(mine):
      r = rewards[j * n:(j + 1) * n]
      keep = choose_kept(r, max_per_problem, (seed, iteration, i))

      def row(k, i=i, p=p, j=j, r=r):
        return samples.KeptSample(problem_id=p.id, prompt=p.prompt, sample=texts[j][k],
                                  reward=float(r[k]), iteration=iteration, seed=seed,
                                  problem_index=int(i), sample_index=int(k), **provenance)
      kept_rows += [row(k) for k in keep]
      rejected_rows += [row(k) for k in [k for k in range(n) if not r[k] > 0][:keep_rejected]]
      stat_rows.append(samples.ProblemStats(
          problem_id=p.id, level=p.level, num_samples=n, num_correct=int(sum(x > 0 for x in r)),
          num_kept=len(keep), num_faults=sum(f is not None for f in faults[j * n:(j + 1) * n])))
    kinds = collections.Counter(f for f in faults if f is not None)
    if kinds:
      logging.warning("generate iter %d chunk %d: %d of %d samples lost to grader faults (%s); "
                      "they score 0", iteration, c, sum(kinds.values()), len(faults),
                      ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    samples.write_chunk(out_dir, c, me, kept_rows, stat_rows,
                        rejected_rows if keep_rejected > 0 else None)
    scored += len(stat_rows)
    solved += sum(s.num_kept > 0 for s in stat_rows)
    bar.update(len(idx), f"solved {solved}/{scored} ({100 * solved / max(scored, 1):.0f}%)")
    faults_so_far += sum(kinds.values())
    if jax.process_count() == 1:  # (Several hosts decide together, at the end.)
      # Already over the limit for the whole E-step: stop now, not after sampling the rest.
      check_faults({"grader_faults": faults_so_far, "samples": n * len(problems)},
                   max_fault_fraction, iteration, out_dir)
    preemption.check(f"E-step chunk {c} written to {out_dir}; finished chunks are kept")
  bar.close()
  distributed.sync(f"generate_{iteration}")
  summary = samples.summarize(out_dir)
  check_faults(summary, max_fault_fraction, iteration, out_dir)
  return summary


class GraderFaultError(RuntimeError):
  """Too many of an E-step's samples lost their reward to grader faults."""


def check_faults(summary: dict, max_fraction: float, iteration: int, out_dir: str) -> None:
  """Stops the run if more than `max_fraction` of the E-step's samples were lost to grader
  faults: training on the survivors would learn from a starved, skewed set."""
  faults, total = summary.get("grader_faults", 0), summary["samples"]
  if total and faults > max_fraction * total:
    raise GraderFaultError(
        f"E-step of iteration {iteration}: {faults} of {total} samples ({faults / total:.1%}) "
        f"got no verdict from the grader (crashed, hung or OOM-killed; the warnings above name "
        f"the kinds), more than restem.max_fault_fraction={max_fraction}; fix the grader "
        f"(memory, task.grader_timeout_s, task.grader_workers / code_workers), delete {out_dir} "
        "and rerun to rescore, or raise restem.max_fault_fraction (with --override)")


def _score(task: Any, problems: list[Problem], texts: list[str]
           ) -> tuple[list[float], list[str | None]]:
  """(rewards, grader faults); a task without score_detailed has no grader to fault."""
  if hasattr(task, "score_detailed"):
    return task.score_detailed(problems, texts)
  return task.score(problems, texts), [None] * len(texts)


def _stats_rows(paths: list[str], chunk: int) -> int:
  """Problems the chunk's stats files cover; -1 if any of its files is truncated or
  garbled (a damaged chunk is redone, never half counted)."""
  try:
    return samples.check_files(paths)
  except wd.DamagedError as e:
    logging.warning("%s; redoing chunk %d", str(e).split(";")[0], chunk)
    return -1


def _chunks_to_do(out_dir: str, chunks: Sequence[range]) -> list[int]:
  """Chunks whose stats do not yet cover every problem; their partial files are removed.

  Process 0 decides and tells the others, so every host runs the same
  collective sampling calls even if they see the filesystem at different times.
  The directory is listed once (on gs:// every listing is a request).
  """
  todo = np.ones((len(chunks),), np.int32)
  if distributed.is_coordinator():
    # Temporaries of writes a kill cut short (atomic writes rename only finished files):
    # no process writes here yet, so they are all dead.
    for path in wd.glob(out_dir, ".tmp_*"):
      epath.Path(path).unlink()
    files: dict[int, list[str]] = {}  # chunk -> its shard_/stats_ files, any process
    for path in wd.glob(out_dir, "*_p[0-9][0-9][0-9].jsonl"):
      kind, chunk = os.path.basename(path).split("_")[:2]
      if kind in ("shard", "stats", "rejected"):
        files.setdefault(int(chunk), []).append(path)
    for c, idx in enumerate(chunks):
      mine = files.get(c, [])
      if _stats_rows(mine, c) == len(idx):
        todo[c] = 0
      else:
        for path in mine:
          epath.Path(path).unlink()
  todo = distributed.broadcast_from_coordinator(todo)
  distributed.sync("generate_cleanup")
  return [c for c in range(len(chunks)) if todo[c]]
