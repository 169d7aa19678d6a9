"""The E-step's files: the line format the writer produces, what the readers make of it."""
import json

import pytest

from restem_jax import samples, tasks, workdir as wd


def test_write_chunk_lines_are_sorted_json_one_per_line(tmp_path):
  kept = [samples.KeptSample(problem_id="gsm8k/train/00003", prompt="Q: 2+2?\nA:",
                             sample=" 4 \"four\"", reward=1.0, iteration=2, seed=7)]
  stats = [samples.ProblemStats(problem_id="gsm8k/train/00003", level="steps=1", num_samples=4,
                                num_correct=3, num_kept=1),
           samples.ProblemStats(problem_id="gsm8k/train/00004", level="steps=2", num_samples=4,
                                num_correct=0, num_kept=0)]
  samples.write_chunk(str(tmp_path), 12, 3, kept, stats)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00012_p003.jsonl",
                                                        "stats_00012_p003.jsonl"]
  # The bytes a run wrote before the rows became dataclasses (hand-written).
  assert (tmp_path / "shard_00012_p003.jsonl").read_text() == (
      '{"iteration": 2, "problem_id": "gsm8k/train/00003", "prompt": "Q: 2+2?\\nA:", '
      '"reward": 1.0, "sample": " 4 \\"four\\"", "seed": 7}\n')
  assert (tmp_path / "stats_00012_p003.jsonl").read_text() == (
      '{"level": "steps=1", "num_correct": 3, "num_faults": 0, "num_kept": 1, "num_samples": 4, '
      '"problem_id": "gsm8k/train/00003"}\n'
      '{"level": "steps=2", "num_correct": 0, "num_faults": 0, "num_kept": 0, "num_samples": 4, '
      '"problem_id": "gsm8k/train/00004"}\n')
  assert samples.read_samples(str(tmp_path)) == kept
  assert samples.read_stats(str(tmp_path)) == stats
  assert samples.summarize(str(tmp_path)) == dict(problems=2, samples=8, correct=3, kept=1,
                                                  problems_solved=1, grader_faults=0)


def test_samples_task(tmp_path):
  import seqio
  rows = [{"problem_id": f"p{i}", "prompt": f"Q: {i}?\nA:", "sample": f"The answer is {i}.",
           "reward": float(i % 2), "iteration": 1, "seed": 7 + i} for i in range(5)]
  for shard, part in (("shard_00001.jsonl", rows[3:]), ("shard_00000.jsonl", rows[:3])):
    (tmp_path / shard).write_text("".join(json.dumps(r) + "\n" for r in part))
  (tmp_path / "shard_00002.jsonl.tmp").write_text("{partial")  # in-progress: ignored
  assert samples.read_samples(str(tmp_path)) == [samples.KeptSample(**r) for r in rows]
  vocab = tasks.embedded_vocabulary()
  name = samples.register_samples_task(str(tmp_path), vocab)
  assert samples.register_samples_task(str(tmp_path), vocab) == name
  exs = list(seqio.get_mixture_or_task(name).get_dataset(
      None, split="train", shuffle=False).as_numpy_iterator())
  assert [e["inputs_pretokenized"].decode() for e in exs] == [r["prompt"] for r in rows]
  assert [float(e["weight"]) for e in exs] == [r["reward"] for r in rows]
  assert list(exs[2]["targets"]) == vocab.encode(rows[2]["sample"]) + [vocab.eos_id]
  (tmp_path / "shard_00003.jsonl").write_text('{"prompt": "x"}\n')
  with pytest.raises(wd.DamagedError, match="shard_00003.jsonl:1"):
    samples.read_samples(str(tmp_path))
  with pytest.raises(wd.DamagedError, match="missing"):
    samples.read_samples(str(tmp_path / "missing"))
