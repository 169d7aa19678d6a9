"""APPS (Hendrycks et al. 2021) from the official per-problem folders.

The prompt follows the APPS paper: question, starter code, the call-based or
standard-input format line, "ANSWER:". A completion's program is the first
fenced code block, else the whole (cut) completion; it runs in the sandbox
against the problem's input_output tests.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

from etils import epath

from restem_jax import workdir as wd
from restem_jax.rewards.code import apps_tests
from restem_jax.tasks import prompts
from restem_jax.tasks.spec import OfficialDataset, Problem

log = logging.getLogger(__name__)

_FENCED = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def hint(starter_code: str, fn_name: str | None) -> str:
  """What follows the question in the APPS paper's prompt (Hendrycks et al. 2021)."""
  fmt = "\nUse Call-Based format" if fn_name else "\nUse Standard Input format"
  return (starter_code or "") + fmt


@dataclasses.dataclass(frozen=True)
class Apps(OfficialDataset):

  def check_files(self, data_dir: str) -> None:
    if not wd.glob(data_dir, "train/" + "[0-9]" * 5 + "/question.txt"):
      raise self.layout_error(data_dir, "has no train/<5-digit id>/question.txt")

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    """task_cfg.apps_difficulty (if set) keeps one difficulty."""
    difficulty = str(task_cfg.get("apps_difficulty", "")) if task_cfg is not None else ""
    out, untestable = [], 0
    for folder in wd.glob(data_dir, f"{split}/" + "[0-9]" * 5):
      pid = os.path.basename(folder)

      def read(name, folder=folder):
        p = epath.Path(folder) / name
        return p.read_text() if p.exists() else None

      question, meta_text = read("question.txt"), read("metadata.json")
      if question is None or meta_text is None:
        raise self.layout_error(data_dir,
                                f"has {folder} without question.txt/metadata.json")
      io_text = read("input_output.json")
      try:
        meta = json.loads(meta_text)
        io = json.loads(io_text) if io_text else None
        solutions = json.loads(read("solutions.json") or "[]")
      except json.JSONDecodeError as e:
        raise self.layout_error(data_dir, f"has bad JSON in {folder} ({e})")
      level = meta.get("difficulty", "")
      if difficulty and level != difficulty:
        continue
      if not io or not io.get("inputs"):
        untestable += 1  # Some official test problems ship no tests: nothing to reward.
        continue
      out.append(dict(id=f"apps/{split}/{pid}", question=question,
                      hint=hint(read("starter_code.py") or "", io.get("fn_name")),
                      target=solutions[0] if solutions else "",
                      gold=json.dumps(apps_tests(json.dumps(io)), sort_keys=True), level=level))
    if untestable:
      log.warning("apps/%s: skipped %d problems without input_output tests", split, untestable)
    return out

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    shots = "".join(
        "\nQUESTION:\n" + e["question"] + hint(e.get("starter_code", ""), e.get("fn_name"))
        + "\nANSWER:\n" + e["solution"] + "\n"
        for e in prompts.take_exemplars(self.name, self.exemplars, few_shot))
    return prompts.PromptFormat(shots, "\nQUESTION:\n", "\nANSWER:\n")

  def completion_to_program(self, problem: Problem, completion: str) -> str:
    """The program the sandbox runs: the first fenced block, else the cut completion."""
    del problem
    text = self.postprocess(completion)
    fenced = _FENCED.search(text)
    return fenced.group(1) if fenced else text



SPEC = Apps(
    name="apps",
    reward="code",
    stop_strings=("\nQUESTION:",),
    difficulty="the official difficulty (introductory, interview, competition)",
    layout="<data_dir>/{train,test}/<5-digit id>/ holding question.txt, "
           "input_output.json, metadata.json, optional solutions.json, starter_code.py",
    exemplars="apps_fewshot.json",
)
