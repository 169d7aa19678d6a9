r"""Choose M-step settings on validation: one E-step's kept samples, several fine-tunings.

    JAX_PLATFORMS=cpu python scripts/mstep_sweep.py --config=configs/gemma3_270m_rg.py \
        --workdir=/tmp/restem_gemma3_rg --iteration=1 \
        --set="train.learning_rate=1e-5" --set="train.learning_rate=3e-5"

For a run (same --config and --workdir) whose iteration I E-step is done, each --set
(space-separated `train.<key>=<value>` pairs) fine-tunes iteration I's start model (the
base for ReST-EM) on those kept samples, as that iteration's M-step would, and prints the
validation reward at every `train.eval_every` steps next to the start model's. Only the
validation split is read, never test: this is how a run's learning rate and step budget
are chosen (docs/RESULTS.md). The run itself is not changed: the fine-tunings live
in WORKDIR/sweeps/iter_<I>/<k>/ and their results in WORKDIR/sweeps/iter_<I>.json.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (its E-step done).")
_ITERATION = flags.DEFINE_integer("iteration", 1, "Whose kept samples to fine-tune on.")
_SET = flags.DEFINE_multi_string("set", [""], "One setting: `train.k=v train.k2=v2` ('' = the "
                                 "config's own). Repeat for several.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_setting(train_cfg, setting: str) -> dict:
  """{key: value} for `train.k=v ...`, each value of the field's type in train_cfg."""
  out = {}
  for pair in setting.split():
    key, sep, value = pair.partition("=")
    field = key.removeprefix("train.")
    if not sep or not key.startswith("train.") or field not in train_cfg:
      raise app.UsageError(f"--set {pair!r}: give train.<field>=<value> with a field of "
                           f"config.train ({', '.join(sorted(train_cfg.keys()))})")
    out[field] = type(train_cfg[field])(value)
  return out


def main(argv):
  del argv
  from restem_jax import preflight, quiet  # pylint: disable=import-outside-toplevel
  quiet.configure_logging()  # As restem_jax.main: our progress lines, not Orbax's chatter,
  quiet.import_tensorflow()  # and no C++ start-up noise on a CPU.
  from restem_jax import run  # pylint: disable=import-outside-toplevel
  c = _CONFIG.value
  preflight.check(c)
  settings = [parse_setting(c.train, s) for s in _SET.value]  # Bad flags fail before loading.
  for s in settings:
    trial = c.copy_and_resolve_references()
    trial.train.update(s)
    preflight.check(trial)
  ctx = run.RunContext(c, _WORKDIR.value, override=False)  # Refuses another run's workdir.
  it = ctx.layout.iteration(_ITERATION.value)
  if not ctx.progress.is_done(it.generated):
    raise app.UsageError(f"{_WORKDIR.value}: iteration {_ITERATION.value}'s E-step is not done; "
                         "run the experiment until its 'improve on ... kept samples' line")
  validate = ctx.validation_fn()
  if validate is None:
    raise app.UsageError("task.num_val=0: there is no validation split to choose on")
  if _ITERATION.value > 1 and c.restem.finetune_from != "base":
    raise app.UsageError("restem.finetune_from='previous': sweep iteration 1 only")
  base = ctx.restored_base()
  examples = ctx.kept_examples(it)
  if not examples:
    raise app.UsageError(f"iteration {_ITERATION.value}'s E-step kept no samples: nothing to "
                         "fine-tune on")
  root = os.path.join(_WORKDIR.value, "sweeps", f"iter_{_ITERATION.value:03d}")
  start_score = float(validate(base.params))
  print(f"{len(examples)} kept samples, {len(ctx.splits.val)} validation problems; start model "
        f"validation reward {start_score:.4f}", flush=True)
  results = []
  for k, s in enumerate(settings):
    train_cfg = c.train.copy_and_resolve_references()
    train_cfg.update(s)
    t0 = time.time()
    _, info = ctx.finetune(base, examples, os.path.join(root, str(k)),
                           seed=c.seed + _ITERATION.value, train_cfg=train_cfg)
    results.append({"setting": s, "minutes": round((time.time() - t0) / 60, 1), **info})
    curve = ", ".join(f"{step}: {score:.3f}" for step, score in info["evals"])
    print(f"[{k}] {s or '(config)'}: best {info['best_score']:.4f} at step {info['best_step']} "
          f"(start {start_score:.4f}); {curve}; {results[-1]['minutes']} min", flush=True)
  with open(root + ".json", "w") as f:
    json.dump({"start_score": start_score, "num_val": len(ctx.splits.val),
               "kept": len(examples), "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
