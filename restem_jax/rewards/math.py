r"""Binary reward for MATH / GSM8K: extract the final answer, compare it with the gold.

Zero false positives come first: a reward of 1 must mean the answer is right, so a text
that changes its mind scores 0 (`extract_answer_strict`), and math_verify's symbolic
verdict counts only when our own sympy cross-check agrees (`is_equiv`: rejects its known
false positives, its issues #14, #41, #60). The false negatives this accepts are listed
at `is_equiv`. Symbolic checks run in spawned worker processes (math_verify relies on
signals, which fail in threads) under a CPU-time limit; a worker stuck in C or dead is
replaced and its pair scores 0 with the fault counted (rewards/pool.py). Model output
never raises; an empty gold raises ValueError.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import random
import re
import signal
import threading
from typing import Any

from restem_jax.rewards import pool

_MAX_ANSWER_CHARS = 1000  # Longer "answers" are degenerate output; also bounds sympy work.

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# GSM8K's `#### 42` (a number only: a markdown heading `#### Step 1: ...` is not one).
_HASH_RE = re.compile(r"####[ \t]*([-+]?\$?\d[\d,]*(?:\.\d+)?)\.?[ \t]*(?:\n|$)")
_ANSWER_IS_RE = re.compile(r"\banswer\s+is\s*:?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_UNIT_TAIL_RE = re.compile(r"(-?\$?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z]+(?:\s+[A-Za-z]+)?")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# "I hope the answer is correct": a verdict, not an answer.
_VERDICTS = {"correct", "incorrect", "right", "wrong", "valid", "reasonable", "plausible"}


def _brace_pairs(text: str) -> dict[int, int]:
  r"""Index of every `{` -> index of its matching `}`, in one linear pass.

  `\{` and `\}` are literal braces (set notation), not grouping: skipped. One pass
  keeps a degenerate "\boxed{\boxed{..." output linear instead of quadratic.
  """
  pairs, stack, i = {}, [], 0
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2
      continue
    if ch == "{":
      stack.append(i)
    elif ch == "}" and stack:
      pairs[stack.pop()] = i
    i += 1
  return pairs  # An unclosed `{` (truncated generation) has no entry.


def _boxes(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """(braced, brace-less) box contents with their positions, in text order."""
  braced, bare = [], []
  pairs = _brace_pairs(text) if _BOX_RE.search(text) else {}
  for m in _BOX_RE.finditer(text):
    j = m.end()
    while j < len(text) and text[j] in " \t":
      j += 1
    if j < len(text) and text[j] == "{":
      content = text[j + 1:pairs[j]].strip() if j in pairs else ""
      if content:
        braced.append((m.start(), content))
    elif m.end() < j:  # `\boxed 7`: the token up to whitespace or a closing `$`.
      tok = re.match(r"[^\s$]+", text[j:])
      if tok and tok.group(0).rstrip(".,;"):
        bare.append((m.start(), tok.group(0).rstrip(".,;")))
  return braced, bare


def _answer_is(text: str) -> list[tuple[int, str]]:
  """The X of every "the answer is X", in text order."""
  out = []
  for m in _ANSWER_IS_RE.finditer(text):
    rest = text[m.end():m.end() + 2 * _MAX_ANSWER_CHARS]
    ans = None
    for open_, close in _MATH_DELIMS:
      if rest.startswith(open_):
        end = rest.find(close, len(open_))
        ans = rest[len(open_):end] if end > 0 else None
        break
    if ans is None:
      line = rest.split("\n", 1)[0]
      ans = re.split(r"[.!?](?:\s|$)", line, maxsplit=1)[0].replace("$", "")
      unit = _UNIT_TAIL_RE.fullmatch(ans.strip())
      if unit:  # "The answer is 18 dollars." -> "18".
        ans = unit.group(1)
      words = ans.split()
      if words and not re.search(r"[\d\\^_=+*/()]", ans) and (
          len(words) > 1 or words[0].lower() in _VERDICTS):
        continue  # Prose ("correct", "the same as before"), not a stated answer.
    if _BOX_RE.search(ans):  # "answer is $\boxed{5}$": the box is already a candidate.
      continue
    ans = ans.strip().rstrip(".")
    if ans:
      out.append((m.start(), ans))
  return out


def _candidates(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  braced, bare = _boxes(text)
  stated = [(m.start(), m.group(1)) for m in _HASH_RE.finditer(text)]
  stated = sorted(stated + _answer_is(text))
  return (braced or bare), stated


def _last_number(text: str) -> str | None:
  nums = _NUMBER_RE.findall(text)
  return nums[-1].replace(",", "") if nums else None


def extract_answer(text: str, *, fallback_last_number: bool = False) -> str | None:
  r"""The final answer in a model output or a solution; None when there is none.

  Candidates: braced `\boxed{..}` / `\fbox{..}` (brace-matched; `\{ \}` are literal);
  brace-less `\boxed 7`, used only when there is no braced box (so a stray later
  `\boxed 7` cannot hide an earlier `\boxed{..}`); GSM8K `#### 42`; "the (final) answer
  is X" (X = the `$..$` / `\(..\)` that follows, else the rest of the sentence, "18
  dollars" -> "18"). Empty or unclosed boxes are ignored. The answer: the last box (MATH
  convention), else the last `####` / "answer is" statement, else, only with
  fallback_last_number=True, the last number.
  """
  if not isinstance(text, str):
    return None
  boxes, stated = _candidates(text)
  if boxes:
    return boxes[-1][1]
  if stated:
    return stated[-1][1]
  return _last_number(text) if fallback_last_number else None


def extract_answer_strict(text: str, *, fallback_last_number: bool = False) -> str | None:
  """Like `extract_answer`, but None (reward 0) when the text changes its mind: two boxes
  that differ after `normalize_answer`, or a statement at/after the first box that
  differs from it (statements before the first box are reasoning); with no box, all
  statements must agree. Answers over 1000 characters are rejected."""
  if not isinstance(text, str):
    return None
  boxes, stated = _candidates(text)
  if boxes:
    first_box = boxes[0][0]
    final = boxes + [s for s in stated if s[0] >= first_box]
  else:
    final = stated
  if not final:
    return _last_number(text) if fallback_last_number else None
  if any(len(a) > _MAX_ANSWER_CHARS for _, a in final):
    return None  # Degenerate output; also keeps normalisation cheap.
  if len({normalize_answer(a) for _, a in final}) > 1:
    return None  # The model changed its mind: no single answer to reward.
  return (boxes or stated)[-1][1]


def gsm8k_gold(answer_field: str) -> str:
  """GSM8K's "answer" field -> the number after `####`, commas removed."""
  if not answer_field or "####" not in answer_field:
    raise ValueError(f"GSM8K answer field has no '####': {str(answer_field)[-80:]!r}")
  gold = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
  if not gold:
    raise ValueError("GSM8K answer field has nothing after '####'")
  return gold


def math_gold(solution_field: str) -> str:
  """MATH's "solution" field -> the content of its last box."""
  braced, bare = _boxes(solution_field or "")
  if not (braced or bare):
    raise ValueError(f"MATH solution has no \\boxed answer: {str(solution_field)[-80:]!r}")
  return (braced or bare)[-1][1]


# ----------------------------------------------------------------------------- normalisation

# A unit: `\text{ cm}` / `5 \text{cm}` (space), or a common unit word (`5\text{cm}`);
# not any `\text{..}` glued to a number, nor `\mathrm` (`3\mathrm{i}` is a number).
_UNITS = ("cm|mm|m|km|in|inch|inches|ft|foot|feet|yd|yards?|miles?|units?|sq|degrees?|"
          "dollars?|cents?|seconds?|minutes?|hours?|days?|weeks?|years?|meters?|grams?|kg|g")
_UNIT_RE = re.compile(
    r"^(.*?[\d}])(?:\s*\\(?:text|mbox)\{\s+[A-Za-z][A-Za-z .]*|\s+\\(?:text|mbox)\{"
    r"[A-Za-z][A-Za-z .]*|\s*\\(?:text|mbox)\{(?:" + _UNITS + r"))\}(?:\^\{?\d\}?)?$")
_TEXT_ONLY_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}$")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _clean(ans: str) -> str:
  """Meaning-preserving cleanup; keeps spaces, so the result is still valid LaTeX."""
  s = re.sub(r"(\d)\\,(?=\d{3}(?!\d))", r"\1", ans.strip().replace("\n", " "))  # 1\,000
  # Thin spaces `\,` `\;` `\ ` -> space, `\!` -> nothing; a `\\` row break is kept.
  s = re.sub(r"\\\\|\\[,;: !]",
             lambda m: m.group(0) if m.group(0) == "\\\\" else " " * (m.group(0) != "\\!"), s)
  s = s.replace("~", " ")
  s = re.sub(r"(\d)\{,\}(?=\d)", r"\1", s)  # 1{,}000
  s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])", "", s)
  s = re.sub(r"\\displaystyle(?![A-Za-z])", "", s)
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])", "", s)
  s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
  for _ in range(2):  # `5\text{ cm}.` : units and trailing dots in either order.
    s = s.strip().rstrip(".").strip()
    m = _UNIT_RE.match(s)
    if m and re.search(r"\d", m.group(1)):
      s = m.group(1)
  m = _TEXT_ONLY_RE.match(s)
  if m:
    s = m.group(1).strip()
  if _THOUSANDS_RE.fullmatch(s):
    s = s.replace(",", "")
  return s


def _fix_fracs(s: str) -> str:
  r"""`\frac12` -> `\frac{1}{2}` (and `\frac1{2}`, `\frac{1}2`)."""
  out, i, pairs = [], 0, _brace_pairs(s)
  while True:
    j = s.find("\\frac", i)
    if j < 0:
      return "".join(out) + s[i:]
    out.append(s[i:j] + "\\frac")
    k = j + 5
    for _ in range(2):
      if k < len(s) and s[k] == "{":
        end = pairs.get(k)
        if end is None:
          break
        out.append(s[k:end + 1])
        k = end + 1
      elif k < len(s) and s[k] != "\\":
        out.append("{" + s[k] + "}")
        k += 1
    i = k


def normalize_answer(ans: str) -> str:
  r"""Hendrycks-style canonical string; equal strings mean equal answers: \left, \right,
  `\text{ cm}` units, degrees, `\$`, `%`, dfrac/tfrac, `\frac12`, `a/b`, `\sqrt3`,
  `1{,}000` / `1,000`, spaces, trailing `.`, a leading `x=` (so `10\%` equals `10` and
  `5\text{ cm}` equals `5`, as in Hendrycks' grader)."""
  if not isinstance(ans, str):
    return ""
  s = _clean(ans)
  s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
  # Spaces go, except between digits: `2 3` is not `23` (nor `6`, as sympy reads it).
  s = re.sub(r"\s+", lambda m: " " if re.fullmatch(r"\d\s+\d", s[max(m.start() - 1, 0):
                                                             m.end() + 1]) else "", s)
  s = _fix_fracs(s)
  m = re.fullmatch(r"(-?\d+)/(\d+)", s)
  if m:
    s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
  s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # .5 -> 0.5
  m = re.fullmatch(r"[A-Za-z]=([^=]+)", s)  # "x=5" -> "5": the variable is not the answer.
  if m:
    s = m.group(1)
  return s


# ----------------------------------------------------------------------------- symbolic layer
# From here to `_worker_main`: runs in worker processes only (sympy is imported there).


_CheckTimeout = pool.CheckTimeout  # (names kept for rewards/reasoning_gym.py and tests)
_on_timer = pool.on_timer
serve_checks = pool.serve_checks
Grade = pool.Grade


def _values(exprs: tuple, seed: int) -> list[tuple]:
  """The exprs evaluated to 50 digits at 3 fixed points of their free symbols.

  Fixed points: the same answer always gets the same reward. Signed: |x| vs x differ.
  """
  import sympy  # pylint: disable=import-outside-toplevel
  syms = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
  rng = random.Random(seed)
  out = []
  for _ in range(3 if syms else 1):
    point = {x: sympy.Rational(rng.choice((-1, 1)) * rng.randint(300, 2100), 1000)
             for x in syms}
    out.append(tuple(sympy.N(e.subs(point), 50) for e in exprs))
  return out


def _exact(e: Any) -> Any:
  """Decimals as exact rationals: 0.5 = 1/2 exactly, 3.14159265358979 != pi."""
  import sympy  # pylint: disable=import-outside-toplevel
  return e.replace(lambda x: isinstance(x, sympy.Float), lambda f: sympy.Rational(str(f)))


def _close(va: Any, vb: Any) -> bool:
  import sympy  # pylint: disable=import-outside-toplevel
  bad = (sympy.nan, sympy.zoo)
  if not (va.is_number and vb.is_number) or va.has(*bad) or vb.has(*bad):
    return False  # Cannot tell: reject rather than trust a possible false positive.
  if va.has(sympy.oo) or vb.has(sympy.oo):
    return va == vb
  scale = max(abs(va), abs(vb))  # Relative: 1/2004! vs 1/2006! differ at full magnitude.
  return scale == 0 or bool(abs(va - vb) <= scale * sympy.Float("1e-30", 50))


def _num_equal(a: Any, b: Any) -> bool:
  a, b = _exact(a), _exact(b)
  return a == b or all(_close(va, vb) for va, vb in _values((a, b), 1234))


def _proportional(da: Any, db: Any) -> bool:
  """Whether da = c * db for a constant c != 0: the same equation, rescaled."""
  if not (da.free_symbols | db.free_symbols):
    return False
  vals = _values((_exact(da), _exact(db)), 4321)
  if any(vb == 0 or not (va.is_number and vb.is_number) for va, vb in vals):
    return False
  ratios = [va / vb for va, vb in vals]
  return ratios[0] != 0 and all(_close(r, ratios[0]) for r in ratios[1:])


def _match_sets(xs: list, ys: list) -> bool:
  ys = list(ys)
  for x in xs:
    hit = next((k for k, y in enumerate(ys) if _agree(x, y)), None)
    if hit is None:
      return False
    ys.pop(hit)
  return not ys


def _agree(a: Any, b: Any) -> bool:  # pylint: disable=too-many-return-statements
  """Our own cross-check of a pair math_verify called equal: structure, then values."""
  import sympy  # pylint: disable=import-outside-toplevel
  from sympy.matrices import MatrixBase  # pylint: disable=import-outside-toplevel
  if isinstance(a, MatrixBase) or isinstance(b, MatrixBase):
    return (isinstance(a, MatrixBase) and isinstance(b, MatrixBase) and a.shape == b.shape
            and all(_agree(x, y) for x, y in zip(a, b)))
  if isinstance(a, sympy.Eq) and isinstance(b, sympy.Eq):
    if a.lhs == b.lhs and isinstance(a.lhs, sympy.Symbol):
      return _agree(a.rhs, b.rhs)  # `n = 1,2,3` vs `n = 2,3,4`: compare the values.
    return _proportional(a.lhs - a.rhs, b.lhs - b.rhs)  # `2y=4x+6` vs `y=2x+3`.
  for x, y in ((a, b), (b, a)):
    if isinstance(x, sympy.Eq) and isinstance(x.lhs, sympy.Symbol):
      return _agree(x.rhs, y)  # `x = 2` (or `x \in [1,2]`) vs `2`.
    if isinstance(x, sympy.FiniteSet) and len(x) == 1 and isinstance(y, sympy.Expr):
      return _agree(next(iter(x)), y)  # `\{2\}` vs `2`.
  if isinstance(a, sympy.Rel) or isinstance(b, sympy.Rel):
    if type(a) is type(b):
      return _agree(a.lhs, b.lhs) and _agree(a.rhs, b.rhs)
    try:  # `x > 3` vs `(3, \infty)`: compare as sets.
      a2, b2 = (x.as_set() if isinstance(x, sympy.Rel) else x for x in (a, b))
    except Exception:  # pylint: disable=broad-except
      return False
    return not isinstance(a2, sympy.Rel) and not isinstance(b2, sympy.Rel) and _agree(a2, b2)
  if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
    return _match_sets(list(a), list(b))  # Unordered, sizes must match.
  if isinstance(a, sympy.Union) and isinstance(b, sympy.Union):
    return _match_sets(list(a.args), list(b.args))
  if isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple):
    return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b))
  if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
    return (a.left_open == b.left_open and a.right_open == b.right_open
            and _agree(a.start, b.start) and _agree(a.end, b.end))
  if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
    return _num_equal(a, b)
  return a == b  # Any other structure: only exact equality.


def _symbolic_equal(gold: str, pred: str) -> bool:
  from math_verify import LatexExtractionConfig, parse, verify  # pylint: disable=import-outside-toplevel
  if ("\\pm" in gold) != ("\\pm" in pred) or ("\\mp" in gold) != ("\\mp" in pred):
    return False
  if re.search(r"\d\s+\d", gold + " x " + pred):
    return False  # `2 3`: sympy multiplies, a reader sees 23 or a list. Strings only.
  # math_verify's own timeouts off: they would reset our timer, which covers it all.
  g, p = (parse("$" + x + "$", extraction_config=[LatexExtractionConfig()],
                parsing_timeout=None) for x in (gold, pred))
  if not verify(g, p, timeout_seconds=None):  # GOLD FIRST: verify is not symmetric.
    return False
  gs = [x for x in g if not isinstance(x, str)]
  ps = [x for x in p if not isinstance(x, str)]
  return bool(gs and ps and _agree(gs[0], ps[0]))


def _check_in_worker(gold: str, pred: str, timeout_s: float) -> bool:
  # CPU time, not wall time: the same pair gets the same reward on a loaded machine.
  signal.signal(signal.SIGPROF, _on_timer)
  signal.setitimer(signal.ITIMER_PROF, timeout_s)
  try:
    return _symbolic_equal(gold, pred)
  except (Exception, _CheckTimeout, RecursionError):  # pylint: disable=broad-except
    return False
  finally:
    signal.setitimer(signal.ITIMER_PROF, 0)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
  logging.disable(logging.WARNING)  # math_verify logs every failed parse.
  _check_in_worker("1", "\\frac{2}{2}", 30.0)  # Import and warm sympy/antlr first.
  serve_checks(conn, _check_in_worker)


# ----------------------------------------------------------------------------- grader


class MathGrader(pool.GraderPool):
  """Scores model outputs against gold answers with a pool of checker processes
  (rewards/pool.py: a worker that hangs in C or dies is replaced alone, its pair
  scores 0 with the fault counted). Spawned processes: a calling script needs the
  `if __name__ == "__main__":` guard."""

  _worker_target = staticmethod(_worker_main)  # Tests swap in a deliberately hanging one.
  start_hint = "math-verify missing"

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
               fallback_last_number: bool = False):
    super().__init__(num_workers=num_workers, timeout_s=timeout_s)
    self.fallback_last_number = fallback_last_number

  def score(self, golds: list[str], outputs: list[str]) -> list[float]:
    """1.0/0.0 per (gold answer, full model output) pair."""
    return [g.reward for g in self.score_detailed(golds, outputs)]

  def score_detailed(self, golds: list[str], outputs: list[str]) -> list[Grade]:
    """Like `score`, with the grader fault (if any) that cost each sample."""
    if len(golds) != len(outputs):
      raise ValueError(f"score: {len(golds)} golds but {len(outputs)} outputs")
    for i, g in enumerate(golds):
      if not isinstance(g, str) or not g.strip():
        raise ValueError(f"score: gold answer #{i} is empty or not a string: {g!r}")
    preds = []
    for o in outputs:
      try:
        preds.append(extract_answer_strict(o, fallback_last_number=self.fallback_last_number))
      except Exception:  # pylint: disable=broad-except
        preds.append(None)  # Never let odd output crash a generation run.
    return self._grade(list(golds), preds, self.timeout_s)

  def score_answers(self, golds: list[str], answers: list[str | None]) -> list[Grade]:
    """Grades of answers already extracted from their outputs (None: no answer, 0)."""
    if len(golds) != len(answers):
      raise ValueError(f"score: {len(golds)} golds but {len(answers)} answers")
    return self._grade(list(golds), list(answers), self.timeout_s)

  def _grade(self, golds: list[str], preds: list[str | None], timeout_s: float) -> list[Grade]:
    grades = [Grade(0.0)] * len(golds)
    todo: dict[tuple[str, str], list[int]] = {}  # Unique pairs: samples repeat answers.
    for i, (g, p) in enumerate(zip(golds, preds)):
      if not p or len(p) > _MAX_ANSWER_CHARS:
        continue
      if normalize_answer(g) == normalize_answer(p):
        grades[i] = Grade(1.0)
      else:
        todo.setdefault((_clean(g), _clean(p)), []).append(i)
    if todo:
      pairs = list(todo)
      for pair, (ok, fault) in zip(pairs, self._run(pairs, timeout_s)):
        for i in todo[pair]:
          grades[i] = Grade(1.0 if ok else 0.0, fault)
          if fault:
            self.faults[fault] += 1
    return grades


_SHARED: MathGrader | None = None
_SHARED_LOCK = threading.Lock()  # A grader is not thread-safe; is_equiv may be called from many.


def is_equiv(gold: str, pred: str, *, timeout_s: float = 5.0) -> bool:
  r"""Whether the extracted answer `pred` equals `gold` (symbolic part in a subprocess).

  Equal iff (a) the `normalize_answer` strings are equal, or (b) math_verify's
  `verify(gold, pred)` (gold first: not symmetric) AND our cross-check agree: the same
  `\pm` / `\mp` on both sides; both parse to sympy; sets, tuples, intervals (open/closed
  ends), unions and matrices match in size and element by element; `x = v` compares v;
  expressions (decimals read as exact rationals) agree to a relative 1e-30 at 50 digits,
  at three fixed signed points if they have symbols; rescaled equations agree; other
  structures must be equal. This rejects `n=2,3,4` vs `n=1,2,3`, `1/2004!` vs `1/2006!`,
  `\pm 2021` vs `2021`, `4` vs `4\sqrt{2}`, and rounding (`0.333333` vs 1/3).

  False negatives accepted: rounded decimals of non-terminating values (`3.1416` for pi);
  `\pm 2` vs `-2, 2` (one-sided by design); restating the answer in another form
  (`\boxed{0.5}` then "the answer is 1/2") or prose after "the answer is" beyond a number
  and one or two unit words; `(3, \infty)` as gold vs `x > 3`; `\text{..}` units glued to
  a number other than common unit words; a check slower than timeout_s of CPU time.
  Shares one 1-worker MathGrader behind a lock (a MathGrader is not thread-safe).
  """
  global _SHARED
  if not isinstance(gold, str) or not gold.strip():
    raise ValueError(f"is_equiv: gold answer is empty or not a string: {gold!r}")
  if not isinstance(pred, str) or not pred.strip():
    return False
  with _SHARED_LOCK:
    if _SHARED is None:
      _SHARED = MathGrader(num_workers=1, timeout_s=timeout_s)
      atexit.register(_SHARED.close)
    return _SHARED._grade([gold], [pred.strip()], float(timeout_s))[0].reward == 1.0  # pylint: disable=protected-access
