r"""The embedded offline ReST-EM demo (what `make demo` runs): 2-core CPU, no data.

    python -m restem_jax.main --config=configs/demo.py --workdir=/tmp/restem_demo

A tiny Llama-style model is pretrained on the embedded arithmetic task's small
set of human-written worked solutions (the stand-in for a pretrained LM), then
ReST-EM iterates on the answer-only training problems. The SFT-on-human-data
baseline is trained and evaluated in the same run. Resume by rerunning the
command. `configs/demo.py:runlocal` is a 1-minute smoke version.

The settings are `restem_jax.recipes.embedded_demo` (configs/ablations.py
varies them, so they live in the package).
"""
import ml_collections

from restem_jax import configlib, recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_config_arg(arg, allowed=("runlocal",))
  return recipes.embedded_demo(runlocal="runlocal" in args)
