"""Task: a dataset spec composed with seqio registration, a vocabulary and robust scoring."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional, Sequence

from restem_jax import encoding
from restem_jax import workdir as wd
from restem_jax.tasks import datasets
from restem_jax.tasks import prompts
from restem_jax.tasks import scoring
from restem_jax.tasks.spec import DataLayoutError, Problem

log = logging.getLogger(__name__)

EMBEDDED_VOCAB = os.path.join(prompts.DATA_DIR, "embedded_arith.model")


@functools.lru_cache(maxsize=None)
def embedded_vocabulary():
  """The SentencePiece model shipped for embedded_arith (pad=0, eos=1, unk=2)."""
  import seqio  # pylint: disable=import-outside-toplevel
  return seqio.SentencePieceVocabulary(EMBEDDED_VOCAB)


def data_dir_of(task_cfg: Any) -> str:
  return wd.absolute(task_cfg.data_dir) if task_cfg.data_dir else ""


def check_data(task_cfg: Any) -> None:
  """The cheap part of building a Task: a known task.name and the data_dir's layout
  (paths only). Raises DataLayoutError with one line naming what is expected."""
  datasets.get_spec(task_cfg.name).for_config(task_cfg).check_layout(data_dir_of(task_cfg),
                                                                     task_cfg)


class Task:
  """One dataset (its spec) with its splits, prompt format, vocabulary and reward."""

  def __init__(self, task_cfg, vocabulary=None):
    self.spec = datasets.get_spec(task_cfg.name).for_config(task_cfg)
    self.dataset: str = self.spec.name
    self.data_dir: str = data_dir_of(task_cfg)
    self.spec.check_layout(self.data_dir, task_cfg)
    self.spec.check_readable(self.data_dir)
    self._cfg = task_cfg
    self.reward_kind: str = self.spec.reward
    self.vocabulary = vocabulary if vocabulary is not None else embedded_vocabulary()
    self.prompt_format: str = str(task_cfg.get("prompt_format", "few_shot"))
    # Chat format: where the next turn starts, as decoded text (cut before scoring too).
    self._turn_stops: tuple[str, ...] = ()
    if self.prompt_format == "chat":
      self.format, self._turn_stops = _chat_format(self.spec, task_cfg, self.vocabulary)
    else:
      self.format = self.spec.prompt_format_for(task_cfg)
    self.stop_strings: tuple[str, ...] = self.spec.stop_strings + self._turn_stops
    # Majority voting's grouping of completions (None: the dataset has no voting).
    self.answer_key: Optional[Callable[[str], Optional[str]]] = self.spec.answer_key
    self.skipped: dict[str, int] = {}  # Too-long examples skipped per split (last read).
    self.workers = scoring.Workers(task_cfg)

    from restem_jax.tasks import seqio_tasks  # pylint: disable=import-outside-toplevel
    key = {"data_dir": self.data_dir, "few_shot": int(task_cfg.few_shot),
           "seed": int(task_cfg.seed), "num_val": int(task_cfg.num_val),
           "num_train": int(task_cfg.num_train), "num_test": int(task_cfg.num_test),
           **self.spec.config_key(task_cfg)}
    if self.prompt_format != "few_shot":  # (Few-shot task names stay what they were.)
      key["prompt_format"] = self.prompt_format
    self._records = seqio_tasks.SplitCache(self.spec.split_builder(task_cfg, self.data_dir))
    self.name: str = seqio_tasks.task_name(self.dataset, key)
    self.seqio_task = seqio_tasks.register(self.name, self._records, self.format,
                                           self.vocabulary)
    self._problem_cache: dict[tuple, list[Problem]] = {}
    self._scored_once = False

  # --- splits -------------------------------------------------------------------

  def problems(self, split: str, max_prompt_len: Optional[int] = None,
               max_seq_len: Optional[int] = None) -> list[Problem]:
    """The split's problems, read through the seqio task, in a deterministic order.

    Examples whose prompt has more than `max_prompt_len` tokens, or whose prompt +
    target (+EOS) exceeds `max_seq_len`, are skipped and counted (`self.skipped`)
    rather than truncated into a wrong target. A prompt's tokens are what the model
    is fed (encoding.encode_prompt: BOS included where the vocabulary prepends one),
    not seqio's `inputs`, which have no BOS.
    """
    from restem_jax.tasks import seqio_tasks  # pylint: disable=import-outside-toplevel
    if split not in seqio_tasks.SPLITS:
      raise ValueError(f"split must be one of {seqio_tasks.SPLITS}, got {split!r}")
    key = (split, max_prompt_len, max_seq_len)
    if key not in self._problem_cache:
      rows = seqio_tasks.read_split(self.seqio_task, split)
      if not rows:
        raise DataLayoutError(f"task {self.dataset} ({self.name}): split {split!r} is empty "
                              f"(data_dir={self.data_dir!r}, num_val={self._cfg.num_val})")
      kept, skipped = [], 0
      for r in rows:
        n_prompt = len(encoding.encode_prompt(self.vocabulary, r["prompt"]))
        too_long = ((max_prompt_len is not None and n_prompt > max_prompt_len)
                    or (max_seq_len is not None
                        and n_prompt + r["num_target_tokens"] > max_seq_len))
        if too_long:
          skipped += 1
          continue
        kept.append(Problem(id=r["id"], question=r["question"], prompt=r["prompt"],
                            target=r["target"], gold=r["gold"], level=r["level"]))
      if skipped:
        log.warning("task %s/%s: skipped %d of %d examples longer than max_prompt_len=%s / "
                    "max_seq_len=%s tokens", self.dataset, split, skipped, len(rows),
                    max_prompt_len, max_seq_len)
      if not kept:
        raise DataLayoutError(f"task {self.dataset}: every {split} example is longer than "
                              f"max_prompt_len={max_prompt_len} / max_seq_len={max_seq_len}")
      self.skipped[split] = skipped
      self._problem_cache[key] = kept
    return list(self._problem_cache[key])

  def human_solutions(self, max_prompt_len: Optional[int] = None,
                      max_seq_len: Optional[int] = None) -> list[Problem]:
    """Train problems with a human-written solution (SFT baseline, base pretraining)."""
    return [p for p in self.problems("train", max_prompt_len, max_seq_len) if p.target]

  # --- completions and rewards -------------------------------------------------

  def postprocess(self, completion: str) -> str:
    """The answer part of a sampled completion: cut where the next exemplar (or, in chat
    format, the next turn) starts."""
    return self.spec.postprocess(prompts.truncate(self._turn_stops, completion))

  def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
    """Binary rewards. An item whose reward raises scores 0.0 (logged); if every item
    of the first batch raises, the reward itself is broken and this raises."""
    return self.score_detailed(problems, completions)[0]

  def score_detailed(self, problems: Sequence[Problem], completions: Sequence[str]
                     ) -> tuple[list[float], list[Optional[str]]]:
    """(rewards, grader faults): as `score`, with each item's grader fault (None: the
    grader gave a verdict; else why it could not, e.g. "worker died": reward 0)."""
    if len(problems) != len(completions):
      raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if not problems:
      return [], []

    def batch_fn(idx: list[int]) -> tuple[list[float], list[Optional[str]]]:
      rewards = self.spec.score([problems[i] for i in idx],
                                [prompts.truncate(self._turn_stops, completions[i]) for i in idx],
                                self._cfg, self.workers)
      return rewards, self.workers.take_faults(len(idx))
    first, self._scored_once = not self._scored_once, True
    return _robust_score(batch_fn, len(problems), fail_if_all=first, what=self.dataset)


def _chat_format(spec: Any, task_cfg: Any, vocab: Any
                 ) -> tuple[prompts.PromptFormat, tuple[str, ...]]:
  """The chat-format prompt and turn stops from the vocabulary's stored template."""
  from restem_jax import errors  # pylint: disable=import-outside-toplevel
  from restem_jax.tasks import chat  # pylint: disable=import-outside-toplevel
  template = getattr(vocab, "chat_template", None)
  if spec.chat_before is None:
    raise errors.ConfigError(f"task.prompt_format='chat': task.name={spec.name!r} has no chat "
                             "format; use task.prompt_format='few_shot'")
  if not template:
    raise errors.ConfigError(
        "task.prompt_format='chat' needs a tokenizer with a stored chat template, and "
        f"{getattr(vocab, 'name', '') or type(vocab).__name__} has none; set task.vocab_path to "
        "an instruct model's .gguf / tokenizer.json, or use task.prompt_format='few_shot'")
  special = vocab.special_tokens() if hasattr(vocab, "special_tokens") else {}
  # The tokenizer adds BOS to every prompt itself (encode_prompt): a template's own
  # leading BOS text would double it.
  strip = special.get("bos_token", "") if getattr(vocab, "add_bos", False) else ""
  try:
    return chat.chat_format(template, spec.chat_exemplars(task_cfg), spec.chat_before,
                            special_tokens=special, strip_prefix=strip,
                            decode=functools.partial(_as_sampled, vocab))
  except chat.ChatTemplateError as e:
    raise errors.ConfigError(f"task.prompt_format='chat': {e}") from None


def _as_sampled(vocab: Any, text: str) -> str:
  """`text` as a sampled completion shows it: special tokens decode to nothing (EOS is
  left out first: seqio's decode would cut everything after it)."""
  return vocab.decode([i for i in vocab.encode(text) if i != vocab.eos_id])


def _robust_score(batch_fn: Callable[[list[int]], tuple[list[float], list[Optional[str]]]],
                  n: int, fail_if_all: bool,
                  what: str) -> tuple[list[float], list[Optional[str]]]:
  try:
    rewards, faults = batch_fn(list(range(n)))
    out = [float(r) for r in rewards]
    if len(out) != n:
      raise ValueError(f"reward returned {len(out)} values for {n} items")
    return out, list(faults)
  except Exception as batch_error:  # pylint: disable=broad-except
    # Find the items that fail: one bad completion must not cost the others.
    out, faults, errors = [], [], []
    for i in range(n):
      try:
        rewards, item_faults = batch_fn([i])
        out.append(float(rewards[0]))
        faults.append(item_faults[0])
      except Exception as e:  # pylint: disable=broad-except
        out.append(0.0)
        faults.append(None)  # The reward code raised on this item: its doing, not a grader fault.
        errors.append(e)
    if len(errors) == n and fail_if_all:
      raise RuntimeError(f"{what} reward failed on every item of the first batch "
                         f"({n} items): {errors[0]!r}") from batch_error
    if errors:
      log.warning("%s reward: %d of %d items raised and score 0.0; first: %r",
                  what, len(errors), n, errors[0])
    return out, faults


def get_task(task_cfg: Any, vocabulary=None) -> Task:
  """The task described by `task_cfg` (config.task), its seqio task registered.

  vocabulary: the model's tokenizer (a seqio.Vocabulary); None = the embedded
  SentencePiece model (the tiny models and the tests).
  """
  return Task(task_cfg, vocabulary)
