r"""The embedded offline ReST-EM demo (what `make demo` runs): 2-core CPU, no data.

    python -m restem_jax.main --config=configs/demo.py --workdir=/tmp/restem_demo

A tiny Llama-style model is pretrained on the embedded arithmetic task's small
set of human-written worked solutions (the stand-in for a pretrained LM), then
ReST-EM iterates on the answer-only training problems. The SFT-on-human-data
baseline is trained and evaluated in the same run. Resume by rerunning the
command. `configs/demo.py:runlocal` is a 1-minute smoke version.
`configs/demo.py:lora` runs the same experiment with LoRA M-steps (rank 16 adapters on
every attention and MLP matrix, base frozen; the base is still pretrained in full);
`:lora,runlocal` combines both.

The settings are `restem_jax.recipes.embedded_demo` (configs/ablations.py
varies them, so they live in the package).
"""
import ml_collections

from restem_jax import configlib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("runlocal", "lora"))
  c = recipes.embedded_demo(runlocal="runlocal" in args)
  if "lora" in args:
    # Rank 16 of the 128-wide model; lr 2x the full fine-tune's (1e-3): adapters start
    # at zero. Not tuned (one run, docs/RESULTS.md section 2).
    recipes.lora(c, rank=16, alpha=32.0, learning_rate=2e-3)
  return c
