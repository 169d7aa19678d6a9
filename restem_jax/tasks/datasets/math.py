"""MATH (Hendrycks et al. 2021) from the official per-problem JSON files.

Prompts: Minerva's 4-shot format (Lewkowycz et al. 2022); the human solutions
get Minerva's closing line too, so they are SFT targets in the same form.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from restem_jax import workdir as wd
from restem_jax.rewards.math import math_gold
from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import OfficialDataset


def final_answer(answer: str) -> str:
  """Minerva's closing line; the human MATH solutions get it too (SFT targets)."""
  return f"Final Answer: The final answer is ${answer}$. I hope it is correct."


@dataclasses.dataclass(frozen=True)
class Math(OfficialDataset):

  def check_files(self, data_dir: str) -> None:
    if not wd.glob(data_dir, "train/*/*.json"):
      raise self.layout_error(data_dir, "has no train/<type>/<id>.json files")

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    out = []
    for path in wd.glob(data_dir, f"{split}/*/*.json"):
      try:
        ex = json.loads(epath.Path(path).read_text())
        problem, solution = ex["problem"], ex["solution"]
        gold = math_gold(solution)
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise self.layout_error(data_dir, f"has a bad problem file {path} ({e!r})")
      kind = os.path.basename(os.path.dirname(path))
      stem = os.path.splitext(os.path.basename(path))[0]
      out.append(dict(id=f"math/{split}/{kind}/{stem}", question=problem, hint="",
                      target=solution.rstrip() + "\n" + final_answer(gold), gold=gold,
                      level=str(ex.get("level", ""))))
    return out

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    shots = "".join(f"Problem:\n{e['problem']}\n\nSolution:\n{e['solution']}\n\n"
                    for e in prompts.take_exemplars(self.name, self.exemplars, few_shot))
    return prompts.PromptFormat(shots, "Problem:\n", "\n\nSolution:\n")



SPEC = Math(
    name="math",
    reward="math",
    stop_strings=("\n\nProblem:", "\nProblem:"),
    difficulty="the official level field (\"Level 1\" .. \"Level 5\")",
    layout="<data_dir>/{train,test}/<type>/<id>.json with fields problem, level, "
           "type, solution (Hendrycks MATH)",
    exemplars="math_minerva_4shot.json",
    answer_key=scoring.final_answer_key,
)
