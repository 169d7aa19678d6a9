r"""A finished reasoning-gym run on a second, independently seeded test draw.

    JAX_PLATFORMS=cpu python scripts/second_draw.py --workdir=/tmp/restem_smollm2_rg \
        --test_seed=1 --num_test=1000

The run's own test split was drawn with task.seed, and its configuration was chosen
before that split was looked at; this draws another `num_test` questions with
`--test_seed` (task.rg_test_seed: none occurs in any split the run drew — exemplars,
test, validation, train), keeps the run's prompt (same exemplars), and evaluates the
base and every saved iteration greedily on it: pass@1 with its 95% Wilson interval,
distinct answers, and pass@1 per level. Small generators repeat questions, so it
also prints how many distinct questions each level has in `--space_draws` draws of
its generator (a lower bound on its question space).

Writes WORKDIR/second_draw_<seed>.json. The grader pool uses multiprocessing spawn:
this file's `if __name__ == "__main__"` guard is what lets its workers start.
"""
from __future__ import annotations

import collections
import os
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished reasoning_gym run's workdir.")
_SEED = flags.DEFINE_integer("test_seed", 1, "Seed of the second test draw (> 0).")
_NUM = flags.DEFINE_integer("num_test", 1000, "Questions in the second test draw.")
_SPACE = flags.DEFINE_integer("space_draws", 20000, "Draws per generator when counting "
                              "each level's distinct questions (0 = skip).")
_MODELS = flags.DEFINE_enum("models", "all", ["all", "base_best"], "all: the base and every "
                            "saved iteration; base_best: the base and the best iteration "
                            "(export's rule: validation reward, then test pass@1).")
flags.mark_flag_as_required("workdir")


def level_space(task_cfg, draws: int, seed: int = 12345) -> dict[str, int]:
  """Distinct questions per level among `draws` draws of each generator in the mix."""
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  from restem_jax.tasks.datasets import reasoning_gym as R  # pylint: disable=import-outside-toplevel
  seen: dict[str, set[str]] = collections.defaultdict(set)
  for src in R.parse_mix(task_cfg.rg_datasets):
    ds = reasoning_gym.create_dataset(src.name, seed=seed, size=draws, **src.kwargs)
    for i in range(draws):
      entry = ds[i]
      seen[R.level_of(src.name, entry)].add(entry["question"])
  return {level: len(qs) for level, qs in sorted(seen.items())}


def pct(k: int, n: int) -> str:
  from restem_jax import metrics  # pylint: disable=import-outside-toplevel
  lo, hi = metrics.wilson_interval(k, n)
  return f"{100 * k / n:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"


def main(argv):
  del argv
  import ml_collections  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from restem_jax import errors, evaluate, export, improve, model, partitioning, sampling, tasks
  from restem_jax import workdir as wd
  from restem_jax.export.tokenizer import run_vocabulary

  workdir = _WORKDIR.value
  config = ml_collections.ConfigDict(wd.read_json(os.path.join(workdir, "config.json")))
  if config.task.name != "reasoning_gym":
    raise errors.ConfigError(f"{workdir}: task.name={config.task.name!r}; a second draw needs "
                             "a reasoning_gym run (other tasks have one fixed test set)")
  if _SEED.value <= 0:
    raise errors.ConfigError(f"--test_seed={_SEED.value}: must be > 0")
  with config.unlocked():
    config.task.rg_test_seed = _SEED.value
    config.task.num_test = _NUM.value
  model_cfg = model.ModelConfig.from_config(config.model)
  mesh = partitioning.make_mesh(config.mesh)
  vocab, _ = run_vocabulary(workdir)
  task = tasks.get_task(config.task, vocabulary=vocab)
  budget = evaluate.sampling_budget(config)
  problems = task.problems("test", max_prompt_len=model_cfg.max_seq_len - budget["max_new_tokens"])
  sampler = sampling.Sampler(model_cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                             stop_strings=task.stop_strings, vocabulary=vocab)
  layout = wd.Layout(workdir)
  iterations = sorted(wd.glob(workdir, "iter_*/model"))
  if _MODELS.value == "base_best":
    iterations = [layout.iteration(int(export.best_iteration(workdir))).model]
  models = [("base", layout.base.model)] + [
      (f"iteration {int(os.path.basename(os.path.dirname(p))[5:])}", p) for p in iterations]
  print(f"{workdir}: {len(problems)} test problems drawn with seed {_SEED.value}, disjoint from "
        f"every split of task.seed={config.task.seed}'s draw", flush=True)
  out = {"workdir": workdir, "test_seed": _SEED.value, "num_test": len(problems), "models": []}
  for label, path in models:
    t0 = time.time()
    params = improve.restore_model(path, model_cfg, mesh).params
    texts, rewards = evaluate.greedy_answers(sampler, params, task, problems, **budget)
    distinct = evaluate.distinct_answers(task, texts)  # as eval.json counts them
    by_level: dict[str, list[float]] = collections.defaultdict(list)
    for p, r in zip(problems, rewards):
      by_level[p.level].append(r)
    out["models"].append({
        "model": label, "path": path, "solved": int(sum(rewards)), "n": len(rewards),
        "distinct_answers": distinct,
        "by_level": {lvl: [int(sum(v)), len(v)] for lvl, v in sorted(by_level.items())},
        "seconds": round(time.time() - t0, 1)})
    print(f"{label}: {pct(int(sum(rewards)), len(rewards))}, {distinct} distinct "
          f"answers, {time.time() - t0:.0f} s", flush=True)
    del params
  space = level_space(config.task, _SPACE.value) if _SPACE.value else {}
  out["level_space"] = {"draws_per_generator": _SPACE.value, "distinct_questions": space}

  first, last = out["models"][0], out["models"][-1]
  print(f"\n| model | pass@1 % (95% CI), n={len(problems)} | distinct answers |")
  print("|---|---|---|")
  for m in out["models"]:
    print(f"| {m['model']} | {pct(m['solved'], m['n'])} | {m['distinct_answers']} |")
  print(f"\n| level | test questions | distinct in {_SPACE.value} draws | {first['model']} % | "
        f"{last['model']} % |")
  print("|---|---|---|---|---|")
  for lvl, (k0, n) in first["by_level"].items():
    k1 = last["by_level"][lvl][0]
    print(f"| {lvl} | {n} | {space.get(lvl, '-')} | {pct(k0, n)} | {pct(k1, n)} |")
  path = os.path.join(workdir, f"second_draw_{_SEED.value}.json")
  wd.write_json_atomic(path, out)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
