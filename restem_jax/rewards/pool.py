"""The grader process pool: checks that run model output through third-party or user
code, in spawned worker processes, with timeouts and a fault count.

A check is a picklable callable (a module-level function, or a functools.partial of
one) that the workers resolve by reference: it runs as `check(*task, timeout_s)` and
returns a bool or a `Verdict` (a check that can tell its own failures, e.g. a user
reward that raised). `setup` (picklable too) runs once in each worker before it
serves: imports, warm-up. Own processes rather than multiprocessing.Pool /
ProcessPoolExecutor: those cannot kill one hung task (Python 3.11), and a check stuck
in C ignores signals. A worker past its deadline (2 * timeout_s + grace, wall clock)
or dead is killed and replaced alone, and its task scores 0 with a fault ("worker
hung" / "worker died") that callers count against restem.max_fault_fraction.
Processes are spawned (not forked): the parent may hold JAX/TF threads, so a calling
script needs the `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Grade:
  """One sample's reward; `fault` says why the grader (not the answer) failed it:
  "worker died" (crashed, OOM-killed), "worker hung" (killed past its deadline), or
  what a check reported about itself (e.g. "reward raised")."""
  reward: float
  fault: str | None = None


class Verdict(NamedTuple):
  """What a check returns when it can fail on its own: ok, and if it failed, why."""
  ok: bool
  fault: Optional[str] = None  # None: a verdict; else the kind of fault (counted).
  message: str = ""  # The fault's detail, for the log.


class CheckTimeout(BaseException):
  """BaseException so that a library's (or a user's) `except Exception` cannot swallow it."""


def on_timer(signum, frame):
  raise CheckTimeout()


@contextlib.contextmanager
def cpu_time_limit(timeout_s: float) -> Iterator[None]:
  """Raises CheckTimeout in the block after timeout_s of CPU time (a worker's main thread).
  CPU time, not wall time: the same input gets the same verdict on a loaded machine."""
  signal.signal(signal.SIGPROF, on_timer)
  signal.setitimer(signal.ITIMER_PROF, timeout_s)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_PROF, 0)


def serve_checks(conn: multiprocessing.connection.Connection,
                 check: Callable[..., Any]) -> None:
  """A grader worker's loop: "ready", then check(*task) -> reply per task, until None."""
  try:
    conn.send("ready")
    while (task := conn.recv()) is not None:
      try:
        ok = check(*task)
      except BaseException:  # pylint: disable=broad-except
        ok = False  # The timer fired between the check and its cancellation.
      conn.send(ok)
  except (EOFError, OSError):
    pass  # The grader went away (closed or garbage-collected): exit quietly.


def _serve(conn: multiprocessing.connection.Connection, check: Callable[..., Any],
           setup: Optional[Callable[[], None]]) -> None:
  """The default worker: setup (a failure is reported, not retried), then serve `check`."""
  if setup is not None:
    try:
      setup()
    except BaseException as e:  # pylint: disable=broad-except
      conn.send(("setup failed", f"{type(e).__name__}: {e}"))
      return
  serve_checks(conn, check)


class _Worker:

  def __init__(self, ctx, target, args):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    self.proc.start()
    child.close()
    self.born = time.monotonic()
    self.ready = False
    self.task: int | None = None  # Index of the task being checked.
    self.started = 0.0

  def kill(self) -> None:
    self.proc.kill()
    self.proc.join(5)
    self.conn.close()


class GraderPool:
  """`num_workers` processes running `check` on tasks, each within `timeout_s`.

  Not thread-safe (one per thread). `faults` counts the samples lost to grader faults,
  by kind, over the pool's lifetime (subclasses count per sample in their score methods).
  """

  startup_timeout_s = 120.0  # Spawn + heavy imports (sympy) on a loaded 2-core CI box.
  hang_grace_s = 5.0  # Beyond 2 * timeout_s, a silent worker is hung in C: killed.
  # A subclass's own worker main(conn) (tests swap in a deliberately hanging one);
  # None: the default worker serving `check`.
  _worker_target: Optional[Callable[..., None]] = None
  start_hint = "a check that cannot be imported"  # Why workers may fail to start.
  max_logged_faults = 5  # Per kind: a reward broken on every sample must not flood the log.

  def __init__(self, check: Optional[Callable[..., Any]] = None, num_workers: int = 2,
               timeout_s: float = 5.0, setup: Optional[Callable[[], None]] = None):
    if num_workers < 1 or timeout_s <= 0:
      raise ValueError(f"{type(self).__name__} needs num_workers >= 1 and timeout_s > 0")
    if check is None and self._worker_target is None:
      raise ValueError("GraderPool needs a check")
    self.num_workers = num_workers
    self.timeout_s = float(timeout_s)
    self._check, self._setup = check, setup
    self._ctx = multiprocessing.get_context("spawn")
    self._workers: list[_Worker] = []  # Started lazily: callers may need none.
    self.faults: collections.Counter[str] = collections.Counter()
    self._logged: collections.Counter[str] = collections.Counter()

  def _new_worker(self) -> _Worker:
    if self._worker_target is not None:
      return _Worker(self._ctx, self._worker_target, ())
    return _Worker(self._ctx, _serve, (self._check, self._setup))

  def _run(self, tasks: list[tuple], timeout_s: float) -> list[tuple[bool, str | None]]:
    """(ok, fault) per task. A worker that dies or hangs costs its task only."""
    return [(v.ok, v.fault) for v in self._run_verdicts(tasks, timeout_s)]

  def _log_fault(self, fault: str, detail: str) -> None:
    self._logged[fault] += 1
    if self._logged[fault] <= self.max_logged_faults:
      _LOG.warning("%s: %s; the sample scores 0%s", type(self).__name__, detail,
                   " (further faults of this kind are counted, not logged)"
                   if self._logged[fault] == self.max_logged_faults else "")

  def _run_verdicts(self, tasks: list[tuple], timeout_s: float) -> list[Verdict]:
    """A Verdict per task (ok, fault, message), in order."""
    results: list[Verdict] = [Verdict(False)] * len(tasks)
    queue = list(range(len(tasks)))[::-1]
    limit = 2 * timeout_s + self.hang_grace_s  # Wall clock: the CPU timer may lag it.
    while len(self._workers) < self.num_workers:
      self._workers.append(self._new_worker())
    failed_starts = 0
    while queue or any(w.task is not None for w in self._workers):
      for k, w in enumerate(self._workers):
        if w.ready and w.task is None and queue:
          try:
            w.conn.send((*tasks[queue[-1]], timeout_s))
          except (OSError, ValueError):  # Died while idle: replace it, keep the task.
            w.kill()
            self._workers[k] = self._new_worker()
            continue
          w.task, w.started = queue.pop(), time.monotonic()
      multiprocessing.connection.wait([w.conn for w in self._workers], timeout=0.05)
      now = time.monotonic()
      for k, w in enumerate(self._workers):
        fault = None
        try:
          while w.conn.poll():
            msg = w.conn.recv()
            if msg == "ready":
              w.ready, failed_starts = True, 0
            elif isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "setup failed":
              self.close()
              raise RuntimeError(f"{type(self).__name__}: a grader worker failed to set up: "
                                 f"{msg[1]}")
            elif w.task is not None:
              v = msg if isinstance(msg, Verdict) else Verdict(bool(msg))
              if v.fault:
                self._log_fault(v.fault, f"{v.fault} ({v.message}) on {_short(tasks[w.task])}")
              results[w.task], w.task = v, None
        except (EOFError, OSError):
          fault = "worker died"  # Crashed (segfault, OOM kill): its task scores 0.
        if fault is None and w.task is not None and now - w.started > limit:
          fault = "worker hung"  # Hung beyond the in-worker timer: stuck in C code.
        if fault is None and not w.ready and now - w.born > self.startup_timeout_s:
          fault = "worker hung"
        if fault:
          failed_starts += 0 if w.ready else 1
          if not w.ready and failed_starts >= 3:
            self.close()
            raise RuntimeError(
                f"{type(self).__name__}: grader processes fail to start ({self.start_hint}, "
                "or the main script lacks `if __name__ == '__main__':`, which spawn needs)")
          if w.task is not None:
            results[w.task] = Verdict(False, fault)
            _LOG.warning("%s: %s (exit code %s) on %s; replaced, the sample scores 0",
                         type(self).__name__, fault, w.proc.exitcode, _short(tasks[w.task]))
          w.kill()
          self._workers[k] = self._new_worker()
    return results

  def close(self) -> None:
    for w in self._workers:
      try:
        w.conn.send(None)
      except (OSError, ValueError):
        pass
    for w in self._workers:
      w.proc.join(1)
      if w.proc.is_alive():
        w.kill()
    self._workers = []

  def __enter__(self) -> "GraderPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # Interpreter shutdown: the daemon workers die with us anyway.


def _short(task: tuple) -> str:
  return " vs ".join(f"{str(x):.80}" for x in task)
