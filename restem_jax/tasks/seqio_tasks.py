"""SeqIO registration: one seqio.Task per (dataset, data_dir, split choices, vocabulary).

The FunctionDataSource serves the final splits ("train", "validation", "test"),
already carved and capped, so anything reading the registered task (our
`Task.problems`, a t5x mixture, a notebook) sees the same examples. Features:
  inputs / targets            token ids (targets end with EOS)
  inputs_pretokenized / ...   the prompt and the human solution as text
  id, question, gold, level   passed through as strings
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Callable, Sequence

import seqio
import tensorflow as tf

from restem_jax import quiet
from restem_jax.tasks import prompts

SPLITS = ("train", "validation", "test")
STRING_FEATURES = ("id", "question", "gold", "level")
_RAW_FIELDS = ("id", "question", "hint", "target", "gold", "level")


class SplitCache:
  """Computes each split's records once, on first use (loading can be slow)."""

  def __init__(self, build: Callable[[str], list[dict]]):
    self._build = build
    self._cache: dict[str, list[dict]] = {}

  def __call__(self, split: str) -> list[dict]:
    if split not in self._cache:
      self._cache[split] = self._build(split)
    return self._cache[split]


def _records_to_dataset(records: Sequence[dict]) -> tf.data.Dataset:
  columns = {k: tf.constant([r[k] for r in records], dtype=tf.string) for k in _RAW_FIELDS}
  return tf.data.Dataset.from_tensor_slices(columns)


@seqio.map_over_dataset
def build_prompt(ex: dict, prefix: str, after: str) -> dict:
  """Few-shot prompt = exemplars + cue + question + hint + answer cue; target = solution."""
  out = {k: ex[k] for k in STRING_FEATURES}
  out["inputs"] = tf.strings.join([prefix, ex["question"], ex["hint"], after])
  out["targets"] = ex["target"]
  return out


def task_name(dataset: str, key: dict) -> str:
  digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return f"restem_{dataset}_{digest[:10]}"


def register(name: str, records: SplitCache, fmt: prompts.PromptFormat,
             vocabulary: seqio.Vocabulary) -> seqio.Task:
  """Adds (or returns the identical, already registered) seqio task `name`."""
  if name in seqio.TaskRegistry.names():
    task = seqio.TaskRegistry.get(name)
    if task.output_features["inputs"].vocabulary == vocabulary:
      return task
    seqio.TaskRegistry.remove(name)  # Same data, other tokenizer: replace.

  def dataset_fn(split: str, shuffle_files: bool, seed: int = 0) -> tf.data.Dataset:
    del shuffle_files, seed  # Order is part of the split's definition.
    return _records_to_dataset(records(split))

  features = {
      "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
      "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
  }
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS),
      output_features=features,
      preprocessors=[
          functools.partial(build_prompt, prefix=fmt.prefix + fmt.before, after=fmt.after),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
      ],
  )


def read_split(task: seqio.Task, split: str) -> list[dict]:
  """Every example of `split`, untrimmed, as Python values (strings decoded)."""
  out = []
  # tensorflow-text's SentencePiece logs "precompiled_charsmap is empty" from C++
  # each time a pipeline loads the model; quiet.filtered_stderr drops only that.
  with quiet.filtered_stderr():
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                          use_cached=False, num_epochs=1)
    examples = list(ds.as_numpy_iterator())
  for ex in examples:
    row = {k: ex[k].decode("utf-8") for k in STRING_FEATURES}
    row["prompt"] = ex["inputs_pretokenized"].decode("utf-8")
    row["target"] = ex["targets_pretokenized"].decode("utf-8")
    row["num_target_tokens"] = int(len(ex["targets"]))  # EOS included.
    out.append(row)
  return out
