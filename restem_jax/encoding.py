"""The token ids a model is fed for a prompt: the one definition that the sampler's
callers (E-step, evaluation), the M-step's examples and the tasks' length filter share.

It imports nothing, so the tasks (which configlib loads before JAX) can use it.
"""
from __future__ import annotations

from typing import Any


def encode_prompt(vocab: Any, text: str) -> list[int]:
  """Ids of a prompt: a sequence start, so BOS first for models trained with one (Gemma,
  Llama 3: the vocabulary's own `encode_prompt`); plain `encode` for vocabularies
  without it (the embedded SentencePiece model)."""
  encode = getattr(vocab, "encode_prompt", None)
  return list(encode(text)) if encode is not None else list(vocab.encode(text))
