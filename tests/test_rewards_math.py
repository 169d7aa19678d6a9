"""Math reward: extraction, normalisation, symbolic equivalence, pool robustness."""
import logging
import os
import signal
import threading
import time

import pytest

from helpers import misbehaving_grader
from restem_jax.rewards import math as rm

B = r"\boxed"

# (gold answer, full model output, expected reward). Written by hand.
CASES = [
    # --- true matches ---
    ("0.5", B + r"{\frac12}", 1.0),
    (r"\frac12", B + "{0.5}", 1.0),
    ("0.5", B + "{.5}", 1.0),
    ("1000", B + "{1{,}000}", 1.0),
    ("1000", B + "{1,000}", 1.0),
    ("1000", B + r"{1\,000}", 1.0),
    ("(x+1)^2", B + "{x^2+2x+1}", 1.0),
    ("2x^2-3", B + "{2x^{2} - 3}", 1.0),
    ("[1,2)", B + "{[1, 2)}", 1.0),
    (r"\{1,2\}", B + r"{\{2,1\}}", 1.0),
    ("1,2,3", B + "{3, 2, 1}", 1.0),
    ("30", B + r"{30^\circ}", 1.0),
    (r"30^\circ", B + "{30}", 1.0),
    ("30", B + r"{30^{\circ}}", 1.0),
    ("5", B + r"{\$5}", 1.0),
    (r"\$5", "So she pays 5 dollars in total. The answer is $5$.", 1.0),
    (r"\frac34", B + r"{\dfrac{3}{4}}", 1.0),
    (r"\frac{3}{4}", B + r"{\tfrac34}", 1.0),
    ("3/4", B + r"{\frac{3}{4}}", 1.0),
    ("(1,2)", B + r"{\left(1,2\right)}", 1.0),
    ("5", B + r"{5\text{ cm}}", 1.0),
    (r"12\text{ inches}", B + "{12}", 1.0),
    ("10\\%", B + "{10}", 1.0),
    (r"\frac{\sqrt{3}}{2}", B + r"{\frac{1}{2}\sqrt3}", 1.0),
    (r"\frac{\sqrt2}{2}", B + r"{\frac{1}{\sqrt{2}}}", 1.0),
    ("2", B + r"{\sqrt{4}}", 1.0),
    ("x=2", B + "{2}", 1.0),
    ("2", B + "{x = 2}", 1.0),
    ("y=2x+3", B + "{y = 3 + 2x}", 1.0),
    ("y=2x+3", B + "{2y=4x+6}", 1.0),
    (r"-\frac{1}{2}", B + r"{\frac{-1}{2}}", 1.0),
    (r"(-\infty, 3]", B + r"{(-\infty,3]}", 1.0),
    (r"(1,2)\cup(3,4)", B + r"{(3,4) \cup (1,2)}", 1.0),
    (r"\text{Monday}", B + "{Monday}", 1.0),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", B + r"{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", 1.0),
    ("3", B + "{3.0}", 1.0),
    ("2.5", B + r"{\frac52}", 1.0),
    ("x>3", B + r"{(3,\infty)}", 1.0),
    (r"\pm 2", B + r"{\pm2}", 1.0),
    ("720", B + "{6!}", 1.0),
    (r"\frac{\sqrt{3}}{3}", B + r"{\frac{1}{\sqrt{3}}}", 1.0),
    ("1024", B + "{2^{10}}", 1.0),
    (r"\frac{-3}{4}", B + "{-0.75}", 1.0),
    (r"\text{(A)}", B + "{A}", 1.0),
    ("42", "Natalia sold 48/2 = 24 clips in May.\n#### 42", 1.0),
    ("9", "#### Step 1: add\n4 + 5 = 9\n#### Answer\n" + B + "{9}", 1.0),  # Markdown.
    ("5", B + "{5}. I hope the answer is correct.", 1.0),
    ("1234", "Total: 1,234 units.\n#### 1,234", 1.0),
    ("18", "She makes 9 * 2 = 18 dollars. The answer is 18.", 1.0),
    ("18", "The answer is 18 dollars.", 1.0),
    ("7", "Final Answer: The final answer is $7$. I hope it is correct.", 1.0),
    ("5", "so x = " + B + "{5}. The answer is $" + B + "{5}$.", 1.0),
    ("4", "Thus $" + B + " 4$.", 1.0),
    ("5", "If the answer is 6 then 2x=12, impossible; so " + B + "{5}.", 1.0),
    # --- near misses that MUST be rejected ---
    ("n=1,2,3", B + "{n=2,3,4}", 0.0),
    ("1,2,3", B + "{2,3,4}", 0.0),
    (r"\frac{1}{2004!}", B + r"{\frac{1}{2006!}}", 0.0),
    ("2021", B + r"{\pm 2021}", 0.0),
    (r"\pm 2021", B + "{2021}", 0.0),
    ("4", B + r"{4\sqrt(2)}", 0.0),
    ("4", B + r"{4\sqrt{2}}", 0.0),
    (r"4\sqrt{2}", B + "{4}", 0.0),
    ("5", B + "{5} Wait, that is wrong. " + B + "{6}", 0.0),
    ("6", B + "{5} Wait, that is wrong. " + B + "{6}", 0.0),
    ("5", "The answer is 5. Wait, the answer is 6.", 0.0),
    ("6", "The answer is 5. Wait, the answer is 6.", 0.0),
    ("5", B + "{5}. Hmm, actually the answer is 6.", 0.0),
    ("[1,2)", B + "{[1,2]}", 0.0),
    ("[1,2)", B + "{(1,2)}", 0.0),
    ("x>3", B + r"{[3,\infty)}", 0.0),
    (r"\frac13", B + "{0.33}", 0.0),
    (r"\frac13", B + "{0.333333}", 0.0),
    (r"2\pi", B + "{6.283185}", 0.0),
    ("-3", B + "{3}", 0.0),
    ("3", B + "{-3}", 0.0),
    ("x-1", B + "{1-x}", 0.0),
    ("12", B + "{1.2}", 0.0),
    ("1", B + "{1.0000001}", 0.0),
    ("1000", B + "{100}", 0.0),
    ("(1,2)", B + "{(2,1)}", 0.0),
    (r"\{1,2\}", B + r"{\{1,2,3\}}", 0.0),
    ("2", B + r"{\{2,3\}}", 0.0),
    ("y=2x+3", B + "{2y=4x+7}", 0.0),
    ("x^2", B + "{x^3}", 0.0),
    ("x+1", B + "{y+1}", 0.0),
    ("3", B + "{3x}", 0.0),
    (r"\sqrt{2}", B + "{2}", 0.0),
    ("0.1", B + r"{10\%}", 0.0),
    (r"\frac{1}{2}", B + r"{\frac{1}{3}}", 0.0),
    (r"\infty", B + r"{-\infty}", 0.0),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", B + r"{\begin{pmatrix}1\\3\end{pmatrix}}", 0.0),
    (r"\pi", B + "{3.14159265358979}", 0.0),  # Within math_verify's tolerance.
    ("|x|", B + "{x}", 0.0),
    (r"\sqrt{x^2}", B + "{x}", 0.0),
    (r"1000!", B + "{1001!}", 0.0),
    ("10^{30}", B + "{10^{30}+1}", 0.0),
    (r"\mp 1", B + r"{\pm 1}", 0.0),
    ("y=2x+3", B + "{x=2y+3}", 0.0),
    ("x>3", B + r"{x \ge 3}", 0.0),
    ("5", B + r"{\{5,6\}}", 0.0),
    ("23", B + "{2 3}", 0.0),
    ("6", B + "{2 3}", 0.0),  # sympy reads `2 3` as 2*3.
    ("5", "I think it is 5", 0.0),  # No final-answer marker, fallback off.
    ("5", B + "{5", 0.0),  # Unclosed box.
    ("5", B + "{}", 0.0),
    ("5", "", 0.0),
    ("42", "#### 41", 0.0),
]


@pytest.fixture(scope="module")
def grader():
  with rm.MathGrader(num_workers=2, timeout_s=5.0) as g:
    yield g


@pytest.fixture(scope="module")
def table_scores(grader):
  return grader.score([c[0] for c in CASES], [c[1] for c in CASES])


def test_table_is_big_enough():
  assert len(CASES) >= 60
  assert sum(c[2] == 0.0 for c in CASES) >= 30


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"{c[0]}|{c[1][:30]}" for c in CASES])
def test_table(table_scores, idx):
  gold, output, expected = CASES[idx]
  assert table_scores[idx] == expected, (gold, output)


def test_gold_order_is_respected_and_single_calls_agree(grader):
  # The same pairs one at a time (no batching/dedup effects).
  for gold, output, expected in CASES[::7]:
    assert grader.score([gold], [output]) == [expected], (gold, output)


# --- extraction ---


@pytest.mark.parametrize("text,expected", [
    (B + r"{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
    (B + "{3} then " + B + "{5}", "5"),  # Last box wins.
    (r"\fbox{7}", "7"),
    (B + r"{\{1,2\}}", r"\{1,2\}"),  # Escaped braces do not close the box.
    (B + "{2} and later " + B + " 7", "2"),  # Brace-less box cannot hide a braced one.
    ("so $" + B + " 7$.", "7"),  # ... but counts when there is no braced box.
    ("#### 1,234", "1,234"),
    (r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
    ("The final answer is 3.5.", "3.5"),
    ("the answer is: 12 apples.", "12"),
    (B + "{3", None),  # Unclosed.
    ("no answer", None),
    ("", None),
])
def test_extract_answer(text, expected):
  assert rm.extract_answer(text) == expected


def test_extract_fallback_last_number():
  text = "We get 3 apples, then 1,250 more and -2.5 back"
  assert rm.extract_answer(text) is None
  assert rm.extract_answer(text, fallback_last_number=True) == "-2.5"
  assert rm.extract_answer("Total 1,250", fallback_last_number=True) == "1250"
  with rm.MathGrader(num_workers=1, fallback_last_number=True) as g:
    assert g.score(["1250"], ["so the total is 1,250"]) == [1.0]


def test_extract_strict_changes_of_mind():
  assert rm.extract_answer_strict(B + "{5} ... " + B + "{6}") is None
  assert rm.extract_answer_strict("The answer is 5. No, the answer is 6.") is None
  assert rm.extract_answer_strict(B + "{5} so the answer is 6") is None
  assert rm.extract_answer_strict(B + r"{\frac12} ... " + B + r"{\dfrac{1}{2}}") == r"\dfrac{1}{2}"
  assert rm.extract_answer_strict("the answer is 6? no: " + B + "{5}") == "5"


def test_gold_helpers():
  assert rm.gsm8k_gold("48/2 = <<48/2=24>>24\n#### 1,072") == "1072"
  assert rm.math_gold(r"So $x=" + B + r"{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
  assert rm.math_gold(B + "{1} or " + B + "{2}") == "2"
  with pytest.raises(ValueError):
    rm.gsm8k_gold("no marker")
  with pytest.raises(ValueError):
    rm.math_gold("no box")


@pytest.mark.parametrize("ans,expected", [
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"\dfrac12", r"\frac{1}{2}"),
    ("3/4", r"\frac{3}{4}"),
    (r"1{,}000", "1000"),
    ("1,000.", "1000"),
    (r"5\text{ cm}^2", "5"),
    (r"90^\circ", "90"),
    (r"\$ 4.50", "4.50"),
    (r"\sqrt3", r"\sqrt{3}"),
    ("x = 7", "7"),
    ("1, 2", "1,2"),  # A list, not a thousands separator.
])
def test_normalize_answer(ans, expected):
  assert rm.normalize_answer(ans) == expected


# --- robustness ---


def test_empty_gold_raises(grader):
  for bad in ["", "  ", None]:
    with pytest.raises(ValueError, match="gold"):
      grader.score([bad], [B + "{1}"])
  with pytest.raises(ValueError):
    rm.is_equiv("", "1")
  with pytest.raises(ValueError):
    grader.score(["1", "2"], ["1"])


def test_weird_outputs_score_zero(grader):
  weird = [None, 123, "\\boxed{" * 5000, "\\boxed{" * 500, "}" * 100 + "\\boxed{x^^^}", "$" * 50, "\\boxed{" +
           "(" * 300 + "}", "\\boxed{" + "1" * 5000 + "}", "\x00\\boxed{\x00}"]
  assert grader.score(["1"] * len(weird), weird) == [0.0] * len(weird)


def test_pathological_input_times_out_and_grader_recovers():
  # 10^{10^{10}}: sympy would build a 10^10-digit integer; the in-worker timer stops it.
  with rm.MathGrader(num_workers=1, timeout_s=1.0) as g:
    out = g.score(["10^{10^{10}}", "5"], [B + "{1}", B + r"{\frac{10}{2}}"])
    assert out == [0.0, 1.0]
    assert g.score(["2"], [B + r"{\sqrt{4}}"]) == [1.0]


_HangingGrader = misbehaving_grader(rm.MathGrader, "_check_in_worker", hang_grace_s=1.0)


@pytest.mark.slow
def test_hung_worker_is_killed_and_grader_recovers(caplog):
  with _HangingGrader(num_workers=2, timeout_s=1.0) as g:
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=rm.__name__):
      out = g.score_detailed(["1", "hang", "3", "4"],
                             [B + "{1}", B + "{2}", B + r"{\sqrt9}", B + "{4.0}"])
    assert [o.reward for o in out] == [1.0, 0.0, 1.0, 1.0]
    assert [o.fault for o in out] == [None, "worker hung", None, None]
    assert g.faults == {"worker hung": 1}
    assert "worker hung" in caplog.text
    assert time.monotonic() - t0 < 30
    assert g.score(["2"], [B + r"{\sqrt{4}}"]) == [1.0]
    assert len(g._workers) == 2 and all(w.proc.is_alive() for w in g._workers)


def test_crashed_worker_is_replaced():
  with rm.MathGrader(num_workers=1, timeout_s=5.0) as g:
    assert g.score(["2"], [B + r"{\sqrt{4}}"]) == [1.0]
    g._workers[0].proc.kill()  # Simulate a segfault / OOM kill.
    g._workers[0].proc.join()
    assert g.score(["2", "3"], [B + r"{\sqrt{4}}", B + r"{\sqrt{9}}"]) == [1.0, 1.0]
    assert not g.faults  # It died idle: no sample was lost.


_BlockingGrader = misbehaving_grader(rm.MathGrader, "_check_in_worker")


def test_worker_killed_mid_batch_costs_one_sample(tmp_path, monkeypatch, caplog):
  marker = tmp_path / "busy_worker_pid"
  monkeypatch.setenv("RESTEM_TEST_BLOCK_MARKER", str(marker))
  killed = []

  def kill_the_busy_worker():  # As an OOM kill would, from outside, mid-check.
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)

  killer = threading.Thread(target=kill_the_busy_worker, daemon=True)
  killer.start()
  with _BlockingGrader(num_workers=2, timeout_s=5.0) as g:
    with caplog.at_level(logging.WARNING, logger=rm.__name__):
      out = g.score_detailed(["1", "block", "3", "4", "block"],
                             [B + "{1}", B + "{2}", B + r"{\sqrt9}", B + "{4.0}", B + "{2}"])
    killer.join(5)
    assert killed
    # The two "block" samples share one (gold, answer) pair: both lose it, nothing else.
    assert [o.reward for o in out] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert [o.fault for o in out] == [None, "worker died", None, None, "worker died"]
    assert g.faults == {"worker died": 2}
    assert "worker died" in caplog.text
    # A replacement took the dead worker's place; the next batch is graded normally.
    assert len(g._workers) == 2 and all(w.proc.is_alive() for w in g._workers)
    assert killed[0] not in [w.proc.pid for w in g._workers]
    assert g.score(["2", "3"], [B + r"{\sqrt{4}}", B + r"{\sqrt{9}}"]) == [1.0, 1.0]


def test_is_equiv():
  assert rm.is_equiv("0.5", r"\frac{1}{2}")
  assert rm.is_equiv(r"\{1,2\}", r"\{2,1\}")
  assert not rm.is_equiv("2021", r"\pm 2021")
  assert not rm.is_equiv("1", "")
  assert not rm.is_equiv(r"\frac{1}{2004!}", r"\frac{1}{2006!}", timeout_s=2.0)
