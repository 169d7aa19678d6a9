"""Start-up without native-library noise (TensorFlow, CUDA probing, SentencePiece).

TensorFlow (imported by SeqIO for the data pipeline only) and the SentencePiece
copy inside tensorflow-text log from C++ straight to file descriptor 2, some of
it before TF reads TF_CPP_MIN_LOG_LEVEL (static initialisers). On a CPU-only
machine that is, before the first useful line:

    WARNING: All log messages before absl::InitializeLog() is called ...
    I0000 ... port.cc:153] oneDNN custom operations are on ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine ...
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ...
    normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. ...  (per pipeline)

What is done about it, at the source where an environment variable works and
with a scoped filter where it does not:
  * TF_CPP_MIN_LOG_LEVEL=1 (unless set): TF's own INFO lines go; warnings and
    errors stay.
  * TensorFlow never gets a GPU (`tf.config.set_visible_devices([], "GPU")`):
    it only runs the input pipeline, and a TF that sees a GPU reserves its
    memory next to JAX. JAX's devices are untouched (CUDA_VISIBLE_DEVICES is
    not changed), so a GPU machine still runs the model on its GPU.
  * `filtered_stderr()`: around the TF import (and the GPU hiding, which probes
    CUDA) and around reading a seqio pipeline, fd 2 goes through a pipe whose
    reader drops lines matching NOISE and forwards every other line at once,
    in order. Python exceptions, our log lines and any unknown native message
    still appear; fd 2 is restored when the block ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Iterator, Sequence

# Known-harmless native start-up lines. Each pattern names the file that logs it.
NOISE: tuple[re.Pattern, ...] = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"port\.cc:\d+\] oneDNN custom operations are on",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate",
    # TF and a CUDA jaxlib in one process both register these plugins (GPU machines).
    r"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty",
))


def is_noise(line: str, noise: Sequence[re.Pattern] = NOISE) -> bool:
  return any(p.search(line) for p in noise)


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[re.Pattern] = NOISE) -> Iterator[None]:
  """Inside the block, fd 2 lines matching `noise` are dropped; the rest pass at once.

  A reader thread forwards the pipe to the original fd 2 line by line, so a
  crash inside the block loses at most the line being written. (Native code
  that writes more than a pipe buffer, 64 KiB, while holding the GIL would
  block: the start-up messages filtered here are about 1 KiB.)
  """
  try:
    sys.stderr.flush()
  except (AttributeError, ValueError):
    pass
  saved = os.dup(2)
  read_fd, write_fd = os.pipe()
  out = os.fdopen(os.dup(saved), "wb", buffering=0)

  def pump() -> None:
    with os.fdopen(read_fd, "rb") as src, out:
      for line in src:
        if not is_noise(line.decode("utf-8", "replace"), noise):
          out.write(line)

  reader = threading.Thread(target=pump, name="quiet-stderr", daemon=True)
  reader.start()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  try:
    yield
  finally:
    try:
      sys.stderr.flush()
    except (AttributeError, ValueError):
      pass
    os.dup2(saved, 2)  # The pipe's last writer closes: the reader drains it and ends.
    os.close(saved)
    # A subprocess started inside the block keeps its copy of the pipe; the daemon
    # reader then keeps forwarding its lines, and we do not wait for it.
    reader.join(timeout=5.0)


class _QuietLibraries(logging.Filter):
  """Orbax logs every save at INFO; keep its warnings, drop its chatter. Its background
  threads also log a failed save (e.g. a full disk) with a traceback of its internals;
  the error line is kept, the traceback dropped: the run then stops with one `error:`
  line saying what to do (checkpoints.CheckpointError)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def _unraisable(u: sys.UnraisableHookArgs) -> None:
  # After a failed Orbax save its asyncio callbacks find their loop closed; Python would
  # print each with a traceback. One line each: the run's own error line says what to do.
  logging.warning("ignored during a library's cleanup: %s: %s", type(u.exc_value).__name__,
                  u.exc_value)


def configure_logging() -> None:
  """Our INFO lines through absl's handler, libraries' chatter dropped (restem_jax.main and
  the scripts that run its phases call this first)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _unraisable


def import_tensorflow() -> None:
  """Imports TensorFlow quietly and keeps it off the GPUs (see the module docstring).

  Call before anything imports TensorFlow (seqio, tfds); later imports are free.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  with filtered_stderr():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices were initialised already (TF imported earlier).
      pass
