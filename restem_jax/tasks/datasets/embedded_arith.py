"""embedded_arith: the offline arithmetic word problems of tasks/embedded.py (the default).

No data_dir: the splits are drawn from the generator by seed. Train and test
come from the generator's disjoint sides; the first num_human train problems
carry their worked solution (the stand-in for human data), validation follows
them, the rest of train is answer-only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from restem_jax.tasks import embedded
from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import DatasetSpec, Problem, SplitBuilder

# Sizes when num_train / num_test are 0 ("all"), and the default num_human.
DEFAULT_TRAIN = 4000
DEFAULT_TEST = 500
DEFAULT_HUMAN = 400


def arith_config(task_cfg: Any) -> embedded.ArithConfig:
  """The generator's difficulty knobs from task_cfg (missing fields: defaults)."""
  defaults = embedded.ArithConfig()
  return embedded.ArithConfig(**{
      f.name: type(getattr(defaults, f.name))(task_cfg.get(f.name, getattr(defaults, f.name)))
      for f in dataclasses.fields(embedded.ArithConfig)})


def read(seed: int, split: str, n: int, cfg: embedded.ArithConfig,
         with_solutions: int) -> list[dict]:
  """The first n problems; the first `with_solutions` carry the worked solution."""
  return [dict(id=f"embedded_arith/{split}/{i:05d}", question=p.question, hint="",
               target=p.solution if i < with_solutions else "", gold=str(p.answer),
               level=p.level)
          for i, p in enumerate(embedded.generate(seed, split, n, cfg))]


def format_with(exemplars: Sequence[dict]) -> prompts.PromptFormat:
  """GSM8K's "Q: ... A: ..." format over these exemplars."""
  shots = "".join(f"Q: {e['question']}\nA: {e['solution']}\n\n" for e in exemplars)
  return prompts.PromptFormat(shots, "Q: ", "\nA:")


@dataclasses.dataclass(frozen=True)
class EmbeddedArith(DatasetSpec):

  def config_key(self, task_cfg: Any) -> dict:
    return dict(dataclasses.asdict(arith_config(task_cfg)),
                num_human=int(task_cfg.get("num_human", -1)))

  def split_builder(self, task_cfg: Any, data_dir: str) -> SplitBuilder:
    del data_dir
    arith = arith_config(task_cfg)
    num_train = int(task_cfg.num_train) or DEFAULT_TRAIN
    num_test = int(task_cfg.num_test) or DEFAULT_TEST
    num_val = int(task_cfg.num_val)
    num_human = min(int(task_cfg.get("num_human", DEFAULT_HUMAN)), num_train)
    seed = int(task_cfg.seed)

    def build(split: str) -> list[dict]:
      if split == "test":
        # Test problems keep their worked solutions (never trained on; handy for
        # held-out loss). Train beyond the human prefix is answer-only.
        return read(seed, "test", num_test, arith, num_test)
      # Validation comes right after the human prefix, so growing num_train only
      # appends problems: train sets of a data-size ablation are nested.
      pool = read(seed, "train", num_train + num_val, arith, num_human)
      if split == "validation":
        return pool[num_human:num_human + num_val]
      return pool[:num_human] + pool[num_human + num_val:]
    return build

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    return format_with(prompts.take_exemplars(self.name, self.exemplars, few_shot))

  def score(self, problems: Sequence[Problem], completions: Sequence[str], task_cfg: Any,
            workers: scoring.Workers) -> list[float]:
    del workers
    verify = bool(task_cfg.get("verify_steps", False))
    return [embedded.exact_int_reward(p.gold, self.postprocess(c), verify_steps=verify)
            for p, c in zip(problems, completions)]


SPEC = EmbeddedArith(
    name="embedded_arith",
    reward="exact_int",
    stop_strings=("\n",),
    difficulty="steps=<number of events>",
    exemplars="embedded_arith_8shot.json",
    answer_key=scoring.final_answer_key,
)
