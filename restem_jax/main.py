r"""ReST-EM: `python -m restem_jax.main --config=configs/demo.py --workdir=/tmp/run`.

Rerun the same command to resume a killed run. After SIGTERM (preemption) the
run stops at its next safe point, saves what a resume needs and exits with
status 75 (preemption.EXIT_CODE) and one line saying where it stopped. Override
fields on the command line (`--config.sampling.num_samples=8`); a config that
differs from the one saved in the workdir stops the run unless --override is given.

The config is checked (configlib.validate) before JAX, SeqIO and TensorFlow are
imported, so a bad value fails in about a second, one `error:` line per problem.
"""
import gc
import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from restem_jax import configlib, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, samples and evals go.")
_OVERRIDE = flags.DEFINE_bool("override", False,
                              "Continue a workdir even though the config changed.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every save at INFO; keep its warnings, drop its chatter. Its background
  threads also log a failed save (e.g. a full disk) with a traceback of its internals;
  the error line is kept, the traceback dropped: the run then stops with one `error:`
  line saying what to do (checkpoints.CheckpointError)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= pylogging.WARNING


def _exit_bad_input(e: Exception) -> None:
  """Bad input (config, data, checkpoint, workdir): one line per problem, no traceback.

  The error lines are the last thing printed: what a failed library call left behind is
  collected first, and cleanup noise at interpreter exit (e.g. a failed Orbax save's
  callbacks finding their event loop closed) is dropped, as it adds nothing to them.
  """
  gc.collect()
  sys.stderr.flush()
  for line in str(e).splitlines() or [type(e).__name__]:
    print(f"error: {line}", file=sys.stderr)
  sys.unraisablehook = lambda unraisable: None
  sys.exit(2)


def _unraisable(u) -> None:
  # After a failed Orbax save its asyncio callbacks find their loop closed; Python would
  # print each with a traceback. One line each: the run's own error line says what to do.
  logging.warning("ignored during a library's cleanup: %s: %s", type(u.exc_value).__name__,
                  u.exc_value)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _unraisable
  try:
    configlib.validate(_CONFIG.value)
  except errors.ConfigError as e:
    _exit_bad_input(e)
  # TensorFlow first, quietly and without GPUs (JAX keeps them): no C++ start-up noise.
  from restem_jax import quiet  # pylint: disable=import-outside-toplevel
  quiet.import_tensorflow()
  # pylint: disable-next=import-outside-toplevel  (JAX, SeqIO, TF: seconds)
  from restem_jax import preemption, run
  try:
    run.run(_CONFIG.value, _WORKDIR.value, override=_OVERRIDE.value)
  except run.USER_ERRORS as e:
    _exit_bad_input(e)
  except preemption.Preempted as e:
    print(str(e), file=sys.stderr)  # One line; a distinct status tells a scheduler to rerun.
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
