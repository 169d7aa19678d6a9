"""A seqio task over the E-step's sample shards (the M-step's training data).

Shard format (written by generate.py, atomically): `samples_dir/shard_*.jsonl`,
one JSON object per line with keys problem_id, prompt, sample, reward, iteration,
seed. Features: inputs = prompt, targets = sample (+EOS), weight = reward
(float32), and problem_id / iteration / seed passed through.
"""
from __future__ import annotations

import hashlib
import json

from etils import epath

from restem_jax import workdir as wd

REQUIRED_KEYS = ("problem_id", "prompt", "sample", "reward", "iteration", "seed")


def shard_paths(samples_dir: str) -> list[str]:
  # Only finished shards: in-progress files are written under another name and
  # renamed, so a "*.jsonl" is complete. Sorted for a stable order.
  return wd.glob(samples_dir, "shard_*.jsonl")


def read_samples(samples_dir: str) -> list[dict]:
  """All samples, shard by shard in name order, each line as written."""
  if not epath.Path(samples_dir).is_dir():
    raise FileNotFoundError(f"samples dir {samples_dir!r} does not exist; expected "
                            "shard_*.jsonl files written by the E-step")
  out = []
  for path in shard_paths(samples_dir):
    with epath.Path(path).open() as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
          raise ValueError(f"{path}:{lineno}: sample lacks {missing}; "
                           f"each line needs {list(REQUIRED_KEYS)}")
        out.append(rec)
  return out


def register_samples_task(samples_dir: str, vocabulary) -> str:
  """Registers (or re-registers) the seqio task over `samples_dir`; returns its name.

  The source re-reads the shards on every get_dataset, so a task registered while
  the E-step was still writing sees the final shards when read later.
  """
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  samples_dir = wd.absolute(samples_dir)
  name = "restem_samples_" + hashlib.sha1(samples_dir.encode()).hexdigest()[:12]

  def dataset_fn(split: str, shuffle_files: bool, seed: int = 0) -> tf.data.Dataset:
    del split, shuffle_files, seed
    recs = read_samples(samples_dir)
    return tf.data.Dataset.from_tensor_slices({
        "problem_id": tf.constant([str(r["problem_id"]) for r in recs], tf.string),
        "inputs": tf.constant([r["prompt"] for r in recs], tf.string),
        "targets": tf.constant([r["sample"] for r in recs], tf.string),
        "weight": tf.constant([float(r["reward"]) for r in recs], tf.float32),
        "iteration": tf.constant([int(r["iteration"]) for r in recs], tf.int32),
        "seed": tf.constant([int(r["seed"]) for r in recs], tf.int64),
    })

  seqio.TaskRegistry.remove(name)  # Idempotent: same dir, possibly new vocabulary.
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=("train",)),
      output_features={
          "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      },
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
  )
  return name

