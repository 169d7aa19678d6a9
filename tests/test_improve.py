"""M-step tests: early stopping on the best evaluation, exact resume, loud failures."""
import os
import shutil

import jax
import numpy as np
import pytest

from restem_jax import checkpoints as C, improve as I, model as M
from test_training import host, mesh1, tiny_cfg, train_cfg

MAX_STEPS = 12
# Validation reward by step: rises to step 4, then falls (so patience 2 stops at 8).
SCORES = {2: 0.1, 4: 0.5, 6: 0.3, 8: 0.2, 10: 0.6, 12: 0.7}


def examples(n=6):
  rng = np.random.default_rng(0)
  return [I.Example(prompt=[int(i + 1), int(rng.integers(1, 64))],
                    target=list(map(int, rng.integers(1, 64, int(rng.integers(2, 6))))),
                    weight=1.0) for i in range(n)]


def cfg(**kw):
  base = dict(batch_size=4, max_steps=MAX_STEPS, eval_every=2, patience=2, checkpoint_every=3,
              keep_checkpoints=2, warmup_steps=1)
  base.update(kw)
  return train_cfg(**base)


def fingerprint(params) -> bytes:
  return b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(host(params)))


@pytest.fixture(scope="module")
def init():
  return M.init_params(tiny_cfg(), mesh1(), jax.random.key(1))


def run(workdir, init, eval_fn, **kw):
  """improve's (params, info); full fine-tuning returns no adapters."""
  trained, info = I.improve(model_cfg=tiny_cfg(), train_cfg=cfg(**kw), mesh=mesh1(),
                            init_params=init, examples=examples(), seq_len=10, eval_fn=eval_fn,
                            workdir=str(workdir), seed=3, log=lambda _: None)
  assert trained.adapters is None and trained.base is None
  return trained.params, info


@pytest.fixture(scope="module")
def reference(init, tmp_path_factory):
  """An uninterrupted run that never stops early: params at every evaluation."""
  by_step = {}

  def record(params):
    by_step[2 * (len(by_step) + 1)] = host(params)
    return 0.0

  run(tmp_path_factory.mktemp("ref"), init, record, patience=100)
  assert sorted(by_step) == sorted(SCORES)
  # Scores are looked up by the params themselves, so an evaluation at a given
  # step scores the same in every run (resumed ones included).
  table = {fingerprint(p): SCORES[s] for s, p in by_step.items()}
  return by_step, table


def scorer(table, calls):
  def eval_fn(params):
    calls.append(1)
    return table[fingerprint(params)]
  return eval_fn


def test_early_stopping_keeps_best_and_resume_is_exact(init, reference, tmp_path):
  by_step, table = reference
  calls = []
  best, info = run(tmp_path / "a", init, scorer(table, calls))
  assert info == {"best_step": 4, "best_score": 0.5, "steps": 8, "stopped": "patience",
                  "evals": [(2, 0.1), (4, 0.5), (6, 0.3), (8, 0.2)]}
  assert fingerprint(best) == fingerprint(by_step[4])
  assert len(calls) == 4

  # Interrupted: the 4th evaluation (step 8) dies; the latest checkpoint is step 6
  # (checkpoint_every=3), taken after the evaluation at 6 (one bad eval counted).
  class Killed(Exception):
    pass

  n = []

  def dies_at_fourth(params):
    n.append(1)
    if len(n) == 4:
      raise Killed()
    return table[fingerprint(params)]

  with pytest.raises(Killed):
    run(tmp_path / "b", init, dies_at_fourth)
  assert C.TrainCheckpointer(str(tmp_path / "b" / "checkpoints")).all_steps() == [3, 6]

  # A damaged latest checkpoint is removed (a warning names it) and the one before it
  # used: the steps after it are redone, to the same end.
  damaged = tmp_path / "damaged"
  shutil.copytree(tmp_path / "b", damaged)
  shutil.rmtree(damaged / "checkpoints" / "6" / "state" / "d")
  os.remove(damaged / "checkpoints" / "6" / "state" / "manifest.ocdbt")
  logs, calls = [], []
  best_x, info_x = I.improve(model_cfg=tiny_cfg(), train_cfg=cfg(), mesh=mesh1(),
                             init_params=init, examples=examples(), seq_len=10,
                             eval_fn=scorer(table, calls), workdir=str(damaged), seed=3,
                             log=logs.append)
  assert "improve: removed damaged checkpoint step 6" in logs
  assert "improve: resumed from %s at step 3" % (damaged / "checkpoints") in logs
  assert info_x == info and fingerprint(best_x.params) == fingerprint(best)
  assert len(calls) == 3  # steps 4, 6 and 8 evaluated again

  calls = []
  best_r, info_r = run(tmp_path / "b", init, scorer(table, calls))
  assert info_r == info
  assert fingerprint(best_r) == fingerprint(best)
  assert len(calls) == 1  # only step 8 was evaluated again

  # Finished M-steps return their stored result without training or evaluating.
  calls = []
  best_d, info_d = run(tmp_path / "b", init, scorer(table, calls))
  assert info_d == info and fingerprint(best_d) == fingerprint(best) and not calls
  with pytest.raises(C.CheckpointError, match="seed=3 and 6 examples, not seed=4"):
    I.improve(model_cfg=tiny_cfg(), train_cfg=cfg(), mesh=mesh1(), init_params=init,
              examples=examples(), seq_len=10, eval_fn=None, workdir=str(tmp_path / "b"),
              seed=4, log=lambda _: None)
  # The caller's params were never donated.
  assert not any(x.is_deleted() for x in jax.tree.leaves(init))


def test_without_eval_fn_trains_max_steps(init, reference, tmp_path):
  by_step, _ = reference
  final, info = run(tmp_path, init, None)
  assert info == {"best_step": MAX_STEPS, "best_score": None, "steps": MAX_STEPS,
                  "evals": [], "stopped": "max_steps"}
  assert fingerprint(final) == fingerprint(by_step[MAX_STEPS])


def test_empty_examples_fail_before_anything(init, tmp_path):
  with pytest.raises(ValueError, match="no kept samples to train on: .*lower the bar"):
    I.improve(model_cfg=tiny_cfg(), train_cfg=cfg(), mesh=mesh1(), init_params=init,
              examples=[], seq_len=10, eval_fn=None, workdir=str(tmp_path / "w"), seed=0)
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match="1 of 2 examples are longer than seq_len=10"):
    I.improve(model_cfg=tiny_cfg(), train_cfg=cfg(), mesh=mesh1(), init_params=init,
              examples=[I.Example([1], [2] * 3, 1.0), I.Example([1], [2] * 10, 1.0)],
              seq_len=10, eval_fn=None, workdir=str(tmp_path / "w"), seed=0)


def test_batch_stream_epochs_are_permutations():
  ex = examples(5)
  stream = I.BatchStream(ex, batch_size=3, seq_len=10, seed=1)
  flat = [i for s in range(5) for i in stream.indices(s)]  # 15 positions = 3 epochs
  for e in range(3):
    assert sorted(flat[5 * e:5 * e + 5]) == list(range(5))
  assert flat[:5] != flat[5:10]  # each epoch reshuffled
  fresh = I.BatchStream(ex, batch_size=3, seq_len=10, seed=1)
  assert fresh.indices(4) == stream.indices(4)  # any step, without replaying the others
  assert I.BatchStream(ex, 3, 10, seed=2).indices(0) != stream.indices(0) or \
      I.BatchStream(ex, 3, 10, seed=2).indices(1) != stream.indices(1)


def test_shared_rows_group_by_prompt_within_the_row_budget():
  a, b = [1, 2, 3], [4, 5]
  ex = [I.Example(a, [7] * 3, 1.0), I.Example(b, [8] * 2, 1.0), I.Example(a, [9] * 4, 0.5),
        I.Example(a, [6] * 2, 1.0), I.Example(b, [5], 1.0)]
  # Budget 10: prompt a (3) + 3 + 4 = 10 fits, + 2 more does not; prompt b (2) + 2 + 1.
  assert I.shared_rows(ex, row_len=10) == [[0, 2], [3], [1, 4]]
  stream = I.BatchStream(ex, batch_size=2, seq_len=10, seed=0, share_prompts=True)
  seen = [i for s in range(3) for u in stream.indices(s) for i in stream.units[u]]
  assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
  batch = stream.batch(0)
  assert batch.tokens_BxL.shape == (2, 10)  # rounded up to 16, at most seq_len
  targets = sorted(int(n) for n in batch.examples_B)
  assert targets in ([1, 2], [2, 2])  # rows, not examples, per batch


class _CharVocab:
  """One token per character (a hand count of lengths), eos = 1."""
  eos_id = 1

  def encode(self, text):
    return [ord(ch) for ch in text]


def test_make_examples_adds_eos_and_skips_the_too_long_with_a_count(caplog):
  pairs = [("ab", "cd"), ("abcdef", "ghij"), ("a", "bcdefgh"), ("", "")]
  # Lengths prompt + target + EOS: 5, 11, 9, 1; max 9 keeps the 1st, 3rd and 4th.
  with caplog.at_level("WARNING"):
    ex = I.make_examples(_CharVocab(), pairs, max_seq_len=9, weights=[0.5, 1.0, 2.0, 3.0])
  assert ex == [I.Example([97, 98], [99, 100, 1], 0.5),
                I.Example([97], [98, 99, 100, 101, 102, 103, 104, 1], 2.0),
                I.Example([], [1], 3.0)]
  assert "skipped 1 of 4 training examples longer than model.max_seq_len=9" in caplog.text
  assert [e.weight for e in I.make_examples(_CharVocab(), pairs[:1], 9)] == [1.0]


def test_batches_pad_to_their_longest_rounded_up_to_16_at_most_seq_len():
  assert [I.padded_length(n, 40) for n in (1, 16, 17, 32, 33, 40)] == [16, 16, 32, 32, 40, 40]
  ex = [I.Example([1] * 3, [2] * 15, 1.0), I.Example([1], [2], 1.0)]  # lengths 18 and 2
  # Batch of one: the 18-long example pads to 32, the 2-long one to 16.
  stream = I.BatchStream(ex, batch_size=1, seq_len=40, seed=0)
  widths = {stream.indices(s)[0]: stream.batch(s).tokens_BxL.shape[1] for s in range(2)}
  assert widths == {0: 32, 1: 16}


def test_sigterm_checkpoints_the_current_step_and_the_resumed_run_is_exact(init, reference,
                                                                           tmp_path):
  """SIGTERM arriving during the validation at step 4: the M-step finishes it, saves step 4
  (not a multiple of checkpoint_every=3) and raises Preempted; called again it continues
  from step 4 and ends with the uninterrupted run's best params and info."""
  import signal
  from restem_jax import preemption
  by_step, table = reference
  full_best, full_info = run(tmp_path / "full", init, scorer(table, []))

  calls = []

  def eval_then_preempt(params):
    score = table[fingerprint(params)]
    if len(calls) == 1:  # At the 2nd evaluation (step 4): a pod's preemption notice.
      os.kill(os.getpid(), signal.SIGTERM)
    calls.append(1)
    return score
  with preemption.handling():
    preemption.set_phase("improve_001")  # Past startup (there a SIGTERM stops at once).
    with pytest.raises(preemption.Preempted, match="checkpoint at step 4/12 saved"):
      run(tmp_path / "a", init, eval_then_preempt)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "a" / "checkpoints") if s.isdigit())
  assert steps == [3, 4]  # The step the notice came in, with its validation, is saved.
  assert signal.getsignal(signal.SIGTERM) is not preemption._on_sigterm  # pylint: disable=protected-access
  best, info = run(tmp_path / "a", init, scorer(table, calls))
  assert info == full_info
  assert fingerprint(best) == fingerprint(full_best)


def test_sigterm_during_startup_stops_at_once():
  """Before any phase began there is nothing to save: the handler itself stops the run."""
  import signal
  from restem_jax import preemption
  with preemption.handling():
    with pytest.raises(preemption.Preempted, match="during startup: nothing to save"):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # The handler runs between bytecodes of this loop.
        pass


def test_after_step_decides_eval_stop_and_checkpoint_by_hand():
  """after_step on a hand-made score sequence: best, patience, checkpoint steps."""
  sched = I.Schedule(max_steps=8, eval_every=2, patience=2, checkpoint_every=3, evaluates=True)
  assert [s for s in range(1, 9) if sched.eval_due(s)] == [2, 4, 6, 8]
  book = I.Book(seed=1, num_examples=5)
  seen = []
  for step, score in [(1, None), (2, 0.5), (3, None), (4, 0.4), (5, None), (6, 0.5)]:
    then = I.after_step(book, step, score, sched)
    book = then.book
    seen.append((then.improved, then.save, book.done))
  assert seen == [(False, False, False), (True, False, False), (False, True, False),
                  (False, False, False), (False, False, False), (False, True, True)]
  assert (book.best_step, book.best_score, book.bad_evals, book.stopped) == (2, 0.5, 2, "patience")
  assert book.evals == [[2, 0.5], [4, 0.4], [6, 0.5]]  # a tie is no improvement
  # Without evaluations max_steps stops it, and that step is saved.
  then = I.after_step(I.Book(step=7), 8, None, I.Schedule(8, 2, 2, 3, evaluates=False))
  assert (then.book.stopped, then.book.done, then.save) == ("max_steps", True, True)
  # Checkpoints keep the book as the dict they always held (old checkpoints resume).
  assert list(book.as_dict()) == ["step", "best_step", "best_score", "evals", "bad_evals",
                                  "stopped", "done", "seed", "num_examples"]
  assert I.Book.from_dict(book.as_dict()) == book
