"""The embedded offline task: multi-step arithmetic word problems.

A GSM8K-shaped problem family that needs no download and is small enough for a
~1M-parameter model on CPU: a person starts with some objects, a chain of 1-4
events changes the count (+, -, x2/x3), and the question asks for the final count.
The worked solution is one equation per event and ends like GSM8K's chain of
thought ("... The answer is 9."), so the same answer extraction works everywhere.

Everything is a pure function of (seed, split, parameters): no global state, and
`random.Random` seeded with a string is stable across processes and Python
hash seeds.

Train/test disjointness is decided by the *arithmetic skeleton* (start value plus
the (op, operand) chain), not by the wording: a skeleton belongs to the test side
iff a stable hash of it falls in a fixed bucket. So no test computation ever
appears in training under another name or object, and this holds across seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Optional

# (name, subject pronoun, object pronoun, possessive)
_PEOPLE = (
    ("Ann", "She", "her", "her"), ("Bob", "He", "him", "his"),
    ("Cara", "She", "her", "her"), ("Dan", "He", "him", "his"),
    ("Eva", "She", "her", "her"), ("Finn", "He", "him", "his"),
    ("Gina", "She", "her", "her"), ("Hugo", "He", "him", "his"),
    ("Ivy", "She", "her", "her"), ("Jack", "He", "him", "his"),
)
_OBJECTS = ("apples", "pens", "cards", "coins", "books", "eggs", "shells",
            "stamps", "marbles", "cookies")

# Event wordings per operation. {S}=subject pronoun, {O}=object pronoun,
# {P}=possessive, {X}=another person, {n}=operand, {obj}=object noun.
_ADD = ("{S} buys {n} more.", "{S} finds {n} more.", "{X} gives {O} {n} more.",
        "{S} gets {n} more from {X}.")
_SUB = ("{S} gives {n} to {X}.", "{S} loses {n}.", "{S} sells {n}.",
        "{X} takes {n} of {P} {obj}.")
_MUL = {2: ("{S} doubles {P} {obj}.",), 3: ("{S} triples {P} {obj}.",)}

_OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
_TEST_BUCKETS = 5  # 1 in 5 skeletons is test-only.
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class ArithConfig:
  """Difficulty knobs. Defaults give sums/differences of 1-2 digit numbers."""
  min_steps: int = 1
  max_steps: int = 4
  max_start: int = 20  # Starting count is drawn from [2, max_start].
  max_operand: int = 10  # +/- operands are drawn from [1, max_operand].
  max_value: int = 40  # Every intermediate count stays in [0, max_value].
  allow_mul: bool = True  # Enables the x2 / x3 events.

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(f"need 1 <= min_steps <= max_steps, got {self}")
    if not 2 <= self.max_start <= self.max_value or self.max_operand < 1:
      raise ValueError(f"need 2 <= max_start <= max_value, max_operand >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  question: str
  solution: str  # Worked solution: one equation per step + "The answer is N."
  answer: int
  steps: int
  skeleton: tuple  # (start, ((op, operand), ...)): the arithmetic, without wording.

  @property
  def level(self) -> str:
    return f"steps={self.steps}"


def is_test_skeleton(skeleton: tuple) -> bool:
  """Whether this arithmetic belongs to the test side (stable across runs)."""
  digest = hashlib.sha256(repr(skeleton).encode()).digest()
  return int.from_bytes(digest[:8], "big") % _TEST_BUCKETS == 0


def _draw_skeleton(rng: random.Random, cfg: ArithConfig) -> tuple:
  steps = rng.randint(cfg.min_steps, cfg.max_steps)
  value = rng.randint(2, cfg.max_start)
  start = value
  chain = []
  for _ in range(steps):
    ops = []
    if value < cfg.max_value:
      ops.append("add")
    if value >= 1:
      ops.append("sub")
    if cfg.allow_mul and 2 <= value and value * 2 <= cfg.max_value:
      ops.append("mul")
    # mul is rarer: it makes problems easy and would otherwise blow up counts.
    weights = [1.0 if op != "mul" else 0.3 for op in ops]
    op = rng.choices(ops, weights)[0]
    if op == "add":
      n = rng.randint(1, min(cfg.max_operand, cfg.max_value - value))
      value += n
    elif op == "sub":
      n = rng.randint(1, min(cfg.max_operand, value))
      value -= n
    else:
      n = 3 if value * 3 <= cfg.max_value and rng.random() < 0.4 else 2
      value *= n
    chain.append((op, n))
  return start, tuple(chain)


def _render(rng: random.Random, skeleton: tuple) -> ArithProblem:
  start, chain = skeleton
  name, subj, obj_pron, poss = rng.choice(_PEOPLE)
  other = rng.choice([p[0] for p in _PEOPLE if p[0] != name])
  noun = rng.choice(_OBJECTS)
  sentences = [f"{name} has {start} {noun}."]
  equations = []
  value = start
  for op, n in chain:
    templates = {"add": _ADD, "sub": _SUB}.get(op) or _MUL[n]
    sentences.append(rng.choice(templates).format(
        S=subj, O=obj_pron, P=poss, X=other, n=n, obj=noun))
    new = {"add": value + n, "sub": value - n, "mul": value * n}[op]
    equations.append(f"{value} {_OP_SYMBOL[op]} {n} = {new}.")
    value = new
  sentences.append(f"How many {noun} does {name} have now?")
  solution = " ".join(equations + [f"The answer is {value}."])
  return ArithProblem(question=" ".join(sentences), solution=solution,
                      answer=value, steps=len(chain), skeleton=skeleton)


def generate(seed: int, split: str, n: int,
             cfg: Optional[ArithConfig] = None) -> list[ArithProblem]:
  """The first `n` problems of `split` for `seed`: unique questions, prefix-stable.

  Asking for more problems only appends: generate(s, sp, 10) is a prefix of
  generate(s, sp, 100), which keeps data-size ablations nested.
  """
  if split not in SPLITS:
    raise ValueError(f"embedded_arith split must be one of {SPLITS}, got {split!r}")
  cfg = cfg or ArithConfig()
  rng = random.Random(f"embedded_arith/{seed}/{split}/{cfg}")
  want_test = split == "test"
  out, seen = [], set()
  attempts = 0
  while len(out) < n:
    attempts += 1
    if attempts > 200 * n + 10000:
      raise ValueError(f"embedded_arith: cannot draw {n} distinct {split} problems "
                       f"with {cfg}; widen the number ranges or steps")
    skeleton = _draw_skeleton(rng, cfg)
    if is_test_skeleton(skeleton) != want_test:
      continue
    problem = _render(rng, skeleton)
    if problem.question in seen:
      continue
    seen.add(problem.question)
    out.append(problem)
  return out


_ANSWER_RE = re.compile(r"[Tt]he answer is\s*(-?[\d,]*\d)")


def extract_int_answer(text: str) -> Optional[int]:
  """The integer after the last "The answer is"; None when there is none.

  No fall-back to "last number in the text": for a tiny model that would reward
  completions that never state an answer.
  """
  matches = _ANSWER_RE.findall(text)
  if not matches:
    return None
  try:
    return int(matches[-1].replace(",", ""))
  except ValueError:
    return None


_EQUATION_RE = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def equations_hold(completion: str) -> bool:
  """Whether every "a op b = c" the completion writes is arithmetically true."""
  return all(_OPS[op](int(a), int(b)) == int(c)
             for a, op, b, c in _EQUATION_RE.findall(completion))


def exact_int_reward(gold: str, completion: str, verify_steps: bool = False) -> float:
  """1.0 iff the final integer answer equals `gold` (and, with verify_steps,
  every equation of the worked solution is true).

  Why verify_steps exists: answers here are small integers, so a sample with
  wrong arithmetic reaches the right number by chance often (14% of the kept
  samples of a first demo iteration had a false equation); training on those
  teaches false facts. Checking the shown work is this task's analogue of unit
  tests for programs - still one binary reward per sample.
  """
  got = extract_int_answer(completion)
  ok = got is not None and got == int(gold.replace(",", "").strip())
  return float(ok and (not verify_steps or equations_hold(completion)))
