r"""ReST-EM: `python -m restem_jax.main --config=configs/demo.py --workdir=/tmp/run`.

Rerun the same command to resume a killed run. After SIGTERM (preemption) the
run stops at its next safe point, saves what a resume needs and exits with
status 75 (preemption.EXIT_CODE) and one line saying where it stopped. Override
fields on the command line (`--config.sampling.num_samples=8`); a config that
differs from the one saved in the workdir stops the run unless --override is given.

The config is checked (preflight.check: values, data layout, paths) before JAX, SeqIO and TensorFlow are
imported, so a bad value fails in about a second, one `error:` line per problem.
"""
import gc
import sys

from absl import app, flags
from ml_collections import config_flags

from restem_jax import errors, preflight, quiet  # quiet: the standard library only

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, samples and evals go.")
_OVERRIDE = flags.DEFINE_bool("override", False,
                              "Continue a workdir even though the config changed.")
flags.mark_flags_as_required(["config", "workdir"])


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


def main(argv):
  del argv
  quiet.configure_logging()
  try:
    preflight.check(_CONFIG.value)
  except errors.ConfigError as e:
    _exit_bad_input(e)
  # TensorFlow first, quietly and without GPUs (JAX keeps them): no C++ start-up noise.
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
