"""Progress lines: the rate / ETA arithmetic against hand counts (injected clock), and how
many lines a phase writes where stderr is not a terminal (a log file) and where it is."""
import io

import pytest

from restem_jax import progress


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


class Terminal(io.StringIO):
  def isatty(self):
    return True


def make(total, clock=None, lines=None, stream=None, **kw):
  lines = [] if lines is None else lines
  bar = progress.Progress("generate iter 1", total, "problems", log=lines.append,
                          stream=io.StringIO() if stream is None else stream,
                          clock=clock or Clock(), **kw)
  return bar, lines


def test_rate_and_eta_by_hand():
  clock = Clock()
  # A resumed phase: 100 of 400 problems were done before this call.
  bar, _ = make(400, clock, initial=100)
  clock.now += 10.0
  bar.update(50)
  # 50 problems in 10 s = 5/s (the 100 resumed ones are not work of this call);
  # 250 left / 5 per s = 50 s.
  assert bar.rate() == pytest.approx(5.0)
  assert bar.eta_s() == pytest.approx(50.0)
  assert bar.line() == "generate iter 1: 150/400 problems (38%), 5 problems/s, ETA 50s"
  clock.now += 190.0
  bar.update(250, "solved 120/300 (40%)")
  # 300 problems in 200 s = 1.5/s; 50 left -> 33.3 s.
  assert bar.line() == ("generate iter 1: 400/400 problems (100%), 1.5 problems/s, ETA 0s, "
                        "solved 120/300 (40%)")
  clock.now += 1.0
  assert bar.line().endswith("1.49 problems/s, ETA 0s, solved 120/300 (40%)")


def test_eta_unknown_before_any_work_and_durations():
  bar, _ = make(10)
  assert bar.line() == "generate iter 1: 0/10 problems (0%), 0 problems/s, ETA ?"
  assert [progress.format_duration(s) for s in (0, 42.4, 185, 3725, float("inf"))] == [
      "0s", "42s", "3m05s", "1h02m", "?"]


@pytest.mark.parametrize("total, stop_at, expected", [
    (1000, 1000, 10),  # marks 100, 200, ..., 1000
    (1000, 437, 5),  # early stop: marks 100..400, then the line at 437 on close
    (3, 3, 3),  # fewer units than lines: one line each
    (25, 25, 10),  # marks ceil(2.5 k): 3, 5, 8, 10, 13, 15, 18, 20, 23, 25
])
def test_a_log_gets_at_most_max_lines_per_phase(total, stop_at, expected):
  clock = Clock()
  bar, lines = make(total, clock)
  with bar:
    for _ in range(stop_at):
      clock.now += 0.5
      bar.update(1)
  assert len(lines) == expected, lines
  assert lines[-1].startswith(f"generate iter 1: {stop_at}/{total} problems")
  assert lines[-1].split(", ")[1] == "2 problems/s"  # one per 0.5 s


def test_big_chunks_log_once_per_chunk_not_per_mark():
  bar, lines = make(100)
  bar.update(55)
  bar.update(45)
  bar.close()
  assert [l.split(":")[1].split(" (")[0] for l in lines] == [" 55/100 problems",
                                                            " 100/100 problems"]


def test_terminal_redraws_one_line_and_logs_nothing():
  term, lines = Terminal(), []
  clock = Clock()
  bar, _ = make(1000, clock, lines, stream=term, min_interval_s=0)
  for _ in range(1000):
    clock.now += 0.1
    bar.update(1)
  bar.log("improve eval at step 20: 0.5")
  bar.close()
  out = term.getvalue()
  assert lines == ["improve eval at step 20: 0.5"]  # only the message, not the progress
  assert "\r" in out and out.count("\n") <= 2  # redrawn in place, not a line per update
  assert "generate iter 1: 1000/1000 problems (100%), 10 problems/s, ETA 0s" in out


def test_disabled_writes_nothing():
  term, lines = Terminal(), []
  bar, _ = make(10, lines=lines, stream=term, enabled=False)
  bar.update(10)
  bar.close()
  assert lines == [] and term.getvalue() == ""
