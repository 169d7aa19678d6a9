"""Few-shot prompt formats. Exemplars live in data files next to this module.

A prompt is `prefix + before + question + hint + after`: the exemplar block and
the fixed strings are per-task constants, so the seqio preprocessor can build it
with one `tf.strings.join`, and Python (tests, scripts) builds the same string
with `PromptFormat.render`. Each dataset's spec (tasks/datasets/) says how its
exemplars and cues are written.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  prefix: str  # The exemplar block (empty for zero-shot).
  before: str  # Right before the question.
  after: str  # After the question (and hint): the model continues from here.

  def render(self, question: str, hint: str = "") -> str:
    return self.prefix + self.before + question + hint + self.after


@functools.lru_cache(maxsize=None)
def load_exemplars(filename: str) -> tuple[dict, ...]:
  """The exemplars shipped in `DATA_DIR/filename` (a JSON list of dicts)."""
  with open(os.path.join(DATA_DIR, filename)) as f:
    return tuple(json.load(f))


def take_exemplars(dataset: str, filename: str, few_shot: int) -> tuple[dict, ...]:
  """The first `few_shot` exemplars of the file; ValueError past what it ships."""
  exemplars = load_exemplars(filename)
  if not 0 <= few_shot <= len(exemplars):
    raise ValueError(f"few_shot={few_shot} for {dataset}: between 0 and "
                     f"{len(exemplars)} exemplars are shipped ({filename})")
  return exemplars[:few_shot]


def truncate(stop_strings: Sequence[str], completion: str) -> str:
  """The completion up to the first stop string (where the next exemplar starts)."""
  cut = len(completion)
  for stop in stop_strings:
    i = completion.find(stop)
    if i != -1:
      cut = min(cut, i)
  return completion[:cut]
