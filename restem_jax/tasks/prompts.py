"""Few-shot prompt formats. Exemplars live in data files next to this module.

A prompt is `prefix + before + question + hint + after`: the exemplar block and
the fixed strings are per-task constants, so the seqio preprocessor can build it
with one `tf.strings.join`, and Python (tests, scripts) builds the same string
with `PromptFormat.render`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Exemplar files and how many each ships.
_FILES = {
    "math": "math_minerva_4shot.json",
    "gsm8k": "gsm8k_cot_8shot.json",
    "apps": "apps_fewshot.json",
    "embedded_arith": "embedded_arith_8shot.json",
}


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  prefix: str  # The exemplar block (empty for zero-shot).
  before: str  # Right before the question.
  after: str  # After the question (and hint): the model continues from here.

  def render(self, question: str, hint: str = "") -> str:
    return self.prefix + self.before + question + hint + self.after


@functools.lru_cache(maxsize=None)
def load_exemplars(kind: str) -> tuple[dict, ...]:
  with open(os.path.join(DATA_DIR, _FILES[kind])) as f:
    return tuple(json.load(f))


def _take(kind: str, few_shot: int) -> tuple[dict, ...]:
  exemplars = load_exemplars(kind)
  if not 0 <= few_shot <= len(exemplars):
    raise ValueError(f"few_shot={few_shot} for {kind}: between 0 and "
                     f"{len(exemplars)} exemplars are shipped ({_FILES[kind]})")
  return exemplars[:few_shot]


def math_format(few_shot: int) -> PromptFormat:
  """Minerva (Lewkowycz et al. 2022) 4-shot MATH format."""
  shots = "".join(f"Problem:\n{e['problem']}\n\nSolution:\n{e['solution']}\n\n"
                  for e in _take("math", few_shot))
  return PromptFormat(shots, "Problem:\n", "\n\nSolution:\n")


def math_final_answer(answer: str) -> str:
  """Minerva's closing line; the human MATH solutions get it too (SFT targets)."""
  return f"Final Answer: The final answer is ${answer}$. I hope it is correct."


def gsm8k_format(few_shot: int) -> PromptFormat:
  """Wei et al. (2022) chain-of-thought exemplars, "Q: ... A: ... The answer is N."."""
  shots = "".join(f"Q: {e['question']}\nA: {e['answer']}\n\n"
                  for e in _take("gsm8k", few_shot))
  return PromptFormat(shots, "Q: ", "\nA:")


def apps_hint(starter_code: str, fn_name: str | None) -> str:
  """What follows the question in the APPS paper's prompt (Hendrycks et al. 2021)."""
  fmt = "\nUse Call-Based format" if fn_name else "\nUse Standard Input format"
  return (starter_code or "") + fmt


def apps_format(few_shot: int) -> PromptFormat:
  shots = "".join(
      "\nQUESTION:\n" + e["question"] + apps_hint(e.get("starter_code", ""), e.get("fn_name"))
      + "\nANSWER:\n" + e["solution"] + "\n"
      for e in _take("apps", few_shot))
  return PromptFormat(shots, "\nQUESTION:\n", "\nANSWER:\n")


def humaneval_format() -> PromptFormat:
  """Zero-shot: the HumanEval prompt (signature + docstring) is the whole prompt."""
  return PromptFormat("", "", "")


def embedded_format(few_shot: int) -> PromptFormat:
  shots = "".join(f"Q: {e['question']}\nA: {e['solution']}\n\n"
                  for e in _take("embedded_arith", few_shot))
  return PromptFormat(shots, "Q: ", "\nA:")


def embedded_prompt(question: str, exemplars: list[dict]) -> str:
  """The embedded format with explicit exemplars (used before the data file exists)."""
  shots = "".join(f"Q: {e['question']}\nA: {e['solution']}\n\n" for e in exemplars)
  return PromptFormat(shots, "Q: ", "\nA:").render(question)


# Where a completion stops being an answer: the model starting the next exemplar.
STOP_STRINGS = {
    "math": ("\n\nProblem:", "\nProblem:"),
    "gsm8k": ("\n\nQ:", "\nQ:"),
    "apps": ("\nQUESTION:",),
    # Codex stop sequences: a new top-level statement ends the function body.
    "humaneval": ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "),
    "embedded_arith": ("\n",),
    "reasoning_gym": ("\n\nQuestion:", "\nQuestion:"),
}


def truncate(kind: str, completion: str) -> str:
  cut = len(completion)
  for stop in STOP_STRINGS[kind]:
    i = completion.find(stop)
    if i != -1:
      cut = min(cut, i)
  return completion[:cut]
