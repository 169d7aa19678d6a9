"""Errors that mean "the input is wrong", as opposed to bugs.

`main` prints a ConfigError as one `error: ...` line per problem, without a
traceback, and exits with status 2. The message of each problem names the
config field (`train.optimizer='adamm': use one of 'adamw', 'adafactor'`) or the
file, and what to change. This module imports nothing, so the config can be
checked before JAX, SeqIO or TensorFlow are loaded.
"""
from __future__ import annotations

from typing import Sequence


class ConfigError(ValueError):
  """A configuration that cannot work; one line per problem, each says what to change."""


def raise_if(problems: Sequence[str]) -> None:
  """Raises one ConfigError listing every problem (one per line), if there are any."""
  if problems:
    raise ConfigError("\n".join(problems))
