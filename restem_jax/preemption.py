"""Preemption: after SIGTERM, stop at the next safe point with what a resume needs on disk.

Spot / preemptible Cloud TPU VMs and Kubernetes pods get SIGTERM some seconds
(~30 s) before they are killed. `run.run` installs `handling()`; the phases then
poll `check()` at their safe points:

  * Generate: after each chunk's shards are written (the rerun skips them);
  * Improve: after each train step (and its validation, if due): a checkpoint of
    that step is saved, so no step is lost;
  * Evaluate: between sampler chunks (an evaluation keeps no partial state: the
    rerun evaluates that model again);
  * between phases (a SIGTERM during an Orbax save stops after the save);
  * during startup (before the first phase): at once, from the handler.

`check()` raises `Preempted`; main prints one line and exits with EXIT_CODE.
Rerunning the same command continues (progress.json, shards, checkpoints).

Where the signal is seen:
  * one process: a Python SIGTERM handler sets a flag (a second SIGTERM ends the
    process at once, as SIGKILL would: the run still resumes, from less);
  * several processes (jax.distributed): JAX's preemption sync manager receives
    the notice on any host and agrees on a step at which every host stops, via
    `multihost_utils.reached_preemption_sync_point` (what Orbax's
    `CheckpointManager.reached_preemption` calls). Every host calls `check()` the
    same number of times (the phases are SPMD), and that count is the step id.
    No Python handler is installed there: JAX's notifier owns SIGTERM.

A check inside a long native call (an XLA compile, one sampler chunk, an Orbax
save) waits for that call to return; a grace period shorter than that ends in
SIGKILL, which the run also survives (atomic writes), at the cost of the work
since the last shard or checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, NoReturn

import jax

EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "temporary failure, try again".


class Preempted(Exception):
  """The run stopped at a safe point after SIGTERM; the message says where."""


class _State:
  requested = False  # SIGTERM seen by this process's handler.
  installed = False
  checks = 0  # Calls of check()/reached() in this process: the multi-host sync step id.
  deferred = 0  # Depth of `deferred()` blocks.
  phase = ""  # progress.json entry being computed (for the message).


_S = _State()


def _on_sigterm(signum, frame) -> None:
  del frame
  _S.requested = True
  signal.signal(signum, signal.SIG_DFL)  # A second SIGTERM takes the default action.
  if not _S.phase:
    # Still starting (loading the task, tokenizing: no checks there, and possibly
    # long): nothing of the run's work is in flight, so stop right here.
    stop("nothing to save")
  logging.warning("SIGTERM: stopping at the next safe point (a second SIGTERM stops now)")


def _multiprocess() -> bool:
  return jax.process_count() > 1


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """SIGTERM requests a stop at the next check() while inside this block (one process).

  Outside the main thread (signals cannot be handled there) and with several
  processes (JAX's notifier handles SIGTERM) it installs nothing.
  """
  if _S.installed or _multiprocess() or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  _S.installed, _S.requested, _S.phase = True, False, ""
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _S.installed, _S.requested = False, False


def set_phase(phase: str) -> None:
  _S.phase = phase


def reached() -> bool:
  """Whether to stop here. Every process must call it at the same points (see module doc)."""
  if _S.deferred:
    return False
  _S.checks += 1
  if _multiprocess():
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    try:
      return bool(multihost_utils.reached_preemption_sync_point(_S.checks))
    except RuntimeError:  # No preemption service (jax_enable_preemption_service off).
      return False
  return _S.requested


def check(what: str) -> None:
  """Raises Preempted (naming the phase and `what` was kept) if a stop was requested."""
  if reached():
    stop(what)


def stop(what: str) -> NoReturn:
  """Raises Preempted: `what` says what was saved (after `reached()` said so)."""
  raise Preempted(f"preempted (SIGTERM) during {_S.phase or 'startup'}: {what}; "
                  "rerun the same command to continue")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Checks inside this block never stop (the caller checks after it): e.g. the M-step's
  validation, so a stop then saves the step it belongs to instead of abandoning it."""
  _S.deferred += 1
  try:
    yield
  finally:
    _S.deferred -= 1
