"""GSM8K (Cobbe et al. 2021) from the official train.jsonl / test.jsonl.

Prompts: Wei et al. (2022) chain-of-thought exemplars, "Q: ... A: ... The answer
is N."; the human solutions are rewritten into that format (calculator
annotations dropped) so they are SFT targets in the same form.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from etils import epath

from restem_jax.rewards.math import gsm8k_gold
from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import OfficialDataset

_CALC = re.compile(r"<<[^>]*>>")


def target(answer_field: str, gold: str) -> tuple[str, int]:
  """The human solution in the 8-shot format, and its number of reasoning lines."""
  reasoning = answer_field.split("####")[0]
  lines = [_CALC.sub("", l).strip() for l in reasoning.strip().split("\n") if l.strip()]
  return " ".join(lines + [f"The answer is {gold}."]), len(lines)


@dataclasses.dataclass(frozen=True)
class Gsm8k(OfficialDataset):

  def record(self, data_dir: str, rid: str, question: str, answer: str, where: str) -> dict:
    """One raw record from an official (question, answer) pair."""
    try:
      gold = gsm8k_gold(answer)
    except ValueError as e:
      raise self.layout_error(data_dir, f"has a bad answer at {where} ({e})")
    text, steps = target(answer, gold)
    return dict(id=rid, question=question.strip(), hint="", target=text, gold=gold,
                level=f"steps={steps}")

  def check_files(self, data_dir: str) -> None:
    missing = [s for s in ("train.jsonl", "test.jsonl")
               if not epath.Path(data_dir, s).is_file()]
    if missing:
      raise self.layout_error(data_dir, f"lacks {', '.join(missing)}")

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    path = os.path.join(data_dir, f"{split}.jsonl")
    out = []
    with epath.Path(path).open() as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          ex = json.loads(line)
          question, answer = ex["question"], ex["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise self.layout_error(data_dir, f"has a bad line {path}:{lineno} ({e!r})")
        out.append(self.record(data_dir, f"gsm8k/{split}/{lineno - 1:05d}", question, answer,
                               f"{path}:{lineno}"))
    return out

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    shots = "".join(f"Q: {e['question']}\nA: {e['answer']}\n\n"
                    for e in prompts.take_exemplars("gsm8k", self.exemplars, few_shot))
    return prompts.PromptFormat(shots, "Q: ", "\nA:")

  def chat_exemplars(self, task_cfg: Any) -> list[tuple[str, str]]:
    return [(self.chat_before + e["question"], e["answer"]) for e in
            prompts.take_exemplars("gsm8k", self.exemplars, int(task_cfg.few_shot))]



SPEC = Gsm8k(
    name="gsm8k",
    reward="math",
    stop_strings=("\n\nQ:", "\nQ:"),
    difficulty="steps=<reasoning lines of the human solution>",
    layout="<data_dir>/train.jsonl and <data_dir>/test.jsonl, one "
           '{"question": ..., "answer": "...#### N"} per line',
    exemplars="gsm8k_cot_8shot.json",
    answer_key=scoring.final_answer_key,
    chat_before="Q: ",
)
