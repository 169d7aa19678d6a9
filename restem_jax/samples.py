"""The E-step's output: kept samples and per-problem counts, their files, writer and readers.

For chunk C of the training problems, process H writes (atomic renames, in this order):
  shard_CCCCC_pHHH.jsonl     one KeptSample per line: a correct sample the M-step trains on
  rejected_CCCCC_pHHH.jsonl  (restem.keep_rejected > 0) up to that many failed samples per
                             problem, same fields, for people to read: never trained on
  stats_CCCCC_pHHH.jsonl     one ProblemStats per line: each of its problems' counts
Every sample carries its provenance: the model that drew it (checkpoint path,
relative to the workdir when inside it),
the sampling settings, and the key: row key = fold_in(fold_in(rng_key,
problem_index), sample_index), as sampling.py derives it.
A chunk is complete once its stats files hold a line for each of its problems
(generate.py resumes on that). Lines are `json.dumps(row, sort_keys=True)`, one
object per line. Only finished files match `*.jsonl` (in-progress ones are
written under another name and renamed), read in name order for a stable order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

from etils import epath

from restem_jax import workdir as wd


@dataclasses.dataclass(frozen=True)
class KeptSample:
  """One correct sample the E-step kept: the M-step's (prompt, target, weight)."""
  problem_id: str
  prompt: str
  sample: str  # the completion as decoded (EOS dropped)
  reward: float  # the training weight
  iteration: int
  seed: int
  # Provenance (absent from shards written before it was recorded).
  problem_index: int = -1  # index in the run's training problems: the sampler's prompt id
  sample_index: int = -1  # which of the problem's num_samples samples
  model: str = ""  # checkpoint of the model that drew it: relative to the workdir if in it
  sampling: dict | None = None  # temperature, top_k, top_p, num_samples, max_new_tokens, ...
  rng_key: list | None = None  # jax.random.key_data of the E-step's key (uint32 words)


@dataclasses.dataclass(frozen=True)
class ProblemStats:
  """How one training problem fared in the E-step."""
  problem_id: str
  level: str
  num_samples: int
  num_correct: int
  num_kept: int
  # Samples the grader failed (crashed, hung, OOM-killed: reward 0 without a
  # verdict). 0 in files written before this field existed.
  num_faults: int = 0


REQUIRED_KEYS = ("problem_id", "prompt", "sample", "reward", "iteration", "seed")
_OPTIONAL_KEYS = tuple(f.name for f in dataclasses.fields(KeptSample)
                       if f.name not in REQUIRED_KEYS)


def _line(sample: KeptSample) -> dict:
  """A sample's line: provenance fields left at their defaults (unknown) are not written,
  so a row without provenance has the bytes it always had."""
  row = dataclasses.asdict(sample)
  defaults = {f.name: f.default for f in dataclasses.fields(KeptSample)}
  return {k: v for k, v in row.items() if k in REQUIRED_KEYS or v != defaults[k]}


def write_chunk(samples_dir: str, chunk: int, process: int, kept: Sequence[KeptSample],
                stats: Sequence[ProblemStats],
                rejected: Sequence[KeptSample] | None = None) -> None:
  """This process's rows of one chunk; the stats file last, as it marks the chunk complete.
  rejected: failed samples kept for reading (None: no rejected_ file)."""
  name = f"{chunk:05d}_p{process:03d}.jsonl"
  wd.write_lines_atomic(os.path.join(samples_dir, "shard_" + name), [_line(r) for r in kept])
  if rejected is not None:
    wd.write_lines_atomic(os.path.join(samples_dir, "rejected_" + name),
                          [_line(r) for r in rejected])
  wd.write_lines_atomic(os.path.join(samples_dir, "stats_" + name),
                        [dataclasses.asdict(r) for r in stats])


def shard_paths(samples_dir: str) -> list[str]:
  return wd.glob(samples_dir, "shard_*.jsonl")


_REDO = ("delete it (and its stats_ file) and rerun the same command: the E-step redoes "
         "that chunk")


def read_shard(path: str) -> list[KeptSample]:
  """One shard's samples; a missing, truncated or garbled file is a DamagedError naming
  its file:line."""
  try:
    lines = epath.Path(path).read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise wd.DamagedError(f"{path} is unreadable ({type(e).__name__}: {e}); {_REDO}") from e
  out = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise wd.DamagedError(f"{path}:{lineno}: not JSON ({e.msg}: truncated or garbled?); "
                            f"{_REDO}") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(rec, dict) or k not in rec]
    if missing:
      raise wd.DamagedError(f"{path}:{lineno}: sample lacks {missing} (each line needs "
                            f"{list(REQUIRED_KEYS)}); {_REDO}")
    out.append(KeptSample(**{k: rec[k] for k in REQUIRED_KEYS + _OPTIONAL_KEYS if k in rec}))
  return out


def read_rejected(samples_dir: str) -> list[KeptSample]:
  """The failed samples restem.keep_rejected stored (for people; the M-step never reads
  them): rejected_*.jsonl files whose chunk is complete (has its stats file)."""
  def complete(path: str) -> bool:
    rest = os.path.basename(path).split("_", 1)[1]
    return wd.exists(os.path.join(samples_dir, "stats_" + rest))
  return [s for path in wd.glob(samples_dir, "rejected_*.jsonl") if complete(path)
          for s in read_shard(path)]


def read_samples(samples_dir: str) -> list[KeptSample]:
  """All kept samples, shard by shard in name order; a malformed line names its file:line."""
  if not epath.Path(samples_dir).is_dir():
    raise wd.DamagedError(f"samples dir {samples_dir} is missing (expected shard_*.jsonl "
                          "files written by the E-step); rerun the same command to redo it")
  return [s for path in shard_paths(samples_dir) for s in read_shard(path)]


_STATS_KEYS = {f.name for f in dataclasses.fields(ProblemStats)}


def read_stats_file(path: str) -> list[ProblemStats]:
  """One stats file's rows (DamagedError naming the file if it is not what write_chunk wrote)."""
  out = []
  for row in wd.read_lines(path):
    if not isinstance(row, dict) or not {"problem_id", "num_samples"} <= set(row) \
        or set(row) - _STATS_KEYS:
      raise wd.DamagedError(f"{path}: a row is not a problem's stats ({str(row)[:80]}); {_REDO}")
    out.append(ProblemStats(**row))
  return out


def read_stats(samples_dir: str) -> list[ProblemStats]:
  return [r for path in wd.glob(samples_dir, "stats_*.jsonl") for r in read_stats_file(path)]


def check_files(paths: Sequence[str]) -> int:
  """How many problems these shard_/stats_ files cover, after checking them: every line
  parses, and each shard holds as many samples as its stats file says were kept (so a
  shard cut at a line boundary is caught too). DamagedError naming the file otherwise."""
  by_name: dict[str, dict[str, str]] = {}
  for path in paths:
    kind, rest = os.path.basename(path).split("_", 1)
    by_name.setdefault(rest, {})[kind] = path
  problems = 0
  for rest, files in sorted(by_name.items()):
    if "stats" not in files:  # Killed between the two renames: an unfinished chunk.
      continue
    stats = read_stats_file(files["stats"])
    kept = read_shard(files["shard"]) if "shard" in files else []
    if len(kept) != sum(r.num_kept for r in stats):
      raise wd.DamagedError(f"{files.get('shard', 'shard_' + rest)} holds {len(kept)} samples "
                            f"but {files['stats']} counts {sum(r.num_kept for r in stats)} "
                            f"kept (truncated?); {_REDO}")
    problems += len(stats)
  return problems


def verify(samples_dir: str, num_problems: int) -> dict:
  """summarize() of a finished E-step, after checking its files (check_files) and that
  the stats cover `num_problems` problems; DamagedError naming what is wrong otherwise."""
  if not epath.Path(samples_dir).is_dir():
    raise wd.DamagedError(f"samples dir {samples_dir} is missing; rerun to redo the E-step")
  check_files(wd.glob(samples_dir, "*_*_p[0-9][0-9][0-9].jsonl"))
  summary = summarize(samples_dir)
  if summary["problems"] != num_problems:
    raise wd.DamagedError(f"{samples_dir} has stats for {summary['problems']} of "
                          f"{num_problems} problems (files deleted?); rerun to redo the E-step")
  return summary


def summarize(samples_dir: str) -> dict:
  """Counts over all problems: problems, samples, correct, kept, problems_solved,
  grader_faults."""
  rows = read_stats(samples_dir)
  return dict(problems=len(rows), samples=sum(r.num_samples for r in rows),
              correct=sum(r.num_correct for r in rows),
              kept=sum(r.num_kept for r in rows),
              problems_solved=sum(r.num_correct > 0 for r in rows),
              grader_faults=sum(r.num_faults for r in rows))


def register_samples_task(samples_dir: str, vocabulary) -> str:
  """Registers (or re-registers) a seqio task over `samples_dir`; returns its name.

  Features: inputs = prompt, targets = sample (+EOS), weight = reward (float32),
  and problem_id / iteration / seed passed through. The source re-reads the
  shards on every get_dataset, so a task registered while the E-step was still
  writing sees the final shards when read later.
  """
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  samples_dir = wd.absolute(samples_dir)
  name = "restem_samples_" + hashlib.sha1(samples_dir.encode()).hexdigest()[:12]

  def dataset_fn(split: str, shuffle_files: bool, seed: int = 0) -> tf.data.Dataset:
    del split, shuffle_files, seed
    recs = read_samples(samples_dir)
    return tf.data.Dataset.from_tensor_slices({
        "problem_id": tf.constant([str(r.problem_id) for r in recs], tf.string),
        "inputs": tf.constant([r.prompt for r in recs], tf.string),
        "targets": tf.constant([r.sample for r in recs], tf.string),
        "weight": tf.constant([float(r.reward) for r in recs], tf.float32),
        "iteration": tf.constant([int(r.iteration) for r in recs], tf.int32),
        "seed": tf.constant([int(r.seed) for r in recs], tf.int64),
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
