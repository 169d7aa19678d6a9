r"""A real model's base greedy pass@1 on reasoning-gym datasets: pick a learnable mix.

    JAX_PLATFORMS=cpu python scripts/rg_base_table.py --gguf=PATH/model.gguf \
        --num_test=128 [--datasets=chain_sum,leg_counting]

Uses the run's own pieces (tasks.get_task with task.name=reasoning_gym, the
Sampler, evaluate.sample_texts, task.score), so the figures are what a
`restem.num_iterations=0` run would report for each dataset alone. Problems are
the *validation* draw of each dataset (task.seed's validation split), never the
test split: this table chooses the training mix. Prints one markdown row per
(dataset, config): pass@1 with its 95% Wilson interval, and how many distinct
answers the model gave (a small model can score by repeating one answer).
"""
from __future__ import annotations

import collections
import json
import time

from absl import app, flags

_GGUF = flags.DEFINE_string("gguf", None, "Model GGUF file (weights and tokenizer), or an "
                            "installed model package: package:smollm2_135m, package:gemma3_270m.")
_NUM = flags.DEFINE_integer("num_test", 128, "Problems per dataset.")
_SHOTS = flags.DEFINE_integer("few_shot", 3, "Exemplars per prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Completion budget.")
_ONLY = flags.DEFINE_list("datasets", [], "Subset of CANDIDATES by dataset name.")
flags.mark_flag_as_required("gguf")

# Small-model candidates: easy settings of arithmetic, counting and string tasks.
CANDIDATES = (
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                          "allow_parentheses": False, "allow_negation": False}),
    ("products", {"min_digits": 1, "max_digits": 2}),
    ("leg_counting", {"min_animals": 1, "max_animals": 2, "min_instances": 1,
                      "max_instances": 3}),
    ("spell_backward", {"min_word_len": 3, "max_word_len": 5}),
    ("letter_counting", {"min_words": 3, "max_words": 5}),
    ("gcd", {"max_value": 30}),
    ("gsm_symbolic", {}),
)


def main(argv):
  del argv
  from restem_jax import configlib, evaluate, metrics, partitioning, sampling  # pylint: disable=import-outside-toplevel
  from restem_jax import tasks  # pylint: disable=import-outside-toplevel
  from restem_jax.importers import import_model, load_vocabulary, resolve_source  # pylint: disable=import-outside-toplevel
  from restem_jax.tasks.datasets import reasoning_gym as R  # pylint: disable=import-outside-toplevel

  c = configlib.default_config()
  mesh = partitioning.make_mesh(c.mesh)
  fmt, path = resolve_source(_GGUF.value)
  cfg, params = import_model(fmt, path, mesh, max_seq_len=1024)
  vocab = load_vocabulary(path)
  sampler = sampling.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                             vocabulary=vocab)
  print(f"model {_GGUF.value}: {cfg.n_layers} layers, d {cfg.d_model}; {_NUM.value} validation "
        f"problems per dataset, {_SHOTS.value}-shot, greedy, {_NEW.value} new tokens")
  print("| dataset | config | pass@1 (95% CI) | distinct answers | top answer share | s |")
  print("|---|---|---|---|---|---|")
  for name, kw in CANDIDATES:
    if _ONLY.value and name not in _ONLY.value:
      continue
    t0 = time.time()
    with c.unlocked():
      c.task.name = "reasoning_gym"
      c.task.rg_datasets = ((name, 1.0, kw),)
      c.task.num_val, c.task.num_train, c.task.num_test = _NUM.value, 1, 1
      c.task.few_shot = _SHOTS.value
    task = tasks.get_task(c.task, vocabulary=vocab)
    problems = task.problems("validation", max_prompt_len=cfg.max_seq_len - _NEW.value)
    texts, rewards = evaluate.greedy_answers(sampler, params, task, problems,
                                             max_new_tokens=_NEW.value, max_batch=64)
    answers = [R.extract_answer(task.postprocess(t)) for t in texts]
    k, n = int(sum(rewards)), len(rewards)
    lo, hi = metrics.wilson_interval(k, n)
    counts = collections.Counter(answers)
    top = counts.most_common(1)[0][1] / n
    print(f"| {name} | {json.dumps(kw)} | {100 * k / n:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) "
          f"| {len(counts)} / {n} | {100 * top:.0f}% | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
