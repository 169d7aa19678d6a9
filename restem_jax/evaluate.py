"""Evaluate a model: greedy pass@1 (test and train), pass@k, maj@k, by difficulty.

`evaluate_with_records` also returns one record per evaluated problem (test,
train subset, each transfer task's test split): its greedy completion, the
answer extracted from it and its reward, and with eval.num_samples the sampled
answers grouped with their rewards and counts. run.py writes them as
eval_problems.jsonl beside eval.json: aggregate numbers hide which problems a
model solved and whether a "gain" is one answer repeated.

Progress (progress.py) counts completions ("samples"): a greedy pass costs one
per problem, the pass@k pass N, and a chunk of max_batch rows costs about the
same in both, so the ETA holds across passes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from restem_jax import distributed, metrics, preemption, progress, sampling
from restem_jax.tasks import Problem


def sampling_budget(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Evaluation's max_new_tokens / max_batch: eval.* where set, else (0) sampling.*."""
  return dict(max_new_tokens=int(config.eval.max_new_tokens or config.sampling.max_new_tokens),
              max_batch=int(config.eval.max_batch or config.sampling.max_batch))


def sample_texts(sampler: sampling.Sampler, params: Any, vocab: Any,
                 problems: Sequence[Problem], *, num_samples: int, mode: sampling.SamplingMode,
                 max_new_tokens: int, max_batch: int, rng: jax.Array,
                 stop_strings: Sequence[str],
                 bar: progress.Progress | None = None) -> list[list[str]]:
  """[P][N] completions, in chunks of <= max_batch rows (memory bound).

  stop_strings: the evaluated task's (not necessarily the sampler's default).
  bar: advanced by the completions of each chunk.
  """
  texts: list[list[str]] = []
  for _, out in sampler.sample_chunked(params, [sampling.encode_prompt(vocab, p.prompt) for p in problems],
                                       num_samples=num_samples, max_new_tokens=max_new_tokens,
                                       mode=mode, rng=rng, max_batch=max_batch,
                                       stop_strings=stop_strings):
    rows = sampling.decode_completions(vocab, out)
    texts += rows
    if bar is not None:
      bar.update(len(rows) * num_samples)
    # An evaluation keeps no partial state: a stop abandons it (the rerun redoes it).
    preemption.check("this evaluation is abandoned and is redone on resume")
  return texts


def _score(task: Any, problems: Sequence[Problem], texts: Sequence[str]) -> list[float]:
  """task.score over (problem, text) pairs, each host scoring its share."""
  def score(pairs):
    return task.score([p for p, _ in pairs], [t for _, t in pairs]) if pairs else []
  return distributed.score_shared(score, list(zip(problems, texts)))


def greedy_answers(sampler: sampling.Sampler, params: Any, task: Any,
                   problems: Sequence[Problem], *, max_new_tokens: int, max_batch: int,
                   bar: progress.Progress | None = None) -> tuple[list[str], list[float]]:
  """One greedy completion per problem, and its reward."""
  texts = [row[0] for row in sample_texts(
      sampler, params, task.vocabulary, problems, num_samples=1, mode=sampling.GREEDY,
      max_new_tokens=max_new_tokens, max_batch=max_batch, rng=jax.random.key(0),
      stop_strings=task.stop_strings, bar=bar)]
  return texts, _score(task, list(problems), texts)


def extracted_answer(task: Any, text: str) -> str | None:
  """The final answer of a completion as the task's answer key reads it (None: none, or
  the task has no answer key)."""
  if task.answer_key is None:
    return None
  return task.answer_key(task.postprocess(text))


# Longest gold answer a record keeps (a code task's gold is a whole JSON job).
_MAX_GOLD_CHARS = 500


def problem_records(task: Any, problems: Sequence[Problem], texts: Sequence[str],
                    rewards: Sequence[float], split: str) -> list[dict]:
  """One record per problem of a greedy pass: what eval_problems.jsonl holds."""
  return [{"split": split, "problem_id": p.id, "level": p.level, "question": p.question,
           "gold": p.gold[:_MAX_GOLD_CHARS], "greedy": t, "answer": extracted_answer(task, t),
           "reward": float(r)} for p, t, r in zip(problems, texts, rewards)]


def grouped_samples(answers: Sequence[str | None], rewards: Sequence[float]) -> list[dict]:
  """One problem's samples as {answer, reward, count}, most frequent first: N answers
  in at most N entries (a handful when the model agrees with itself)."""
  counts: dict[tuple[Any, float], int] = {}
  for a, r in zip(answers, rewards):
    counts[(a, float(r))] = counts.get((a, float(r)), 0) + 1
  order = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0][0]), kv[0][1]))
  return [{"answer": a, "reward": r, "count": c} for (a, r), c in order]


def distinct_answers(task: Any, texts: Sequence[str]) -> int | None:
  """How many different final answers the texts give (None: the task has no answer key).

  A small model can score by repeating one answer; this number says whether it did.
  """
  if task.answer_key is None:
    return None
  return len({task.answer_key(task.postprocess(t)) for t in texts} - {None})


@dataclasses.dataclass(frozen=True)
class TransferTask:
  """A task evaluated on every iteration's model but never trained on (Figs. 2, 3, 9, 10)."""
  label: str  # Column name: eval.json keys are "transfer/<label>/...".
  task: Any  # tasks.Task, with the run's vocabulary.
  problems: list[Problem]  # Its test split.


def transfer_metrics(params: Any, sampler: sampling.Sampler, transfer: Sequence[TransferTask],
                     *, max_new_tokens: int, max_batch: int,
                     bar: progress.Progress | None = None) -> dict:
  """Greedy pass@1 on each transfer task, and how many distinct answers gave it."""
  return _transfer(params, sampler, transfer, max_new_tokens=max_new_tokens,
                   max_batch=max_batch, bar=bar)[0]


def _transfer(params: Any, sampler: sampling.Sampler, transfer: Sequence[TransferTask], *,
              max_new_tokens: int, max_batch: int, bar: progress.Progress | None
              ) -> tuple[dict, list[dict]]:
  """transfer_metrics, and the problem records (split "transfer/<label>")."""
  out: dict[str, Any] = {}
  records: list[dict] = []
  for t in transfer:
    texts, rewards = greedy_answers(sampler, params, t.task, t.problems,
                                    max_new_tokens=max_new_tokens, max_batch=max_batch, bar=bar)
    out[f"transfer/{t.label}/pass@1_greedy"] = float(np.mean(rewards))
    out[f"transfer/{t.label}/num_test"] = len(t.problems)
    distinct = distinct_answers(t.task, texts)
    if distinct is not None:
      out[f"transfer/{t.label}/distinct_answers"] = distinct
    records += problem_records(t.task, t.problems, texts, rewards, f"transfer/{t.label}")
  return out, records


def make_validation_fn(sampler: sampling.Sampler, task: Any, problems: Sequence[Problem], *,
                       max_new_tokens: int, max_batch: int) -> Callable[[Any], float]:
  """Algorithm 1's "reward on D_val": greedy pass@1 on the validation problems."""
  def fn(params: Any) -> float:
    _, rewards = greedy_answers(sampler, params, task, problems,
                                max_new_tokens=max_new_tokens, max_batch=max_batch)
    return float(np.mean(rewards))
  return fn


def train_subset(train_problems: Sequence[Problem], n: int) -> list[Problem]:
  """The training problems ReST-EM learns from (answer-only ones), evenly spaced.

  Problems that carry a human solution were seen by the base model's
  pretraining; measuring them would report memorisation, not Fig. 4's gap.
  """
  pool = [p for p in train_problems if not p.target] or list(train_problems)
  if len(pool) <= n:
    return pool
  return [pool[int(i * len(pool) / n)] for i in range(n)]


def evaluate(*, params: Any, sampler: sampling.Sampler, task: Any,
             test_problems: Sequence[Problem], train_problems: Sequence[Problem],
             eval_cfg: ml_collections.ConfigDict, max_new_tokens: int, max_batch: int,
             seed: int, transfer: Sequence[TransferTask] = (),
             log: Callable[[str], None] = logging.info) -> dict:
  """All metrics of one model (transfer tasks' included), as a JSON-able dict."""
  return evaluate_with_records(
      params=params, sampler=sampler, task=task, test_problems=test_problems,
      train_problems=train_problems, eval_cfg=eval_cfg, max_new_tokens=max_new_tokens,
      max_batch=max_batch, seed=seed, transfer=transfer, log=log)[0]


def evaluate_with_records(*, params: Any, sampler: sampling.Sampler, task: Any,
                          test_problems: Sequence[Problem], train_problems: Sequence[Problem],
                          eval_cfg: ml_collections.ConfigDict, max_new_tokens: int,
                          max_batch: int, seed: int, transfer: Sequence[TransferTask] = (),
                          log: Callable[[str], None] = logging.info
                          ) -> tuple[dict, list[dict]]:
  """evaluate()'s metrics, and one record per evaluated problem (problem_records; with
  eval.num_samples a "sampled" list, grouped_samples). Splits in file order: "test",
  "train" (the train subset), "transfer/<label>"."""
  n = eval_cfg.num_samples
  subset = (train_subset(train_problems, eval_cfg.num_train_eval)
            if eval_cfg.on_train and train_problems else [])
  sampled_transfer = bool(eval_cfg.transfer_sampled) and n > 0
  total = (len(test_problems) * (1 + (n if n > 0 else 0)) + len(subset)
           + sum(len(t.problems) for t in transfer) * (1 + (n if sampled_transfer else 0)))
  budget = dict(max_new_tokens=max_new_tokens, max_batch=max_batch)
  with progress.Progress("eval", total, "samples", log=log,
                         enabled=jax.process_index() == 0) as bar:
    test_texts, greedy_test = greedy_answers(sampler, params, task, test_problems, **budget,
                                             bar=bar)
    result: dict[str, Any] = {
        "num_test": len(test_problems),
        "pass@1_greedy_test": float(np.mean(greedy_test)),
        "pass@1_greedy_test_by_level": metrics.by_bucket([p.level for p in test_problems],
                                                         greedy_test),
    }
    distinct = distinct_answers(task, test_texts)
    if distinct is not None:
      result["distinct_answers_test"] = distinct
    test_records = problem_records(task, test_problems, test_texts, greedy_test, "test")
    train_records: list[dict] = []
    if subset:
      train_texts, greedy_train = greedy_answers(sampler, params, task, subset, **budget,
                                                 bar=bar)
      result["pass@1_greedy_train"] = float(np.mean(greedy_train))
      result["num_train_eval"] = len(subset)
      train_records = problem_records(task, subset, train_texts, greedy_train, "train")
    if n > 0:
      sampled, groups = _sampled_metrics(sampler, params, task, test_problems, eval_cfg, budget,
                                         seed, bar)
      result.update(sampled)
      for rec, g in zip(test_records, groups):
        rec["sampled"] = g
    transfer_result, transfer_records = _transfer(params, sampler, transfer, **budget, bar=bar)
    result.update(transfer_result)
    for t in transfer if sampled_transfer else ():
      # The same sampling (settings and key) as the test split's, on the task's problems.
      sampled, groups = _sampled_metrics(sampler, params, t.task, t.problems, eval_cfg, budget,
                                         seed, bar)
      result.update({f"transfer/{t.label}/{k}": v for k, v in sampled.items()})
      mine = [r for r in transfer_records if r["split"] == f"transfer/{t.label}"]
      for rec, g in zip(mine, groups):
        rec["sampled"] = g
  log("eval: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items() if isinstance(v, float)))
  return result, test_records + train_records + transfer_records


def _sampled_metrics(sampler: sampling.Sampler, params: Any, task: Any,
                     test_problems: Sequence[Problem], eval_cfg: ml_collections.ConfigDict,
                     budget: dict, seed: int, bar: progress.Progress
                     ) -> tuple[dict, list[list[dict]]]:
  """pass@k (unbiased estimator) and maj@k from eval.num_samples samples per test problem,
  and each problem's samples as grouped_samples."""
  n = eval_cfg.num_samples
  result: dict[str, Any] = {}
  texts = sample_texts(sampler, params, task.vocabulary, test_problems, num_samples=n,
                       mode=sampling.SamplingMode.from_config(eval_cfg), **budget,
                       rng=jax.random.fold_in(jax.random.key(seed), 7919),
                       stop_strings=task.stop_strings, bar=bar)
  flat = _score(task, [p for p in test_problems for _ in range(n)],
                [t for row in texts for t in row])
  rewards = np.asarray(flat, np.float64).reshape(len(test_problems), n)
  counts = [int(c) for c in (rewards > 0).sum(1)]
  for k in eval_cfg.pass_k:
    if k <= n:
      result[f"pass@{k}"] = metrics.mean_pass_at_k(counts, n, k)
  result["pass@1_sampled"] = metrics.mean_pass_at_k(counts, n, 1)
  key = task.answer_key
  if key is not None and eval_cfg.majority_k <= n:
    k = eval_cfg.majority_k
    # Vote on the answer part, as the reward grades it (a sampler stop string
    # ends the raw text at a different place than the budget would).
    maj = [metrics.majority_correct([key(task.postprocess(t)) for t in row[:k]], list(r[:k]))
           for row, r in zip(texts, rewards)]
    result[f"maj@{k}"] = float(np.mean(maj))
  groups = [grouped_samples([extracted_answer(task, t) for t in row], list(r))
            for row, r in zip(texts, rewards)]
  return result, groups
