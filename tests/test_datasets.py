"""The dataset registry and specs: names, fields, the cheap layout check, one gold parser,
and a spec of another shape (generator mix, own scorer in worker processes) that
plugs in without touching Task."""
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env, task_cfg
from restem_jax import tasks
from restem_jax.rewards import math as math_reward
from restem_jax.tasks import datasets, prompts

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ("embedded_arith", "gsm8k", "math", "apps", "humaneval", "gsm8k_tfds", "reasoning_gym",
         "jsonl")


def test_registry_lists_every_dataset_once():
  assert tasks.dataset_names() == NAMES
  for name in NAMES:
    assert tasks.get_spec(name).name == name


def test_unknown_dataset_is_one_line_naming_the_known_ones():
  for call in (lambda c: tasks.get_task(c), tasks.check_data):
    with pytest.raises(tasks.DataLayoutError) as e:
      call(task_cfg("gsm8", os.path.join(FIXTURES, "gsm8k")))
    msg = str(e.value)
    assert "\n" not in msg and "'gsm8'" in msg and "task.name" in msg
    assert all(repr(n) in msg for n in NAMES), msg


@pytest.mark.parametrize("name", NAMES)
def test_every_spec_has_the_fields(name):
  spec = tasks.get_spec(name)
  assert dataclasses.is_dataclass(spec) and isinstance(spec, tasks.DatasetSpec)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.name = "other"  # type: ignore[misc]
  assert spec.reward in ("exact_int", "math", "code", "reasoning_gym", "row")
  assert spec.difficulty and isinstance(spec.difficulty, str)
  assert set(spec.splits) <= {"train", "validation", "test"} and "test" in spec.splits
  assert isinstance(spec.human_solutions, bool)
  assert spec.answer_key is None or callable(spec.answer_key)
  fmt = spec.prompt_format(0)
  assert isinstance(fmt, prompts.PromptFormat) and fmt.prefix == ""
  if spec.exemplars:  # few-shot: the exemplar block grows with few_shot
    shipped = len(prompts.load_exemplars(spec.exemplars))
    assert len(spec.prompt_format(shipped).prefix) > len(spec.prompt_format(1).prefix) > 0
    with pytest.raises(ValueError, match=f"between 0 and {shipped}"):
      spec.prompt_format(shipped + 1)
  # Stop strings: each one cuts a completion where it starts.
  assert spec.stop_strings and all(isinstance(s, str) and s for s in spec.stop_strings)
  for stop in spec.stop_strings:
    assert spec.postprocess("The answer is 4." + stop + " next") == "The answer is 4."
  assert spec.postprocess("no stop here") == "no stop here"
  # A dataset that needs a data_dir says so in one line naming the layout.
  if spec.layout:
    with pytest.raises(tasks.DataLayoutError) as e:
      spec.check_layout("")
    assert "task.data_dir" in str(e.value) and spec.layout in str(e.value)
  else:
    spec.check_layout("")


def test_answer_keys_group_by_the_final_answer():
  for name in ("embedded_arith", "gsm8k", "math"):
    key = tasks.get_spec(name).answer_key
    assert key("so 3 + 4 = 7. The answer is 7.") == key("The answer is 7.") == "7"
    assert key(r"Final Answer: The final answer is $\frac{1}{2}$.") == key(r"$\boxed{1/2}$")
    assert key("no answer here") is None
  assert tasks.get_spec("apps").answer_key is None
  assert tasks.get_spec("humaneval").answer_key is None


def test_check_data_is_cheap_and_names_the_layout(tmp_path):
  """check_data reads no file and imports neither TensorFlow nor seqio (config
  validation runs it before any work)."""
  script = f"""
import sys
from conftest import task_cfg
from restem_jax import tasks
tasks.check_data(task_cfg("gsm8k", {os.path.join(FIXTURES, "gsm8k")!r}))
tasks.check_data(task_cfg("embedded_arith"))
for name, d in (("math", {os.path.join(FIXTURES, "gsm8k")!r}), ("gsm8k_tfds", {str(tmp_path)!r}),
                ("apps", {str(tmp_path / "nope")!r})):
  try:
    tasks.check_data(task_cfg(name, d))
  except tasks.DataLayoutError as e:
    print(e)
print(sorted(m for m in ("tensorflow", "seqio", "jax", "tensorflow_datasets") if m in sys.modules))
"""
  p = subprocess.run([sys.executable, "-c", script], cwd=os.path.join(ROOT, "tests"),
                     env=subprocess_env(), capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr[-2000:]
  lines = p.stdout.strip().split("\n")
  assert len(lines) == 4, p.stdout
  assert lines[0].startswith("math: ") and "train/<type>/<id>.json" in lines[0]
  assert lines[1].startswith("gsm8k_tfds: ") and "dataset_info.json" in lines[1]
  assert lines[2].startswith("apps: ") and "does not exist" in lines[2]
  assert lines[3] == "[]"


def test_gold_answers_are_the_rewards_parsers(tmp_path):
  """The readers take their gold answers from rewards.math (one implementation).
  This MATH solution boxes twice, the second time brace-less: the MATH convention
  (and rewards.math) takes the braced box, a plain last-box scan would take "2"."""
  solution = r"Both give $\boxed{1}$; with the other reading one gets \boxed 2 instead."
  for split in ("train", "test"):
    d = tmp_path / split / "algebra"
    d.mkdir(parents=True)
    (d / "1.json").write_text(json.dumps(
        {"problem": "p?", "level": "Level 1", "type": "Algebra", "solution": solution}))
  got = tasks.get_spec("math").read(str(tmp_path), "train")
  assert [r["gold"] for r in got] == ["1"] == [math_reward.math_gold(solution)]
  rows = tasks.get_spec("gsm8k").read(os.path.join(FIXTURES, "gsm8k"), "test")
  with open(os.path.join(FIXTURES, "gsm8k", "test.jsonl")) as f:
    answers = [json.loads(l)["answer"] for l in f]
  assert [r["gold"] for r in rows] == [math_reward.gsm8k_gold(a) for a in answers]


# --- A dataset of another shape, registered by one line --------------------------------
# Like reasoning-gym: a weighted mix of generators (name, weight, config), splits drawn
# by seed, worked solutions for some generators only, answers on an "Answer: ..." line,
# and the dataset's own answer checker run in worker processes.

GENERATORS = (("add", 3, {"max": 9}), ("mul", 1, {"max": 5}))
_ANSWER = re.compile(r"^Answer:\s*(.+?)\s*$", re.M)


def answer_line(text):
  found = _ANSWER.findall(text)
  return found[-1] if found else None


def score_answer(answer, entry):
  """The dataset's own checker (runs in a worker process): raises on a non-number."""
  return 0.0 if answer is None else float(int(answer) == entry["answer"])


@dataclasses.dataclass(frozen=True)
class GeneratorMix(tasks.DatasetSpec):
  generators: tuple = GENERATORS

  def split_builder(self, task_cfg, data_dir):
    sizes = {"train": int(task_cfg.num_train), "validation": int(task_cfg.num_val),
             "test": int(task_cfg.num_test)}

    def build(split):
      rng = random.Random(f"mix/{int(task_cfg.seed)}/{split}")
      out = []
      for i in range(sizes[split]):
        name, _, cfg = rng.choices(self.generators, [w for _, w, _ in self.generators])[0]
        a, b = rng.randint(1, cfg["max"]), rng.randint(1, cfg["max"])
        value = a + b if name == "add" else a * b
        entry = {"question": f"{a} {'+' if name == 'add' else '*'} {b} = ?", "answer": value}
        out.append(dict(id=f"mix/{split}/{i:05d}", question=entry["question"], hint="",
                        target=f"{a} and {b} make {value}.\nAnswer: {value}" if name == "add"
                        else "", gold=json.dumps(entry), level=name))
      return out
    return build

  def prompt_format(self, few_shot):
    return prompts.PromptFormat("", "Question: ", "\n")

  def score(self, problems, completions, task_cfg, workers):
    pool = workers.get("mix", lambda: concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")))
    answers = [answer_line(self.postprocess(c)) for c in completions]
    return list(pool.map(score_answer, answers, [json.loads(p.gold) for p in problems]))


MIX = GeneratorMix(name="generator_mix", reward="own_checker", stop_strings=("\nQuestion:",),
                   difficulty="the generator's name", splits=("train", "validation", "test"),
                   answer_key=answer_line)


def test_a_new_kind_of_dataset_needs_only_its_spec(monkeypatch):
  monkeypatch.setitem(datasets.SPECS, MIX.name, MIX)  # The one registry line.
  assert MIX.name in tasks.dataset_names()
  t = tasks.get_task(task_cfg(MIX.name, num_train=30, num_val=5, num_test=10))
  train, val, test = (t.problems(s) for s in ("train", "validation", "test"))
  assert (len(train), len(val), len(test)) == (30, 5, 10)
  assert t.name.startswith("restem_generator_mix_") and test[0].prompt.startswith("Question: ")
  human = t.human_solutions()
  assert human and {p.level for p in human} == {"add"}  # Solutions for some generators only.
  assert {p.level for p in train} == {"add", "mul"}
  other_seed = tasks.get_task(task_cfg(MIX.name, num_train=30, num_val=5, num_test=10, seed=1))
  assert other_seed.name != t.name and other_seed.problems("test") != test
  try:
    ps = test[:4]
    golds = [json.loads(p.gold)["answer"] for p in ps]
    completions = [f"Answer: {golds[0]}\nQuestion: 1 + 1 = ?\nAnswer: 2",
                   f"Answer: {golds[1] + 1}", "Answer: twelve", "I do not know"]
    # "twelve" raises in the worker: that item alone scores 0 (Task's robust scoring).
    assert t.score(ps, completions) == [1.0, 0.0, 0.0, 0.0]
    assert t.score(ps[:1], [f"Answer: {golds[0]}"]) == [1.0]
    assert t.answer_key("3 and 4 make 7.\nAnswer: 7") == "7"
  finally:
    t.workers.get("mix", lambda: None).shutdown()
