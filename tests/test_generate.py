"""E-step bookkeeping: which chunks a restarted (or re-sharded) E-step redoes."""
import json
import os

from restem_jax import generate, samples


def _stat(pid):
  return dict(problem_id=pid, level="1", num_samples=4, num_correct=1, num_kept=1)


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_resume_skips_complete_chunks_and_clears_partial_ones(tmp_path):
  d = str(tmp_path)
  chunks = [range(0, 3), range(3, 6), range(6, 8)]
  # Chunk 0: written by two processes, 2 + 1 stats lines = its 3 problems: complete.
  _write(os.path.join(d, "shard_00000_p000.jsonl"), [{"problem_id": "a"}])
  _write(os.path.join(d, "stats_00000_p000.jsonl"), [_stat("a"), _stat("x")])
  _write(os.path.join(d, "shard_00000_p001.jsonl"), [])
  _write(os.path.join(d, "stats_00000_p001.jsonl"), [_stat("y")])
  # Chunk 1: one host of two finished before a kill: 1 of 3 problems.
  _write(os.path.join(d, "shard_00001_p001.jsonl"), [{"problem_id": "b"}])
  _write(os.path.join(d, "stats_00001_p001.jsonl"), [_stat("b")])
  # Chunk 1 also has a shard whose stats never landed; chunk 2: nothing.
  _write(os.path.join(d, "shard_00001_p000.jsonl"), [{"problem_id": "c"}])

  assert generate._chunks_to_do(d, chunks) == [1, 2]
  # The partial chunk's files are gone (else its samples would count twice),
  # the complete chunk's are untouched.
  assert sorted(os.listdir(d)) == ["shard_00000_p000.jsonl", "shard_00000_p001.jsonl",
                                   "stats_00000_p000.jsonl", "stats_00000_p001.jsonl"]
  assert samples.summarize(d) == dict(problems=3, samples=12, correct=3, kept=3,
                                     problems_solved=3)
