r"""The paper's ablations as data: `--config=configs/ablations.py:<name>`.

Each variant is the demo config (configs/demo.py) with a few fields changed:
    rest          ReST-style: every M-step fine-tunes the previous iterate
    one_iter_3x   one iteration with 3x the samples per problem
    rest_star     ReST*: at most one correct sample per problem
    train_500     ReST-EM on only 500 training problems (data-size ablation)
    sft_only      SFT on the human solutions, no self-training
    distill       samples of a teacher checkpoint train the base (set teacher_path)

    python -m restem_jax.main --config=configs/ablations.py:rest --workdir=/tmp/rest
    python -m restem_jax.main --config=configs/ablations.py:distill \
        --config.restem.teacher_path=/tmp/restem_demo/iter_003/model --workdir=/tmp/distill
"""
import ml_collections

from restem_jax import recipes

VARIANTS = {
    "rest": {"restem.finetune_from": "previous"},
    "one_iter_3x": {"restem.num_iterations": 1,
                    "sampling.num_samples": 3 * recipes.embedded_demo().sampling.num_samples},
    "rest_star": {"restem.max_per_problem": 1},
    "train_500": {"task.num_train": 500},
    "sft_only": {"restem.num_iterations": 0, "restem.sft_baseline": True},
    "distill": {"restem.sample_from": "teacher", "restem.num_iterations": 1},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown ablation {arg!r}; choose one of {sorted(VARIANTS)}")
  c = recipes.embedded_demo()
  c.restem.sft_baseline = False
  for dotted, value in VARIANTS[arg].items():
    section, field = dotted.split(".")
    setattr(c[section], field, value)
  return c
