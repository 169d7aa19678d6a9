"""Trains the SentencePiece model shipped for the embedded task (deterministic).

    .venv/bin/python scripts/train_embedded_vocab.py [--out restem_jax/tasks/data/embedded_arith.model]

Corpus: problems of a seed no experiment uses, in the exact prompt/solution format
of the task, so every word of the generator is one or two pieces. Digits are split
(numbers are digit sequences, which a tiny model can learn to add), and byte
fallback keeps any other text (MATH, code) lossless when tests borrow this
vocabulary. Ids follow seqio/T5: pad=0, eos=1, unk=2, no bos.

Re-running produces a byte-identical model (one thread, no sampling of sentences).
"""
from __future__ import annotations

import argparse
import json
import io
import os
import sys

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from restem_jax.tasks import embedded  # noqa: E402
from restem_jax.tasks.datasets import embedded_arith  # noqa: E402

_CORPUS_SEED = 987654  # Not a seed experiments use.
DEFAULT_OUT = os.path.join(os.path.dirname(embedded.__file__), "data",
                           "embedded_arith.model")


def write_exemplars(path: str, num: int = 8) -> None:
  """Few-shot exemplars for embedded_arith (train-side skeletons, two per step count)."""
  by_steps: dict[int, list] = {}
  for p in embedded.generate(_CORPUS_SEED + 1, "train", 200):
    by_steps.setdefault(p.steps, []).append(p)
  picked = [p for k in sorted(by_steps) for p in by_steps[k][:num // len(by_steps)]]
  with open(path, "w") as f:
    json.dump([{"question": p.question, "solution": p.solution} for p in picked], f, indent=1)
    f.write("\n")


def corpus_lines(num_problems: int = 20000) -> list[str]:
  lines = []
  for p in embedded.generate(_CORPUS_SEED, "train", num_problems):
    lines.append(embedded_arith.format_with([]).render(p.question) + " " + p.solution)
  return lines


def train(out_path: str, vocab_size: int = 480) -> spm.SentencePieceProcessor:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_lines()),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      split_digits=True,
      byte_fallback=True,
      # Lossless text: no NFKC, keep whitespace runs, "\n" is a piece of its own.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      user_defined_symbols=["\n"],
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "wb") as f:
    f.write(model.getvalue())
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--vocab_size", type=int, default=480)
  args = parser.parse_args()
  write_exemplars(os.path.join(os.path.dirname(args.out), "embedded_arith_8shot.json"))
  sp = train(args.out, args.vocab_size)
  example = corpus_lines(1)[0]
  print(f"wrote {args.out}: {sp.get_piece_size()} pieces")
  print(f"{len(sp.encode(example))} tokens: {sp.encode(example, out_type=str)}")


if __name__ == "__main__":
  main()
