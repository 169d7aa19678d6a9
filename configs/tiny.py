r"""The smallest end-to-end run (tests): two iterations in about a minute on CPU.

    python -m restem_jax.main --config=configs/tiny.py --workdir=/tmp/restem_tiny
"""
import ml_collections

from restem_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  configlib.parse_config_arg(arg, allowed=())
  c = configlib.default_config()
  c.model.vocab_size = 512
  c.model.d_model = 64
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.model.d_ff = 64
  c.model.max_seq_len = 96
  c.base.steps = 60
  c.base.learning_rate = 1e-2
  c.base.batch_size = 16
  c.task.num_train = 24
  c.task.num_val = 8
  c.task.num_test = 12
  # One-event problems with small numbers: a 20-second base model solves a few,
  # so the E-step has something to keep.
  c.task.num_human = 200
  c.task.max_steps = 1
  c.task.max_start = 9
  c.task.max_operand = 5
  c.task.max_value = 15
  c.task.allow_mul = False
  c.sampling.num_samples = 4
  c.sampling.max_new_tokens = 40
  c.sampling.max_batch = 64
  c.restem.num_iterations = 2
  c.restem.max_per_problem = 2
  c.restem.sft_baseline = True
  c.train.batch_size = 16
  c.train.max_steps = 6
  c.train.warmup_steps = 2
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.eval.num_samples = 4
  c.eval.pass_k = (1, 2, 4)
  c.eval.majority_k = 4
  c.eval.num_train_eval = 8
  return c
