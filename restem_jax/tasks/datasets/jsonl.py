"""jsonl: a user's task from JSONL files, rewarded by a built-in or a user function.

Files: task.data_dir holding train.jsonl, test.jsonl and optionally validation.jsonl
(else validation is carved from train, task.num_val), or task.files.{train,validation,
test}. One JSON object per line: `question` (required), `answer` (required by the
exact / math / reasoning_gym rewards), `solution` (a worked solution: train rows with
one are the human data of the SFT baseline and of base pretraining, and exemplars show
it), `level`, `id`, `tests` (the code reward's job: {"kind": "stdio" | "call_based" |
"humaneval", ...} as rewards/code.py reads it) and any other field; the whole row
reaches the reward.

Prompt: task.prompt_template, a str.format template over the row's fields (default
"Question: {question}\\nAnswer:"); the model continues with the solution (or the
answer) after one space. task.few_shot exemplars come from task.exemplars_file (rows
of the same shape) or are drawn from train by task.seed (rows with a solution first)
and then left out of train. Stop strings: task.stop_strings, else the template's
opening text on a new line ("\\nQuestion:"). task.prompt_format = "chat" puts the
rendered template in the user turn.

Reward: task.reward = exact | math | code | reasoning_gym:<dataset>, or task.reward_fn
= "package.module:function" / "/path/file.py:function", fn(completion, row) -> float
(rewards/rows.py). Everything here is checked by `check_layout` before a model loads:
one line per problem naming the field, file and line.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import string
from typing import Any, Optional, Sequence

from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import (DataLayoutError, DatasetSpec, Problem, SplitBuilder, cap,
                                   select)

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
REWARDS = ("exact", "math", "code", "reasoning_gym:<dataset>")
CODE_KINDS = ("stdio", "call_based", "humaneval")
_MARK = "\x00restem-question\x00"


class JsonlTaskError(DataLayoutError):
  """A jsonl task that cannot work; the message names the field, file and line."""


def template_of(task_cfg: Any) -> str:
  return str(task_cfg.get("prompt_template", "") or DEFAULT_TEMPLATE)


def reward_of(task_cfg: Any) -> tuple[str, str]:
  """(kind, target): ("fn", import path), ("reasoning_gym", dataset), or (builtin, "")."""
  if task_cfg.get("reward_fn", ""):
    return "fn", str(task_cfg.reward_fn)
  reward = str(task_cfg.get("reward", "") or "exact")
  if reward.startswith("reasoning_gym:"):
    return "reasoning_gym", reward.split(":", 1)[1]
  return reward, ""


def reward_problem(task_cfg: Any) -> Optional[str]:
  """The reward fields' own values (no imports): a problem line, or None."""
  reward, fn = str(task_cfg.get("reward", "")), str(task_cfg.get("reward_fn", ""))
  threshold = task_cfg.get("reward_threshold", 0.0)
  if reward and fn:
    return (f"task.reward={reward!r} and task.reward_fn={fn!r} are both set; set one "
            "(a built-in reward or your function)")
  if reward and reward not in REWARDS[:3] and not (
      reward.startswith("reasoning_gym:") and len(reward) > len("reasoning_gym:")):
    return f"task.reward={reward!r}: use one of {', '.join(REWARDS)}, or set task.reward_fn"
  if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
    return (f"task.reward_threshold={threshold!r}: must be in (0, 1] (where reward 1 starts), "
            "or 0 for rewards that return only 1.0 / 0.0")
  if threshold and not fn:
    return (f"task.reward_threshold={threshold!r} applies to task.reward_fn only (the "
            "built-in rewards are binary)")
  return None


def required_fields(task_cfg: Any) -> tuple[str, ...]:
  kind, _ = reward_of(task_cfg)
  if kind == "code":
    return ("question", "tests")
  return ("question",) if kind == "fn" else ("question", "answer")


def template_fields(template: str) -> list[str]:
  """The row fields a template names; JsonlTaskError for one str.format cannot use."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise JsonlTaskError(f"task.prompt_template={template!r}: {e}; write fields as "
                         "{name} and literal braces as {{ }}") from None
  names = []
  for _, name, _, _ in parsed:
    if name is None:
      continue
    base = name.split(".")[0].split("[")[0]
    if not base or base.isdigit():
      raise JsonlTaskError(f"task.prompt_template={template!r}: name the row's fields "
                           "({question}), not positions ({} or {0})")
    names.append(base)
  return names


def _read(path: str, field: str) -> tuple[tuple[int, dict], ...]:
  if not os.path.isfile(path):
    raise JsonlTaskError(f"{field}: file {path} does not exist")
  st = os.stat(path)
  return _read_cached(path, st.st_mtime_ns, st.st_size, field)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int, field: str) -> tuple[tuple[int, dict], ...]:
  """(line number, row) per non-blank line (cached per file version)."""
  del mtime_ns, size  # Cache keys only.
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise JsonlTaskError(f"{field}: {path}:{lineno}: bad JSON ({e.msg} at column "
                             f"{e.colno}); write one JSON object per line") from None
      if not isinstance(row, dict):
        raise JsonlTaskError(f"{field}: {path}:{lineno}: a JSON {type(row).__name__}, not an "
                             "object; write one {\"question\": ..., ...} per line")
      out.append((lineno, row))
  return tuple(out)


def files_of(task_cfg: Any, data_dir: str) -> dict[str, tuple[str, str]]:
  """split -> (path, the config field that names it); validation only if there is one."""
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  files = task_cfg.get("files", None) or {}
  out = {}
  for split in ("train", "validation", "test"):
    path = str(files.get(split, "") or "")
    if path:
      out[split] = (wd.absolute(path), f"task.files.{split}")
    elif data_dir and (split != "validation"
                       or os.path.isfile(os.path.join(data_dir, "validation.jsonl"))):
      out[split] = (os.path.join(data_dir, f"{split}.jsonl"), "task.data_dir")
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a row becomes a prompt: `before` + question + hint (see `parts`)."""
  template: str
  before: str  # The template's text before {question}, when nothing there depends on the row.
  split_at_question: bool

  @classmethod
  def of(cls, template: str) -> "Layout":
    template_fields(template)  # A template str.format cannot use: one line.
    parsed = list(string.Formatter().parse(template))
    first = next((p for p in parsed if p[1] is not None), None)
    names = [p[1] for p in parsed if p[1] is not None]
    ok = (first is not None and first[1] == "question" and not first[2] and not first[3]
          and names.count("question") == 1)
    return cls(template, first[0] if ok else "", ok)

  def render(self, row: dict) -> str:
    return self.template.format(**row)

  def parts(self, row: dict) -> tuple[str, str]:
    """(question, hint): the raw question and the rest of the rendering where the template
    starts with fixed text and {question}; else the whole rendering and ""."""
    if not self.split_at_question:
      return self.render(row), ""
    tail = self.template.format(**{**row, "question": _MARK}).split(_MARK, 1)[1]
    return str(row["question"]), tail


def _sep(prompt: str) -> str:
  return "" if not prompt or prompt[-1].isspace() else " "


def target_of(layout: Layout, row: dict, answer_too: bool) -> str:
  """What the model writes after the prompt: the solution, else (answer_too) the answer."""
  text = row.get("solution") or (row.get("answer") if answer_too else None)
  if text is None or text == "":
    return ""
  return _sep(layout.render(row)) + str(text)


def _check_rows(rows: Sequence[tuple[int, dict]], path: str, field: str,
                task_cfg: Any, layout: Layout) -> None:
  need = required_fields(task_cfg)
  used = template_fields(layout.template)
  kind, _ = reward_of(task_cfg)
  for lineno, row in rows:
    where = f"{field}: {path}:{lineno}"
    for name in need:
      if name not in row or row[name] is None or row[name] == "":
        why = {"tests": "the code reward runs them", "answer": f"task.reward={kind!r} "
               "compares with it"}.get(name, "every row needs one")
        raise JsonlTaskError(f"{where}: no {name!r} field ({why})")
    if not isinstance(row["question"], str):
      raise JsonlTaskError(f"{where}: 'question' must be a string, got "
                           f"{type(row['question']).__name__}")
    for name in used:
      if name not in row:
        raise JsonlTaskError(f"{where}: task.prompt_template names {{{name}}}, which this "
                             f"row lacks (it has {', '.join(sorted(row))})")
    try:
      layout.render(row)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
      raise JsonlTaskError(f"{where}: task.prompt_template cannot render this row "
                           f"({type(e).__name__}: {e})") from None
    if kind == "code":
      tests = row["tests"]
      if not isinstance(tests, dict) or tests.get("kind") not in CODE_KINDS:
        raise JsonlTaskError(f"{where}: 'tests' must be an object with \"kind\" one of "
                             f"{', '.join(CODE_KINDS)} (rewards/code.py's job fields)")


def check(task_cfg: Any, data_dir: str) -> None:
  """Every file-level problem of a jsonl task (reads the files, imports the reward)."""
  kind, target = reward_of(task_cfg)
  if kind == "fn":
    from restem_jax.rewards import rows as row_rewards  # pylint: disable=import-outside-toplevel
    try:
      row_rewards.load_reward_fn(target)
    except row_rewards.RewardImportError as e:
      raise JsonlTaskError(f"task.reward_fn={target!r}: {e}") from None
  elif kind == "reasoning_gym":
    from reasoning_gym.factory import DATASETS  # pylint: disable=import-outside-toplevel
    if target not in DATASETS:
      raise JsonlTaskError(f"task.reward='reasoning_gym:{target}': no reasoning-gym dataset "
                           f"{target!r}; e.g. {', '.join(sorted(DATASETS)[:5])}, ...")
  layout = Layout.of(template_of(task_cfg))
  template_fields(layout.template)
  files = files_of(task_cfg, data_dir)
  for split in ("train", "test"):
    if split not in files:
      raise JsonlTaskError(f"task.name='jsonl' needs a {split} file: set task.data_dir to a "
                           f"directory holding {split}.jsonl, or task.files.{split}")
  for split, (path, field) in files.items():
    rows = _read(path, field)
    if not rows:
      raise JsonlTaskError(f"{field}: {path} has no rows; write one JSON object per line")
    _check_rows(rows, path, field, task_cfg, layout)
    ids = [str(r["id"]) for _, r in rows if "id" in r]
    if len(set(ids)) != len(ids):
      dup = next(i for i in ids if ids.count(i) > 1)
      raise JsonlTaskError(f"{field}: {path}: id {dup!r} occurs more than once")
  few_shot = int(task_cfg.get("few_shot", 0))
  shots_file = str(task_cfg.get("exemplars_file", "") or "")
  if shots_file:
    from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
    path = wd.absolute(shots_file)
    rows = _read(path, "task.exemplars_file")
    _check_rows(rows, path, "task.exemplars_file", task_cfg, layout)
    if few_shot > len(rows):
      raise JsonlTaskError(f"task.few_shot={few_shot}: task.exemplars_file {path} has only "
                           f"{len(rows)} rows")
  elif few_shot >= len(_read(*files["train"])):
    raise JsonlTaskError(f"task.few_shot={few_shot}: draws exemplars from train, which has "
                         f"only {len(_read(*files['train']))} rows; lower it or set "
                         "task.exemplars_file")


def _records(split: str, rows: Sequence[tuple[int, dict]], layout: Layout,
             with_targets: bool) -> list[dict]:
  out = []
  for i, (_, row) in enumerate(rows):
    question, hint = layout.parts(row)
    out.append(dict(id=str(row["id"]) if "id" in row else f"jsonl/{split}/{i:05d}",
                    question=question, hint=hint,
                    target=target_of(layout, row, answer_too=False) if with_targets else "",
                    gold=json.dumps(row, ensure_ascii=False), level=str(row.get("level", ""))))
  return out


def exemplars_and_train(task_cfg: Any, data_dir: str) -> tuple[list[dict], list[tuple[int, dict]]]:
  """(exemplar rows, train rows left): exemplars from task.exemplars_file, or drawn from
  train by seed (rows with a solution first) and left out of train."""
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  files = files_of(task_cfg, data_dir)
  train = list(_read(*files["train"]))
  few_shot = int(task_cfg.get("few_shot", 0))
  shots_file = str(task_cfg.get("exemplars_file", "") or "")
  if shots_file:
    return [r for _, r in _read(wd.absolute(shots_file), "task.exemplars_file")[:few_shot]], train
  if not few_shot:
    return [], train
  solved = [i for i, (_, r) in enumerate(train) if r.get("solution")]
  pool = solved if len(solved) >= few_shot else list(range(len(train)))
  picked = sorted(random.Random(f"restem_jsonl_shots/{int(task_cfg.seed)}").sample(pool, few_shot))
  return [train[i][1] for i in picked], [r for i, r in enumerate(train) if i not in set(picked)]


@dataclasses.dataclass(frozen=True)
class Jsonl(DatasetSpec):
  """The spec of one config (`for_config`): its template, stops and chat cue."""

  template: str = DEFAULT_TEMPLATE

  def for_config(self, task_cfg: Any) -> "Jsonl":
    layout = Layout.of(template_of(task_cfg))
    stops = task_cfg.get("stop_strings", ()) or ()
    stops = (stops,) if isinstance(stops, str) else tuple(stops)
    if not stops:
      lead = next(iter(string.Formatter().parse(layout.template)), ("",))[0].strip()
      stops = ("\n\n" + lead, "\n" + lead) if lead else ("\n\n",)
    return dataclasses.replace(self, template=layout.template, stop_strings=stops,
                               chat_before=layout.before)

  def check_layout(self, data_dir: str, task_cfg: Any = None) -> None:
    if task_cfg is not None:
      check(task_cfg, data_dir)

  def config_key(self, task_cfg: Any) -> dict:
    files = files_of(task_cfg, _data_dir(task_cfg))
    versions = {s: (p, os.stat(p).st_mtime_ns if os.path.isfile(p) else 0)
                for s, (p, _) in files.items()}
    return {"files": versions, "template": template_of(task_cfg),
            "exemplars_file": str(task_cfg.get("exemplars_file", ""))}

  def split_builder(self, task_cfg: Any, data_dir: str) -> SplitBuilder:
    layout = Layout.of(self.template)
    files = files_of(task_cfg, data_dir)
    seed = int(task_cfg.seed)

    def build(split: str) -> list[dict]:
      if split == "test":
        return cap(_records("test", _read(*files["test"]), layout, True),
                   int(task_cfg.num_test), seed)
      _, train_rows = exemplars_and_train(task_cfg, data_dir)
      train = _records("train", train_rows, layout, True)
      if "validation" in files:
        if split == "validation":
          return _records("validation", _read(*files["validation"]), layout, False)
        return select(train, 0, int(task_cfg.num_train), seed)[0]
      tr, val = select(train, int(task_cfg.num_val), int(task_cfg.num_train), seed)
      if split == "validation":
        return [dict(r, target="") for r in val]
      return tr
    return build

  def _exemplars(self, task_cfg: Any) -> list[dict]:
    return exemplars_and_train(task_cfg, _data_dir(task_cfg))[0]

  def prompt_format(self, few_shot: int) -> prompts.PromptFormat:
    if few_shot:
      raise ValueError("jsonl exemplars come from the task config: use prompt_format_for")
    return prompts.PromptFormat("", Layout.of(self.template).before, "")

  def prompt_format_for(self, task_cfg: Any) -> prompts.PromptFormat:
    layout = Layout.of(self.template)
    shots = "".join(layout.render(r) + target_of(layout, r, answer_too=True) + "\n\n"
                    for r in self._exemplars(task_cfg))
    return prompts.PromptFormat(shots, layout.before, "")

  def chat_exemplars(self, task_cfg: Any) -> list[tuple[str, str]]:
    layout = Layout.of(self.template)
    return [(layout.before + "".join(layout.parts(r)),
             target_of(layout, r, answer_too=True).strip()) for r in self._exemplars(task_cfg)]

  def score(self, problems: Sequence[Problem], completions: Sequence[str], task_cfg: Any,
            workers: scoring.Workers) -> list[float]:
    from restem_jax.rewards import rows as row_rewards  # pylint: disable=import-outside-toplevel
    rows = [json.loads(p.gold) for p in problems]
    texts = [self.postprocess(c) for c in completions]
    kind, target = reward_of(task_cfg)
    if kind == "exact":
      return [row_rewards.exact_reward(t, r["answer"]) for t, r in zip(texts, rows)]
    if kind == "math":
      from restem_jax.rewards import math as math_reward  # pylint: disable=import-outside-toplevel
      answers = [math_reward.extract_answer_strict(t) or row_rewards.final_answer(t) or None
                 for t in texts]
      grades = workers.math_grader().score_answers([str(r["answer"]) for r in rows], answers)
    elif kind == "code":
      jobs = [dict(r["tests"], program=scoring.program_of(t)) for t, r in zip(texts, rows)]
      grades = workers.code_executor().score_detailed(jobs)
    else:
      grades = workers.get("rows", lambda: row_rewards.RowGrader(
          kind, target, float(task_cfg.get("reward_threshold", 0.0)),
          num_workers=int(task_cfg.get("grader_workers", 2)),
          timeout_s=float(task_cfg.get("grader_timeout_s", 5.0)))).score_detailed(texts, rows)
    workers.record_faults([g.fault for g in grades])
    return [g.reward for g in grades]


def answer_key(completion: str) -> Optional[str]:
  """Majority voting groups samples by their normalised final answer."""
  from restem_jax.rewards import rows as row_rewards  # pylint: disable=import-outside-toplevel
  ans = row_rewards.normalize(row_rewards.final_answer(completion))
  return ans or None


SPEC = Jsonl(
    name="jsonl",
    reward="row",  # task.reward / task.reward_fn of the config (rewards/rows.py)
    stop_strings=("\n\nQuestion:", "\nQuestion:"),  # for_config derives them per template
    difficulty="the rows' level field",
    splits=("train", "validation", "test"),
    answer_key=answer_key,
    chat_before="Question: ",
)


def _data_dir(task_cfg: Any) -> str:
  """task.data_dir made absolute, as tasks.task reads it ("" if unset)."""
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  return wd.absolute(task_cfg.data_dir) if task_cfg.data_dir else ""
