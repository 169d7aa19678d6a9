r"""Your own task from JSONL files and a reward function (docs/YOUR_TASK.md); copy and edit.

    python -m restem_jax.main --config=configs/jsonl_task.py --workdir=/tmp/countdown
    python -m restem_jax.main --config=configs/jsonl_task.py:runlocal --workdir=/tmp/countdown_small

As shipped it runs the countdown example (examples/countdown: make a target from two or
three numbers with + - *; any correct expression earns 1 from examples/countdown/reward.py)
on a tiny model pretrained in-run on the train rows that carry a solution, with the
embedded tokenizer: no download. For a real model set base.source = "import",
base.path (a .gguf, an HF directory or "package:smollm2_135m") and the model's shape
(see configs/smollm2_135m_rg.py). `:runlocal` is a one-minute smoke version.
Paths are relative to the directory you run from (the repository root here).
"""
import ml_collections

from restem_jax import configlib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("runlocal",))
  c = recipes.embedded_demo(runlocal="runlocal" in args)
  c.task.name = "jsonl"
  c.task.data_dir = "examples/countdown"  # train.jsonl, test.jsonl (validation from train)
  c.task.reward_fn = "examples/countdown/reward.py:reward"  # or "package.module:function"
  c.task.prompt_template = "Question: {question}\nAnswer:"  # fields of a row, str.format
  c.task.few_shot = 0
  c.task.num_train = 0  # all rows
  c.task.num_test = 0
  c.task.num_val = 64
  c.sampling.max_new_tokens = 16
  c.eval.majority_k = 8
  if "runlocal" in args:
    c.task.num_train = 160
    c.task.num_test = 32
    c.task.num_val = 16
    c.restem.sft_baseline = False  # (the full config trains and evaluates it too)
    c.base.steps = 60
    c.sampling.num_samples = 4
    c.sampling.max_batch = 128
    c.train.max_steps = 10
    c.train.eval_every = 5
    c.train.checkpoint_every = 5
    c.eval.num_samples = 4
    c.eval.pass_k = (1, 4)
    c.eval.majority_k = 4
    c.eval.num_train_eval = 16
  return c
