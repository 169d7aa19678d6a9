"""reasoning-gym task: disjoint splits, the datasets' own scoring, robust workers."""
import json
import signal
import time

import pytest
import reasoning_gym as rg  # In the [test] extra: if missing, collection fails (not a skip).

from restem_jax.rewards import reasoning_gym as rrg
from restem_jax.tasks.datasets import reasoning_gym as R

# Every dataset (and config) that a config in configs/ trains or evaluates on.
USED = (
    ("chain_sum", 1.0, {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    ("basic_arithmetic", 1.0, {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                               "max_digits": 1, "allow_parentheses": False,
                               "allow_negation": False, "operators": ("+", "-", "*")}),
    ("gsm_symbolic", 0.5, {}),
    ("leg_counting", 1.0, {"min_animals": 1, "max_animals": 2, "min_instances": 1,
                           "max_instances": 3}),
)


@pytest.fixture(scope="module")
def splits():
  return R.build_splits(R.parse_mix(USED), {"test": 60, "validation": 20, "train": 120},
                        task_seed=3, num_exemplars=4)


def test_splits_are_disjoint_sized_and_mixed(splits):
  sizes = {k: len(v) for k, v in splits.items()}
  assert sizes == {"exemplars": 4, "test": 60, "validation": 20, "train": 120}
  seen = {}
  for split, rows in splits.items():
    for r in rows:
      assert r["question"] not in seen, (split, seen.get(r["question"]))
      seen[r["question"]] = split
  # Shares follow the weights (3.5 in all): test 60 -> 17 / 17 / 9 / 17 by hand.
  by_source = {}
  for r in splits["test"]:
    by_source[r["id"].split("/")[1]] = by_source.get(r["id"].split("/")[1], 0) + 1
  assert by_source == {"chain_sum": 17, "basic_arithmetic": 17, "gsm_symbolic": 9,
                       "leg_counting": 17}
  assert len({r["id"] for rows in splits.values() for r in rows}) == 204


def test_splits_depend_on_the_seed_only():
  a = R.build_splits(R.parse_mix(USED[:2]), {"test": 10}, task_seed=1, num_exemplars=0)
  b = R.build_splits(R.parse_mix(USED[:2]), {"test": 10}, task_seed=1, num_exemplars=0)
  c = R.build_splits(R.parse_mix(USED[:2]), {"test": 10}, task_seed=2, num_exemplars=0)
  assert a == b
  assert [r["question"] for r in a["test"]] != [r["question"] for r in c["test"]]


def test_allocation_by_hand():
  assert R.allocate(10, [1, 1, 1]) == [4, 3, 3]
  assert R.allocate(7, [2, 1]) == [5, 2]  # 4.67 / 2.33: remainders .67 > .33
  assert R.allocate(0, [1, 2]) == [0, 0]


def test_exhausted_generator_is_named():
  # Two one-digit terms without negation: at most 10 * 10 * 2 questions.
  mix = R.parse_mix((("chain_sum", 1.0, {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                        "max_digits": 1}),))
  with pytest.raises(R.ReasoningGymError, match="chain_sum.*distinct"):
    R.build_splits(mix, {"test": 150, "train": 150}, task_seed=0, num_exemplars=0)
  # A small request from the same space still succeeds (the draw budget has slack).
  assert len(R.build_splits(mix, {"test": 100, "train": 1}, 0, 0)["train"]) == 1


@pytest.mark.parametrize("value, match", [
    ((("chain_summ", 1.0, {}),), "unknown reasoning-gym dataset 'chain_summ'"),
    ((("chain_sum", 0.0, {}),), "weight 0.0 must be > 0"),
    ((("chain_sum", 1.0, {"bogus": 1}),), "bogus"),
    ((("chain_sum", 1.0, {"min_terms": 5, "max_terms": 2}),), "max_terms must be >= min_terms"),
    ((("chain_sum", 1.0, {"seed": 3}),), "seed and size are set per split"),
    ((), "is empty"),
])
def test_bad_mix_is_one_line_naming_the_field(value, match):
  with pytest.raises(R.ReasoningGymError, match=match) as e:
    R.parse_mix(value)
  assert str(e.value).startswith("task.rg_datasets") and "\n" not in str(e.value)


@pytest.mark.parametrize("text, want", [
    ("Answer: 42", "42"),
    (" Answer:  -7 \n\nQuestion: next", "-7"),
    ("Solution: 3 + 4 = 7.\nAnswer: 7\nAnswer: 8", "7"),  # the first answer line counts
    ("The answer is 7", None),
    ("Answer:\n7", None),  # an empty answer line is no answer
    ("Solution: a\nAnswer: thought, sentence, Only", "thought, sentence, Only"),
])
def test_extract_answer_by_hand(text, want):
  assert R.extract_answer(text) == want


def test_reward_equals_the_datasets_own_scoring(splits):
  """For every record: reference answer -> 1; the dataset's score of a near miss decides it."""
  rows = [r for rows in splits.values() for r in rows]
  completions, want = [], []
  for r in rows:
    loc = json.loads(r["gold"])
    ds = rg.create_dataset(loc["source"], seed=loc["seed"], size=loc["size"], **loc["config"])
    entry = ds[loc["index"]]
    assert entry["question"].strip() == r["question"]  # the locator finds the same entry
    completions.append(R.format_solution(r["reasoning"], r["answer"]) + "\n\nQuestion: x")
    want.append(1.0)
    near = r["answer"] + "0"  # partial credit in some datasets: must not count
    completions.append(f"Answer: {near}")
    want.append(1.0 if ds.score_answer(near, entry) == 1.0 else 0.0)
  golds = [r["gold"] for r in rows for _ in range(2)]
  with rrg.ReasoningGymGrader(R.score_answer, R.extract_answer, num_workers=2) as g:
    assert g.score(golds, completions) == want
  # Not vacuous: nearly every near miss scores 0 by its own dataset (basic_arithmetic
  # accepts a float within its tolerance, e.g. 5 / 9 with one more digit).
  assert len(rows) <= sum(want) < len(rows) * 1.05


@pytest.mark.parametrize("source", ["chain_sum", "basic_arithmetic", "products"])
def test_arithmetic_reference_answers_are_right(source):
  """The datasets' own answers vs Python's arithmetic on their expression (an independent
  check of the data we train on: with "/", basic_arithmetic 0.1.25 answers "7 / 4" with 28)."""
  name, _, kw = next(u for u in USED + (("products", 1, {"min_digits": 1, "max_digits": 2}),)
                     if u[0] == source)
  ds = rg.create_dataset(name, seed=11, size=300, **kw)
  for e in ds:
    assert str(eval(e["metadata"]["expression"])) == e["answer"], e["question"]  # pylint: disable=eval-used
  broken = rg.create_dataset("basic_arithmetic", seed=7, size=50, **dict(kw, operators=("/",))) \
      if source == "basic_arithmetic" else []
  def python_value(expr):
    try:
      return str(eval(expr))  # pylint: disable=eval-used
    except ZeroDivisionError:
      return None
  wrong = [e for e in broken if python_value(e["metadata"]["expression"]) != e["answer"]]
  assert source != "basic_arithmetic" or wrong  # why "/" is excluded from our configs


def test_worked_solutions_only_where_the_dataset_has_them(splits):
  for r in splits["train"]:
    assert bool(r["reasoning"]) == r["id"].startswith("rg/gsm_symbolic/")


def _score_that_hangs(score_answer, gold, answer, timeout_s):
  if answer == "hang":
    time.sleep(3600)  # SIGPROF blocked: only the parent's kill ends this.
  if answer == "crash":
    import os
    os._exit(3)  # A scorer that takes its process down.
  return _real_score(score_answer, gold, answer, timeout_s)


_real_score = rrg._score_in_worker


def _faulty_worker_main(score_answer, conn):
  signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPROF])
  rrg._score_in_worker = _score_that_hangs
  rrg._worker_main(score_answer, conn)


class _FaultyGrader(rrg.ReasoningGymGrader):
  _worker_target = staticmethod(_faulty_worker_main)
  hang_grace_s = 1.0


@pytest.mark.slow  # A spawned grader pool that hangs and crashes (~7 s of CPU).
def test_hanging_or_crashing_scorer_costs_one_sample(splits):
  r = splits["test"][0]
  good = f"Answer: {r['answer']}"
  bad_locator = json.dumps({"source": "chain_sum", "config": {}, "seed": 0, "size": 1,
                            "index": "not an index"})
  with _FaultyGrader(R.score_answer, R.extract_answer, num_workers=2, timeout_s=1.0) as g:
    out = g.score([r["gold"]] * 4 + [bad_locator],
                  [good, "Answer: hang", "Answer: crash", good + " ", good])
    assert out == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert g.faults == {"worker hung": 1, "worker died": 1}  # the raising scorer is no fault
    assert g.score([r["gold"]], [good]) == [1.0]  # the pool recovered


def test_task_composes_the_spec():
  from helpers import task_cfg
  cfg = task_cfg(name="reasoning_gym", rg_datasets=USED[:3], num_train=30, num_val=6,
                 num_test=12, few_shot=3)
  from restem_jax import tasks
  task = tasks.get_task(cfg)
  test, train = task.problems("test"), task.problems("train")
  assert (len(train), len(task.problems("validation")), len(test)) == (30, 6, 12)
  exemplars = R.splits_for(cfg)["exemplars"]
  for p in test:  # few-shot block of the drawn exemplars, then the question line
    assert p.prompt == R.exemplar_block(exemplars) + "Question: " + p.question + "\n"
    assert p.target == ""
  human = task.human_solutions()
  assert human and all(p.id.startswith("rg/gsm_symbolic/train/") for p in human)
  assert all(p.target.startswith("Solution: ") and "\nAnswer: " in p.target for p in human)
  # Rewards through Task: reference solutions 1, a model running on into the next
  # exemplar is cut there, a missing answer line is 0.
  comps = [p.target + "\n\nQuestion: What is 1 + 1?\nAnswer: 2" for p in human]
  assert task.score(human, comps) == [1.0] * len(human)
  assert task.score(human[:1], ["Solution: no answer line"]) == [0.0]
  assert task.answer_key("Answer: 7\n\nQuestion: x\nAnswer: 9") == "7"


def test_second_test_draw_is_disjoint_and_keeps_the_prompt():
  """task.rg_test_seed: a new test split, none of whose questions the run drew (checked
  against every split of the run's own draw), under the run's prompt; train unchanged."""
  from helpers import task_cfg
  from restem_jax import tasks
  kw = dict(name="reasoning_gym", rg_datasets=USED[:2], num_train=30, num_val=6, num_test=12,
            few_shot=2)
  run, second = tasks.get_task(task_cfg(**kw)), tasks.get_task(task_cfg(rg_test_seed=5, **kw))
  drawn = {p.question for split in ("train", "validation", "test") for p in run.problems(split)}
  drawn |= {e["question"] for e in R.splits_for(task_cfg(**kw))["exemplars"]}
  new = second.problems("test")
  assert len(new) == 12 and len({p.question for p in new}) == 12
  assert not drawn & {p.question for p in new}
  assert [p.prompt for p in second.problems("train")] == [p.prompt for p in run.problems("train")]
  block = R.exemplar_block(R.splits_for(task_cfg(**kw))["exemplars"])
  assert all(p.prompt == block + "Question: " + p.question + "\n" for p in new)
  assert second.name != run.name  # its own seqio task, not the run's cached test split
  other = tasks.get_task(task_cfg(rg_test_seed=6, **kw)).problems("test")
  assert [p.question for p in other] != [p.question for p in new]


def test_distinct_answers_by_hand():
  """Distinct final answers, as the reward reads them: text after a stop is not an answer."""
  from helpers import task_cfg
  from restem_jax import evaluate, tasks
  task = tasks.get_task(task_cfg(name="reasoning_gym", rg_datasets=USED[:1], num_train=4,
                                 num_val=2, num_test=4, few_shot=1))
  texts = ["Answer: 7\n\nQuestion: x\nAnswer: 9",  # 7 (the 9 is past the stop string)
           "Solution: 3 + 4 = 7\nAnswer: 7",  # 7 again
           "Answer: 8",  # 8
           "no answer line"]  # no answer: not counted
  assert evaluate.distinct_answers(task, texts) == 2
  assert evaluate.distinct_answers(task, texts[2:]) == 1
