"""Every check of a config before any model loads: its values, then its data and files.

configlib checks values and fields against each other and reads nothing. This
module adds what needs more: task.name against the dataset registry, each dataset
spec's layout check of task.data_dir (`check_layout` / `check_files`), the
reasoning-gym mix, chat templates stored with the tokenizer, and the paths the
config names (base.path, teacher_path, task.vocab_path, eval.transfer_tasks'
data). It sits above tasks/ and workdir and below run/main; `main` calls `check`
first, so a bad config is one `error:` line per problem, exit 2, in about a second
(tasks/ import no JAX, SeqIO or TensorFlow until a task is built).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from restem_jax import configlib, errors, tasks
from restem_jax import workdir as wd
from restem_jax.tasks import chat
from restem_jax.tasks.datasets import jsonl, reasoning_gym


JSONL_ONLY = ("files", "prompt_template", "exemplars_file", "stop_strings", "reward",
              "reward_fn", "reward_threshold")


def _plain(v: Any) -> Any:
  return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else (
      tuple(v) if isinstance(v, list) else v)


def _jsonl_problems(task_cfg: Any, field: str = "task") -> list[str]:
  """The jsonl task's own fields (values and the reward's name; files: `_data_problems`)."""
  if task_cfg.name != "jsonl":
    default = configlib.default_config().task
    return [f"{field}.{k}={_plain(task_cfg[k])!r} applies to task.name='jsonl' only; remove it"
            for k in JSONL_ONLY if k in task_cfg and _plain(task_cfg[k]) != _plain(default[k])]
  p = jsonl.reward_problem(task_cfg)
  return [p.replace("task.", field + ".") if field != "task" else p] if p else []


def _data_problems(task_cfg: Any, field: str = "task") -> list[str]:
  """The dataset's own checks of a task config before a model loads (built-in datasets:
  paths only; jsonl: reads its files and imports its reward)."""
  try:
    tasks.check_data(task_cfg)
  except jsonl.JsonlTaskError as e:  # Names its fields itself.
    return [str(e).replace("task.", field + ".") if field != "task" else str(e)]
  except tasks.DataLayoutError as e:
    return [f"{field}.data_dir: {e}"]
  if task_cfg.name == "reasoning_gym":
    try:
      reasoning_gym.parse_mix(task_cfg.rg_datasets, field=f"{field}.rg_datasets")
    except reasoning_gym.ReasoningGymError as e:
      return [str(e)]
  return []


def _transfer_problems(c: ml_collections.ConfigDict) -> list[str]:
  """eval.transfer_tasks: dicts of config.task fields (+ "label"), each a valid task."""
  out = []
  labels = [configlib.transfer_label(t) for t in c.eval.transfer_tasks if isinstance(t, dict)]
  if len(set(labels)) != len(labels):
    out.append(f"eval.transfer_tasks: labels {labels} repeat; give each a distinct 'label'")
  for i, overrides in enumerate(c.eval.transfer_tasks):
    field = f"eval.transfer_tasks[{i}]"
    if not isinstance(overrides, dict):
      out.append(f"{field}={overrides!r}: give a dict of config.task fields (and 'label')")
      continue
    unknown = sorted(set(overrides) - set(c.task) - {"label"})
    if unknown:
      out.append(f"{field} sets {unknown}, which are not task fields; use keys of config.task "
                 "(and 'label')")
      continue
    task_cfg = configlib.transfer_task_cfg(c.task, overrides)
    if task_cfg.name not in tasks.dataset_names():
      out.append(configlib.choice_problem(f"{field}.name", task_cfg.name, tasks.dataset_names()))
    else:
      out += _data_problems(task_cfg, field)
  return out


def _vocab_source(c: ml_collections.ConfigDict) -> str:
  """Where the run's tokenizer comes from (as run.load_vocabulary picks it): "" = the
  embedded SentencePiece model, "?" = a model package, located (and checked) by the
  import itself (the importers import JAX); the run then checks its template."""
  if c.task.vocab_path:
    return c.task.vocab_path
  if c.base.source != "import" or not c.base.path:
    return ""
  return "?" if c.base.path.startswith("package:") else c.base.path


def _prompt_format_problems(c: ml_collections.ConfigDict) -> list[str]:
  """task.prompt_format='chat' (the run's or a transfer task's): a dataset with a chat
  format, and a tokenizer with a stored template."""
  out, chats = [], []
  fields = [("task", c.task.name, c.task.prompt_format)] + [
      (f"eval.transfer_tasks[{i}]", t.get("name", c.task.name),
       t.get("prompt_format", c.task.prompt_format))
      for i, t in enumerate(c.eval.transfer_tasks) if isinstance(t, dict)]
  for field, name, fmt in fields:
    if field != "task" and fmt not in configlib.CHOICES["task.prompt_format"]:
      out.append(configlib.choice_problem("task.prompt_format", fmt)
                 .replace("task.", field + ".", 1))
    elif fmt == "chat":
      chats.append(field)
      if name in tasks.dataset_names() and tasks.get_spec(name).chat_before is None:
        out.append(f"{field}.prompt_format='chat': {field}.name={name!r} has no chat format "
                   "(reasoning_gym and gsm8k have); use prompt_format='few_shot'")
  if not chats:
    return out
  source, field = _vocab_source(c), f"{chats[0]}.prompt_format='chat'"
  if not source:
    out.append(f"{field} needs a tokenizer with a stored chat template, but the vocabulary "
               "is the embedded SentencePiece model; set task.vocab_path to an instruct "
               "model's .gguf / tokenizer.json, or use prompt_format='few_shot'")
  elif source != "?" and chat.stored_template(source) is None:
    out.append(f"{field}: {source} stores no chat template (tokenizer.chat_template / "
               "tokenizer_config.json chat_template); use an instruct model's tokenizer "
               "(task.vocab_path) or prompt_format='few_shot'")
  return out


def _missing_path_problem(field: str, path: str, what: str) -> str | None:
  return None if wd.exists(path) else f"{field}={path!r} does not exist; {what}"


def _file_problems(c: ml_collections.ConfigDict) -> list[str | None]:
  out = []
  if c.base.source == "checkpoint" and c.base.path:
    out.append(_missing_path_problem(
        "base.path", c.base.path,
        "import a model there first (python -m restem_jax.importers --out=...) or fix the path"))
  if c.restem.sample_from == "teacher" and c.restem.teacher_path:
    out.append(_missing_path_problem(
        "restem.teacher_path", c.restem.teacher_path,
        "point it at a params checkpoint (e.g. another run's iter_003/model)"))
  if c.task.vocab_path:
    out.append(_missing_path_problem(
        "task.vocab_path", c.task.vocab_path,
        "point it at a SentencePiece .model, a tokenizer.json or a .gguf file"))
  if c.task.name in tasks.dataset_names() and not _jsonl_problems(c.task):
    out += _data_problems(c.task)
  return out + _prompt_format_problems(c) + _transfer_problems(c)


def problems(config: ml_collections.ConfigDict, check_files: bool = True) -> list[str]:
  """Every problem of `config`, one line each naming the field; [] for a config that works.

  configlib.problems' value checks plus task.name against the registry; with
  check_files, also the paths the config names (base.path, teacher_path, task.data_dir's
  layout, task.vocab_path, chat templates, transfer tasks). False for a config meant for
  other machines (a pod config's gs:// paths).
  """
  out = configlib.problems(config, dataset_names=tasks.dataset_names())
  out += _jsonl_problems(config.task)
  if check_files:
    out += [p for p in _file_problems(config) if p]
  return out


def check(config: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """Raises one ConfigError listing every problem of `config` (see `problems`)."""
  errors.raise_if(problems(config, check_files=check_files))
