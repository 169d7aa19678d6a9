r"""Stop conditions on device: a text automaton the decode loop advances one token per step.

A task's stop strings (e.g. GSM8K's "\n\nQ:", where a few-shot model starts the
next exemplar) reach the model's output in many tokenizations: "\n\n" + "Q:",
"\n" + "\nQ" + ":", ".\n\n" + "Q", ... and a token can carry a stop string's
last characters plus more text. Matching token-id sequences would need every
tokenization that can occur, so the sampler matches the decoded TEXT instead:

  * every token id v gets its text as decoding shows it inside a completion
    (decode([a, v]) minus decode([a]) for a one-character token a) and, for the
    first generated token, as decoding shows it at the start (decode([v]):
    SentencePiece drops a leading space there);
  * an Aho-Corasick automaton over the stop strings' characters (every other
    character is one class) is run on the host, once, through every token's
    text from every automaton state. The result is one table
        next_SxV[state, v]   (= STOPPED when a stop string ends inside v's text)
    of (trie nodes + 2) x vocab int32: 7 x 49152 for GSM8K's two stop strings
    with SmolLM2's vocabulary. The decode loop keeps one state per row and does
    one gather per step; no host round trip.

Exactness. The row stops right after the token in whose text a stop string
first ends, so the completion's text up to there is the same as without
stops, and `Task.postprocess` (cut at the first stop string) gives the same
answer; tests/test_sampling.py checks this row by row on SmolLM2's byte-level
BPE and on the embedded SentencePiece model against a run without stops.
Two refinements keep that true:
  * a token that is part of a multi-byte character (byte-level BPE, byte
    fallback) decodes to U+FFFD alone; such text never matches a stop string
    (stop strings containing U+FFFD are refused), so at worst a row misses an
    early stop (it then runs on and is cut afterwards), it never stops wrongly;
  * a stop string that lies strictly inside another one (not at its end) is
    left to the host-side cut: stopping on it could end the row before the
    longer string, which starts earlier, is complete.

Token-id stop sequences (`from_token_sequences`) use the same automaton with
token ids as the characters.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Hashable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class StopTable:
  """Automaton transitions per token: row = state, column = token id.

  States: 0 = nothing matched, 1 .. n-1 = partial matches, `start` = before the
  first generated token, `stopped` (absorbing) = a stop string/sequence ended.
  """
  next_SxV: np.ndarray  # int32 [n + 2, vocab]
  patterns: tuple  # The stop strings / token sequences the table stops on.

  @property
  def start(self) -> int:
    return self.next_SxV.shape[0] - 2

  @property
  def stopped(self) -> int:
    return self.next_SxV.shape[0] - 1

  @classmethod
  def from_token_sequences(cls, sequences: Sequence[Sequence[int]],
                           vocab_size: int) -> "StopTable":
    """Stops when the generated tokens end with one of `sequences` (prompt tokens never count)."""
    patterns = [tuple(int(t) for t in s) for s in sequences if len(s)]
    for s in patterns:
      if not all(0 <= t < vocab_size for t in s):
        raise ValueError(f"stop sequence {list(s)} has ids outside [0, vocab_size={vocab_size})")
    symbols = [(v,) for v in range(vocab_size)]
    return cls(_table(patterns, symbols, symbols), tuple(patterns))

  @classmethod
  def from_strings(cls, strings: Sequence[str], vocabulary: Any, vocab_size: int) -> "StopTable":
    """Stops when the completion's decoded text contains one of `strings`.

    vocabulary: a seqio.Vocabulary (decode); vocab_size: the model's (logits)
    size, which may exceed the vocabulary's: extra ids decode as seqio maps them.
    """
    bad = [s for s in strings if "\ufffd" in s]
    if bad:
      raise ValueError(f"stop strings {bad} contain U+FFFD, which partial-character tokens "
                       "decode to; they cannot be matched")
    patterns = on_device_strings([s for s in strings if s])
    first, inside = token_texts(vocabulary, vocab_size)
    return cls(_table([tuple(s) for s in patterns], inside, first), tuple(patterns))


def on_device_strings(strings: Sequence[str]) -> list[str]:
  """The stop strings a row may stop on: those not strictly inside another one.

  If "b" lies inside "abc" (not as its suffix), text "...abc" must be cut at
  "a" (postprocess takes the earliest match); stopping as soon as "b" appears
  would leave only "...ab" and the cut would land on "b". Stopping on "abc"
  and on the other strings still ends most rows early.
  """
  unique = list(dict.fromkeys(strings))

  def inside(z: str, w: str) -> bool:
    return any(w.startswith(z, i) for i in range(1, len(w) - len(z)))
  return [z for z in unique if not any(z != w and inside(z, w) for w in unique)]


def token_texts(vocabulary: Any, vocab_size: int) -> tuple[list[str], list[str]]:
  """(text of each id as a completion's first token, text of each id after another token)."""
  anchor = vocabulary.encode("a")[-1:]
  head = vocabulary.decode(anchor)
  if not anchor or not head:
    raise ValueError(f"{vocabulary!r}: 'a' does not encode to a token that decodes to text")
  # A vocabulary with a batched decode (importers.BPEVocabulary) does this in one call.
  decode_all = getattr(vocabulary, "decode_batch", None) or (
      lambda rows: [vocabulary.decode(r) for r in rows])
  first = decode_all([[v] for v in range(vocab_size)])
  pairs = decode_all([anchor + [v] for v in range(vocab_size)])
  inside = []
  for v, pair in enumerate(pairs):
    if not pair.startswith(head):
      raise ValueError(f"{vocabulary!r}: decode({anchor + [v]}) = {pair!r} does not start with "
                       f"decode({anchor}) = {head!r}; stop strings need per-token text")
    inside.append(pair[len(head):])
  return first, inside


def _automaton(patterns: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, dict]:
  """Aho-Corasick: goto [nodes, classes], accepting [nodes], symbol -> class (0 = any other)."""
  classes = {s: i + 1 for i, s in enumerate(dict.fromkeys(s for p in patterns for s in p))}
  children: list[dict[int, int]] = [{}]
  accept = [False]
  for p in patterns:
    node = 0
    for s in p:
      c = classes[s]
      if c not in children[node]:
        children[node][c] = len(children)
        children.append({})
        accept.append(False)
      node = children[node][c]
    accept[node] = True
  goto = np.zeros((len(children), len(classes) + 1), np.int32)
  fail = [0] * len(children)
  queue = collections.deque()
  for c, child in children[0].items():
    goto[0, c] = child
    queue.append(child)
  while queue:  # Breadth first: a node's failure link is shallower, hence done.
    u = queue.popleft()
    accept[u] = accept[u] or accept[fail[u]]
    if u:
      goto[u] = goto[fail[u]]
    for c, child in children[u].items():
      if u:
        fail[child] = goto[fail[u], c]
      goto[u, c] = child
      queue.append(child)
  return goto, np.asarray(accept), classes


def _table(patterns: Sequence[tuple], inside: Sequence[Sequence[Hashable]],
           first: Sequence[Sequence[Hashable]]) -> np.ndarray:
  """next_SxV: the automaton run through each token's symbols from every state."""
  goto, accept, classes = _automaton(patterns)
  n, vocab = goto.shape[0], len(inside)
  start, stopped = n, n + 1
  table = np.zeros((n + 2, vocab), np.int32)
  table[stopped] = stopped

  def run(symbols: Sequence[Hashable], states: np.ndarray) -> np.ndarray:
    hit = np.zeros(states.shape, bool)
    for s in symbols:
      states = goto[states, classes.get(s, 0)]
      hit |= accept[states]
    return np.where(hit, stopped, states)

  every = np.arange(n)
  for v, symbols in enumerate(inside):
    if not symbols:
      table[:n, v] = every  # Decodes to nothing (pad, control ids): no progress, no reset.
    elif any(s in classes for s in symbols):
      table[:n, v] = run(symbols, every)
    # else: 0 (set above): text without any stop symbol resets every partial match.
  for v, symbols in enumerate(first):
    if not inside[v]:
      # Decodes to nothing anywhere (pad, control ids): the next token is still
      # the first one. (SentencePiece's lone "▁" is different: empty only at
      # the start, and the token after it is not first any more.)
      table[start, v] = start
    elif any(s in classes for s in symbols):
      table[start, v] = run(symbols, np.zeros((1,), np.int32))[0]
  return table
