"""reasoning_gym: reasoning-gym's procedural datasets (0.1.25) as one ReST-EM task, offline.

reasoning-gym's generators draw problems from a seed, and each dataset scores an
answer with its own `score_answer(answer, entry)`. No data_dir: every split is
drawn from the generators (task.seed; sizes task.num_train / num_val / num_test,
0 = DEFAULT_SIZES).

The mix: `task.rg_datasets` is a list of (name, weight, config) — e.g.
`(("chain_sum", 1.0, {"min_terms": 2, "max_terms": 3}), ("leg_counting", 0.5, {}))`.
A split of n problems takes round(n * weight / sum of weights) from each source
(largest remainders break ties), interleaved in a seeded order.

Splits are disjoint by construction and checked: exemplars, test, validation and
train are drawn with different seeds (in that order), and a problem whose
question text already occurs in an earlier-drawn split (or earlier in its own) is
redrawn. A generator that cannot produce enough distinct questions within
`MAX_DRAW_FACTOR` x the requested number (+ `MIN_EXTRA_DRAWS`) of draws is an
error naming it.

The answer format (one place): every solution ends with a line `Answer: <answer>`.
A worked solution (gsm_symbolic's `answer_cot`, the only dataset here that has
them) comes before it as `Solution: ...`. The prompt ends with the question line,
so the model writes `Solution: ...` and/or `Answer: ...` itself; `extract_answer`
takes the text after the first `Answer:` up to the end of that line.

Reward: 1.0 iff the source dataset's `score_answer` returns exactly 1.0 (some
datasets give partial credit for a near miss; ReST-EM's reward is binary). The
entry is regenerated from (source, config, seed, index) in the scoring process,
so the gold stored with a problem is a small JSON locator, not a pickled entry.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from typing import Any, Iterable, Sequence

from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import DataLayoutError, DatasetSpec, Problem, SplitBuilder

ANSWER_PREFIX = "Answer:"
SOLUTION_PREFIX = "Solution:"
# Where a completion stops being an answer: the model starting the next exemplar.
STOP_STRINGS = ("\n\nQuestion:", "\nQuestion:")
# Draws allowed before a generator is declared exhausted: 4 per requested problem,
# plus slack for small requests from small question spaces (draws are lazy: free).
MAX_DRAW_FACTOR = 4
MIN_EXTRA_DRAWS = 1000
SPLIT_SALT = {"exemplars": 0, "test": 1, "validation": 2, "train": 3}

_ANSWER_RE = re.compile(r"(?:^|\n)\s*Answer:[ \t]*([^\n]*)")


class ReasoningGymError(DataLayoutError):
  """A reasoning-gym mix that cannot be built; the message names the field or dataset."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One generator of the mix."""
  name: str
  weight: float
  config: tuple[tuple[str, Any], ...]  # Sorted items: hashable, stable in ids and golds.

  @property
  def kwargs(self) -> dict[str, Any]:
    return {k: _thaw(v) for k, v in self.config}


def _freeze(value: Any) -> Any:
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  """JSON-able form of a frozen config value (tuples of pairs stay lists)."""
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


def parse_mix(value: Any, field: str = "task.rg_datasets") -> tuple[Source, ...]:
  """Sources from the config value; every error names `field` and the entry."""
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  from reasoning_gym.factory import DATASETS  # pylint: disable=import-outside-toplevel

  if not value:
    raise ReasoningGymError(f"{field} is empty: give (name, weight, config) entries, e.g. "
                            "(('chain_sum', 1.0, {'max_terms': 3}),)")
  sources = []
  for i, entry in enumerate(value):
    if isinstance(entry, dict):
      entry = (entry.get("name"), entry.get("weight", 1.0), entry.get("config", {}))
    if not isinstance(entry, (tuple, list)) or len(entry) not in (1, 2, 3):
      raise ReasoningGymError(f"{field}[{i}]={entry!r}: use (name, weight, config)")
    name, weight, config = (tuple(entry) + (1.0, {}))[:3]
    if name not in DATASETS:
      raise ReasoningGymError(f"{field}[{i}]: unknown reasoning-gym dataset {name!r}; one of "
                              f"{', '.join(sorted(DATASETS))}")
    if not isinstance(weight, (int, float)) or not weight > 0:
      raise ReasoningGymError(f"{field}[{i}] ({name}): weight {weight!r} must be > 0")
    config = dict(config or {})
    if {"seed", "size"} & set(config):
      raise ReasoningGymError(f"{field}[{i}] ({name}): seed and size are set per split by the "
                              "task (task.seed, task.num_*); remove them from the config")
    try:  # The generator's own config check, now rather than at the first E-step.
      reasoning_gym.create_dataset(name, seed=0, size=1, **config)[0]
    except Exception as e:  # pylint: disable=broad-except
      raise ReasoningGymError(f"{field}[{i}] ({name}): bad config {config}: "
                              f"{type(e).__name__}: {e}") from None
    sources.append(Source(name, float(weight), _freeze(config)))
  names = [s.name for s in sources]
  if len(set(zip(names, (s.config for s in sources)))) != len(sources):
    raise ReasoningGymError(f"{field}: the same (dataset, config) is listed twice")
  return tuple(sources)


def allocate(n: int, weights: Sequence[float]) -> list[int]:
  """n split over weights: floor shares, then the largest remainders (first wins ties)."""
  total = sum(weights)
  exact = [n * w / total for w in weights]
  counts = [int(x) for x in exact]
  order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[:n - sum(counts)]:
    counts[i] += 1
  return counts


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config: tuple, seed: int, size: int):
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  return reasoning_gym.create_dataset(name, seed=seed, size=size, **{k: _thaw(v) for k, v in config})


def split_seed(task_seed: int, split: str, source_index: int) -> int:
  """Seed of one source's draw for one split: different for every (split, source)."""
  return (task_seed * 1_000_003 + SPLIT_SALT[split] * 10_007 + source_index * 101) % (2 ** 31)


def worked_solution(source: str, entry: dict) -> str:
  """The dataset's own worked solution as reasoning text ("" when it has none)."""
  cot = (entry.get("metadata") or {}).get("answer_cot")
  if not cot:
    return ""
  reasoning = cot.split("####")[0].strip()
  return reasoning


def format_solution(reasoning: str, answer: str) -> str:
  """A completion in the prompt's format: optional `Solution:` block, then the answer line."""
  head = f"{SOLUTION_PREFIX} {reasoning}\n" if reasoning else ""
  return f"{head}{ANSWER_PREFIX} {answer}"


def extract_answer(completion: str) -> str | None:
  """The text after the first `Answer:` (to the end of its line), stripped; None if absent."""
  m = _ANSWER_RE.search(completion)
  if m is None:
    return None
  answer = m.group(1).strip()
  return answer or None


def level_of(source: str, entry: dict) -> str:
  """Difficulty bucket: the source plus the per-item values of its difficulty keys."""
  meta = entry.get("metadata") or {}
  difficulty = meta.get("difficulty")
  if not isinstance(difficulty, dict):  # gsm_symbolic: one number for the whole dataset.
    return source
  keys = sorted(k for k in difficulty if isinstance(meta.get(k), (int, float, str)))
  return " ".join([source] + [f"{k}={meta[k]}" for k in keys])


def draw(sources: Sequence[Source], split: str, n: int, task_seed: int,
         taken: set[str]) -> list[dict]:
  """n raw records of `split`, none of whose questions is in `taken` (which grows)."""
  counts = allocate(n, [s.weight for s in sources])
  per_source: list[list[dict]] = []
  for si, (src, count) in enumerate(zip(sources, counts)):
    seed = split_seed(task_seed, split, si)
    size = count * MAX_DRAW_FACTOR + MIN_EXTRA_DRAWS
    ds = _dataset(src.name, src.config, seed, size)
    rows, idx = [], 0
    while len(rows) < count:
      if idx >= size:
        raise ReasoningGymError(
            f"reasoning-gym dataset {src.name} (config {src.kwargs}) gave fewer than {count} "
            f"distinct {split} problems in {size} draws (questions repeat or occur in another "
            "split): lower task.num_* or widen its config")
      entry = ds[idx]
      q = entry["question"]
      if q not in taken:
        taken.add(q)
        locator = {"source": src.name, "config": src.kwargs, "seed": seed, "size": size,
                   "index": idx}
        rows.append({
            "id": f"rg/{src.name}/{split}/{si:02d}{len(rows):05d}",
            "question": q.strip(),
            "hint": "",
            "target": "",  # Filled by the caller for splits that carry human solutions.
            "reasoning": worked_solution(src.name, entry),
            "answer": str(entry["answer"]),
            "gold": json.dumps(locator, sort_keys=True),
            "level": level_of(src.name, entry),
        })
      idx += 1
    per_source.append(rows)
  # Interleave the sources in a seeded order so a capped prefix is still a mix.
  order = [si for si, rows in enumerate(per_source) for _ in rows]
  random.Random(f"restem_rg_order/{task_seed}/{split}").shuffle(order)
  cursors = [0] * len(per_source)
  out = []
  for si in order:
    out.append(per_source[si][cursors[si]])
    cursors[si] += 1
  return out


def build_splits(sources: Sequence[Source], sizes: dict[str, int], task_seed: int,
                 num_exemplars: int) -> dict[str, list[dict]]:
  """{"exemplars", "test", "validation", "train"}: disjoint by question text."""
  taken: set[str] = set()
  out = {}
  for split in ("exemplars", "test", "validation", "train"):
    n = num_exemplars if split == "exemplars" else sizes.get(split, 0)
    out[split] = draw(sources, split, n, task_seed, taken) if n > 0 else []
  return out


def score_answer(gold: str, answer: str) -> float:
  """1.0 iff the source dataset scores `answer` (extracted) exactly 1.0 (runs in a worker)."""
  loc = json.loads(gold)
  ds = _dataset(loc["source"], _freeze(loc["config"]), int(loc["seed"]), int(loc["size"]))
  entry = ds[int(loc["index"])]
  return 1.0 if ds.score_answer(answer, entry) == 1.0 else 0.0


def answer_key(completion: str) -> str | None:
  """Majority voting groups samples by their extracted answer string."""
  return extract_answer(completion)


def exemplar_block(exemplars: Iterable[dict]) -> str:
  """Few-shot block: each exemplar as `Question: ...` then its solution in the answer format."""
  return "".join(f"Question: {e['question']}\n{format_solution(e['reasoning'], e['answer'])}\n\n"
                 for e in exemplars)


QUESTION_BEFORE = "Question: "
QUESTION_AFTER = "\n"  # The model continues with "Solution:" or "Answer:".
DEFAULT_SIZES = {"train": 2000, "validation": 0, "test": 500}
_RECORD_FIELDS = ("id", "question", "hint", "target", "gold", "level")


@functools.lru_cache(maxsize=8)
def _splits_of(mix: tuple[Source, ...], sizes: tuple[tuple[str, int], ...], seed: int,
               few_shot: int) -> dict[str, list[dict]]:
  # Cached: the prompt format (exemplars) and the split builder read the same draw.
  return build_splits(mix, dict(sizes), seed, few_shot)


@functools.lru_cache(maxsize=8)
def _second_test_draw(mix: tuple[Source, ...], sizes: tuple[tuple[str, int], ...], seed: int,
                      few_shot: int, test_seed: int) -> dict[str, list[dict]]:
  run = _splits_of(mix, sizes, seed, few_shot)
  taken = {r["question"] for rows in run.values() for r in rows}
  return {**run, "test": draw(mix, "test", dict(sizes)["test"], test_seed, taken)}


def splits_for(task_cfg: Any) -> dict[str, list[dict]]:
  """task_cfg's draw: {"exemplars", "test", "validation", "train"} raw rows.

  task.rg_test_seed > 0 replaces the test split by a second one drawn with that seed after
  the four, none of whose questions occurs in any of them; the exemplars (the prompt),
  validation and train stay the run's (scripts/second_draw.py evaluates a run on it).
  """
  sizes = {"train": int(task_cfg.num_train) or DEFAULT_SIZES["train"],
           "validation": int(task_cfg.num_val),
           "test": int(task_cfg.num_test) or DEFAULT_SIZES["test"]}
  args = (parse_mix(task_cfg.rg_datasets), tuple(sorted(sizes.items())),
          int(task_cfg.seed), int(task_cfg.few_shot))
  test_seed = int(task_cfg.get("rg_test_seed", 0))
  return _second_test_draw(*args, test_seed) if test_seed else _splits_of(*args)


@dataclasses.dataclass(frozen=True)
class ReasoningGym(DatasetSpec):

  def config_key(self, task_cfg: Any) -> dict:
    key = {"rg_datasets": repr(parse_mix(task_cfg.rg_datasets))}
    if int(task_cfg.get("rg_test_seed", 0)):  # (Run names without it stay what they were.)
      key["rg_test_seed"] = int(task_cfg.rg_test_seed)
    return key

  def split_builder(self, task_cfg: Any, data_dir: str) -> SplitBuilder:
    del data_dir
    draw_ = splits_for(task_cfg)

    def build(split: str) -> list[dict]:
      # Worked solutions (where the dataset has them) are train's human data.
      return [{**{k: r[k] for k in _RECORD_FIELDS},
               "target": (format_solution(r["reasoning"], r["answer"])
                          if r["reasoning"] and split == "train" else "")}
              for r in draw_[split]]
    return build

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    if few_shot:
      raise ValueError("reasoning_gym draws its exemplars from the mix: use prompt_format_for")
    return prompts.PromptFormat("", QUESTION_BEFORE, QUESTION_AFTER)

  def prompt_format_for(self, task_cfg: Any) -> prompts.PromptFormat:
    return prompts.PromptFormat(exemplar_block(splits_for(task_cfg)["exemplars"]),
                                QUESTION_BEFORE, QUESTION_AFTER)

  def chat_exemplars(self, task_cfg: Any) -> list[tuple[str, str]]:
    return [(QUESTION_BEFORE + e["question"], format_solution(e["reasoning"], e["answer"]))
            for e in splits_for(task_cfg)["exemplars"]]

  def score(self, problems: Sequence[Problem], completions: Sequence[str], task_cfg: Any,
            workers: scoring.Workers) -> list[float]:
    def make():
      from restem_jax.rewards.reasoning_gym import ReasoningGymGrader  # pylint: disable=import-outside-toplevel
      return ReasoningGymGrader(score_answer, extract_answer,
                                num_workers=int(task_cfg.get("grader_workers", 2)),
                                timeout_s=float(task_cfg.get("grader_timeout_s", 5.0)))
    grades = workers.get("reasoning_gym", make).score_detailed(
        [p.gold for p in problems], [self.postprocess(c) for c in completions])
    workers.record_faults([g.fault for g in grades])
    return [g.reward for g in grades]


SPEC = ReasoningGym(
    name="reasoning_gym",
    reward="reasoning_gym",  # 1 iff the source dataset's score_answer returns 1.0
    stop_strings=STOP_STRINGS,
    difficulty="<dataset> <its per-item difficulty values>",
    splits=("train", "validation", "test"),
    answer_key=answer_key,
    chat_before=QUESTION_BEFORE,  # The user turn is "Question: ...", as in the few-shot block.
)
