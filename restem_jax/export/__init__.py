"""Export a run's model for other runtimes: an HF directory (transformers, vLLM) or a GGUF
file (llama.cpp), the importers run backwards (hf.py, gguf.py, tokenizer.py).

    python -m restem_jax.export --workdir=W --iteration=best --format=hf --out=DIR

This module stays light (run.py and report.py call `command_for`); the writers import
safetensors / gguf / transformers' tokenizer converter only when used.

The best iteration (`best_iteration`): among iterations 1..N whose model is saved, the one
with the highest validation reward (improve.json best_score: greedy pass@1 on the
validation split, what the M-step early-stops on); ties and runs without a validation
split go by test greedy pass@1 (eval.json), then the earlier iteration.
"""
from __future__ import annotations

import os

from restem_jax import workdir as wd


class ExportError(ValueError):
  """A model or workdir that cannot be exported; the message names the cause in one line."""


FORMATS = ("hf", "gguf")


def _score(value: object) -> float:
  return float(value) if isinstance(value, (int, float)) else float("-inf")


def best_iteration(workdir: str) -> str:
  """The best iteration's name ("002"; module docstring for the rule); ExportError if the
  workdir records none."""
  layout, progress = wd.Layout(workdir), wd.Progress(wd.Layout(workdir).progress, write=False)
  best, best_key = None, None
  for model_dir in wd.glob(workdir, "iter_*/model"):
    name = os.path.basename(os.path.dirname(model_dir))[len("iter_"):]
    if not name.isdigit():
      continue
    m = layout.iteration(int(name))
    if not progress.is_done(m.trained):
      continue  # A model still being written.
    info = wd.read_json(m.improve_json) if wd.exists(m.improve_json) else {}
    ev = wd.read_json(m.eval_json) if wd.exists(m.eval_json) else {}
    key = (_score(info.get("best_score")), _score(ev.get("pass@1_greedy_test")), -int(name))
    if best_key is None or key > best_key:
      best, best_key = m.name, key
  if best is None:
    raise ExportError(f"--workdir={workdir}: no finished iteration (iter_NNN/model listed in "
                      "progress.json); run more of it, or pass --model")
  return best


def command_for(workdir: str, fmt: str = "hf") -> str:
  """The export command of `workdir`'s best iteration ('' when it has none yet)."""
  try:
    name = best_iteration(workdir)
  except (ExportError, wd.WorkdirError):
    return ""
  out = os.path.join(workdir, "export", f"iter_{name}_{fmt}")
  return (f"python -m restem_jax.export --workdir={workdir} --iteration={name} "
          f"--format={fmt} --out={out}")
