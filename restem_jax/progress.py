"""How far a long phase is: done / total, rate, ETA, and what the phase adds (kept, loss).

One line per phase, the same text on a terminal and in a log:

    generate iter 1: 120/400 problems (30%), 2.50 problems/s, ETA 1m52s, kept 35%

  * stderr is a terminal: tqdm redraws that line in place (at most every
    `min_interval_s`), so a long phase does not scroll the screen;
  * anything else (a log file, a pipe, a test): the line goes to `log` (absl
    logging) when `done` first reaches each of the marks total/max_lines,
    2 total/max_lines, ..., total; plus one on close if the phase stopped
    between marks (early stopping). So a phase logs at most max_lines + 1
    lines, however many steps it has.

Rate = units done in this call / seconds since it started (units skipped on a
resume are not counted as work done now); ETA = units left / rate. The clock is
injectable so tests can check the arithmetic against a hand count.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, TextIO

MAX_LINES = 10  # Log lines per phase when stderr is not a terminal.


def format_duration(seconds: float) -> str:
  """42s, 3m05s, 1h02m; '?' when unknown (no rate yet)."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _is_terminal(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # No isatty, or a closed stream.
    return False


class Progress:
  """Progress of one phase (see the module docstring). Use as a context manager.

  desc: what the phase is ("generate iter 1"); total, unit: its size ("problems");
  initial: units already done before this call (a resumed phase);
  log: where non-terminal lines go; stream: the terminal test (default sys.stderr);
  enabled: False prints nothing (processes other than 0 of a multi-host run).
  """

  def __init__(self, desc: str, total: int, unit: str, *, initial: int = 0,
               log: Callable[[str], None] = logging.info, stream: TextIO | None = None,
               max_lines: int = MAX_LINES, clock: Callable[[], float] = time.monotonic,
               min_interval_s: float = 0.5, enabled: bool = True):
    self.desc, self.total, self.unit = desc, max(int(total), 0), unit
    self.initial = self.done = int(initial)
    self._log, self._clock, self._max_lines = log, clock, max(int(max_lines), 1)
    self._start = clock()
    self._postfix = ""
    self._logged_at = self.done  # `done` at the last line written to the log.
    self._mark = self._next_mark(self.done)
    self._bar = None
    self._enabled = enabled
    stream = sys.stderr if stream is None else stream
    if enabled and _is_terminal(stream):
      import tqdm  # pylint: disable=import-outside-toplevel
      # tqdm draws our own line ("{desc}"): one text, one arithmetic, in both modes.
      self._bar = tqdm.tqdm(total=self.total, initial=self.done, file=stream,
                            bar_format="{desc}", mininterval=min_interval_s, dynamic_ncols=True,
                            leave=True)
      self._bar.set_description_str(self.line(), refresh=True)

  # --- arithmetic -------------------------------------------------------------------

  def rate(self) -> float:
    """Units per second done by this call so far (0.0 before any)."""
    elapsed = self._clock() - self._start
    return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

  def eta_s(self) -> float:
    """Seconds until `total` at the current rate (inf when unknown)."""
    rate = self.rate()
    return max(self.total - self.done, 0) / rate if rate > 0 else math.inf

  def line(self) -> str:
    pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
    return (f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, "
            f"{self.rate():.3g} {self.unit}/s, ETA {format_duration(self.eta_s())}"
            f"{self._postfix}")

  def _next_mark(self, done: int) -> int:
    """The first of the marks ceil(total * k / max_lines), k = 1..max_lines, above done."""
    for k in range(1, self._max_lines + 1):
      mark = -(-self.total * k // self._max_lines)
      if mark > done:
        return mark
    return self.total + 1  # Past the end: no more marks.

  # --- updates ----------------------------------------------------------------------

  def update(self, n: int, postfix: str = "") -> None:
    """n more units done; postfix: the phase's own figures (", kept 35%")."""
    self.done += int(n)
    if postfix:
      self._postfix = postfix if postfix.startswith(",") else ", " + postfix
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.set_description_str(self.line(), refresh=False)
      self._bar.update(int(n))  # Redraws at most every min_interval_s.
    elif self.done >= self._mark:
      self._write()

  def _write(self) -> None:
    self._log(self.line())
    self._logged_at = self.done
    self._mark = self._next_mark(self.done)

  def log(self, msg: str) -> None:
    """A message in the middle of the phase: printed above the terminal line, not into it."""
    if self._bar is not None:
      self._bar.clear()
      self._log(msg)
      self._bar.refresh()
    else:
      self._log(msg)

  def close(self) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.set_description_str(self.line(), refresh=True)
      self._bar.close()
      self._bar = None
    elif self.done != self._logged_at:  # Stopped between marks: say where.
      self._write()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
