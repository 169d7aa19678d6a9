"""E-step bookkeeping: which chunks a restarted (or re-sharded) E-step redoes; the one
chunked sampling path it shares with evaluation."""
import json
import os
import shutil

import pytest

from restem_jax import generate, samples


def _stat(pid):
  return dict(problem_id=pid, level="1", num_samples=4, num_correct=1, num_kept=1)


def _kept(pid):
  return dict(problem_id=pid, prompt="Q", sample="A", reward=1.0, iteration=1, seed=0)


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_resume_skips_complete_chunks_and_clears_partial_ones(tmp_path):
  d = str(tmp_path)
  chunks = [range(0, 3), range(3, 6), range(6, 8)]
  # Chunk 0: written by two processes, 2 + 1 stats lines = its 3 problems: complete.
  _write(os.path.join(d, "shard_00000_p000.jsonl"), [_kept("a"), _kept("x")])
  _write(os.path.join(d, "stats_00000_p000.jsonl"), [_stat("a"), _stat("x")])
  _write(os.path.join(d, "shard_00000_p001.jsonl"), [_kept("y")])
  _write(os.path.join(d, "stats_00000_p001.jsonl"), [_stat("y")])
  # Chunk 1: one host of two finished before a kill: 1 of 3 problems.
  _write(os.path.join(d, "shard_00001_p001.jsonl"), [_kept("b")])
  _write(os.path.join(d, "stats_00001_p001.jsonl"), [_stat("b")])
  # Chunk 1 also has a shard whose stats never landed; chunk 2: nothing.
  _write(os.path.join(d, "shard_00001_p000.jsonl"), [{"problem_id": "c"}])
  _write(os.path.join(d, ".tmp_k1ll3d"), [_stat("z")])  # a write a kill cut short

  assert generate._chunks_to_do(d, chunks) == [1, 2]
  # The partial chunk's files and the dead temporary are gone (else its samples would
  # count twice), the complete chunk's are untouched.
  assert sorted(os.listdir(d)) == ["shard_00000_p000.jsonl", "shard_00000_p001.jsonl",
                                   "stats_00000_p000.jsonl", "stats_00000_p001.jsonl"]
  assert samples.summarize(d) == dict(problems=3, samples=12, correct=3, kept=3,
                                      problems_solved=3, grader_faults=0)


@pytest.mark.slow  # Three E-steps over a task (~8 s of CPU).
def test_e_step_samples_in_one_shape_resumes_by_chunk_and_matches_unchunked_sampling(tmp_path):
  """The E-step's chunks (3 + 3 + 3 + 1 prompts) run one compiled program; a resumed
  E-step rescores only the unfinished chunks and writes byte-identical files; every
  count agrees with one unchunked `Sampler.sample` call (keys are per problem)."""
  import jax
  from helpers import task_cfg
  from restem_jax import configlib, model as M, partitioning as P, sampling, tasks

  task = tasks.get_task(task_cfg(num_train=10, num_val=0, num_test=4, num_human=0))
  problems = task.problems("train")
  vocab = task.vocabulary
  assert len(problems) == 10
  scored = []

  class EvenLength:  # A reward that keeps some samples of a random model.
    vocabulary, stop_strings = vocab, task.stop_strings

    @staticmethod
    def score(ps, texts):
      scored.extend(p.id for p in ps)
      return [float(len(task.postprocess(t)) % 2 == 0) for t in texts]

  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  mesh = P.make_mesh(c.mesh, jax.devices()[:1])
  cfg = M.ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=64)
  params = M.init_params(cfg, mesh, jax.random.key(0))
  c.sampling.update(num_samples=2, max_batch=6, max_new_tokens=12, temperature=1.0, top_k=0)

  lines = []

  def run(out_dir):
    sampler = sampling.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                               stop_strings=task.stop_strings, vocabulary=vocab)
    lines.clear()
    counts = generate.generate(params=params, sampler=sampler, task=EvenLength(),
                               problems=problems, sampling_cfg=c.sampling, max_per_problem=1,
                               iteration=1, out_dir=out_dir, seed=3, log=lines.append)
    return sampler, counts

  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  sampler, counts = run(a)
  assert sampler.num_compiled() == 1
  files = sorted(os.listdir(a))
  assert files == [f"{k}_{c:05d}_p000.jsonl" for k in ("shard", "stats") for c in range(4)]

  # Reference: all 10 prompts in one call, the E-step's key.
  ref = sampler.sample(params, [vocab.encode(p.prompt) for p in problems], num_samples=2,
                       max_new_tokens=12, mode=sampling.SamplingMode(1.0),
                       rng=jax.random.fold_in(jax.random.key(3), 1))
  texts = sampling.decode_completions(vocab, ref)
  correct = {p.id: sum(len(task.postprocess(t)) % 2 == 0 for t in row)
             for p, row in zip(problems, texts)}
  assert 0 < sum(correct.values()) < 20
  stats = {r.problem_id: r for r in samples.read_stats(a)}
  assert {k: r.num_correct for k, r in stats.items()} == correct
  assert counts == dict(problems=10, samples=20, correct=sum(correct.values()),
                        kept=sum(min(1, n) for n in correct.values()),
                        problems_solved=sum(n > 0 for n in correct.values()), grader_faults=0)
  # Progress (not a terminal under pytest): one log line per chunk here (4 chunks, <= 10
  # lines), the last one with every problem and the running solved count.
  solved = sum(n > 0 for n in correct.values())
  assert len(lines) == 4 and lines[-1].startswith("generate iter 1: 10/10 problems (100%), ")
  assert f"solved {solved}/10 ({100 * solved / 10:.0f}%)" in lines[-1], lines
  for i in range(4):
    for row in wd_lines(os.path.join(a, f"shard_{i:05d}_p000.jsonl")):
      assert row["sample"] in texts[[p.id for p in problems].index(row["problem_id"])]

  # Resume: chunks 0 and 2 are done, chunk 1 has a shard but no stats, chunk 3 nothing.
  os.makedirs(b)
  for name in ("shard_00000", "stats_00000", "shard_00002", "stats_00002", "shard_00001"):
    shutil.copy(os.path.join(a, name + "_p000.jsonl"), b)
  scored.clear()
  sampler, _ = run(b)
  assert sampler.num_compiled() == 1
  # The resumed call starts at the 6 problems already done; it scored the other 4.
  assert lines[-1].startswith("generate iter 1: 10/10 problems"), lines
  assert "solved " in lines[-1] and "/4 (" in lines[-1], lines
  assert scored == [p.id for p in problems[3:6] + problems[9:] for _ in range(2)]
  assert sorted(os.listdir(b)) == files
  for name in files:
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
      assert fa.read() == fb.read(), name


def wd_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_evaluation_budget_defaults_to_sampling():
  from restem_jax import configlib, evaluate
  c = configlib.default_config()
  c.sampling.update(max_new_tokens=96, max_batch=128)
  assert evaluate.sampling_budget(c) == dict(max_new_tokens=96, max_batch=128)
  c.eval.update(max_new_tokens=40, max_batch=32)
  assert evaluate.sampling_budget(c) == dict(max_new_tokens=40, max_batch=32)
