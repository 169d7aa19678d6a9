"""The dataset registry: config.task.name -> its spec (tasks/spec.py), one line each.

Adding a dataset: a module here defining `SPEC`, and its line below.
"""
from __future__ import annotations

from restem_jax.tasks.datasets import apps
from restem_jax.tasks.datasets import embedded_arith
from restem_jax.tasks.datasets import gsm8k
from restem_jax.tasks.datasets import gsm8k_tfds
from restem_jax.tasks.datasets import humaneval
from restem_jax.tasks.datasets import jsonl
from restem_jax.tasks.datasets import math
from restem_jax.tasks.datasets import reasoning_gym
from restem_jax.tasks.spec import DataLayoutError, DatasetSpec

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    embedded_arith.SPEC,
    gsm8k.SPEC,
    math.SPEC,
    apps.SPEC,
    humaneval.SPEC,
    gsm8k_tfds.SPEC,
    reasoning_gym.SPEC,
    jsonl.SPEC,
)}


def dataset_names() -> tuple[str, ...]:
  """The values config.task.name may take."""
  return tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
  """The spec of dataset `name`; DataLayoutError (one line, the known names) if unknown."""
  if name not in SPECS:
    raise DataLayoutError(f"unknown task.name {name!r}; one of {dataset_names()}")
  return SPECS[name]
