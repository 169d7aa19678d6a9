"""Jitted KV-cache sampler: one prefill per prompt, N samples per prompt, on-device loop.

This is the E-step's hot path. One call of `Sampler.sample` runs a single jitted
program:

  1. prefill: the right-padded prompts [P, L] go through the model once, filling a
     KV cache of length L (only the cache is kept: the prefill logits are dead
     code and XLA drops the output projection);
  2. share: the N sample rows of a prompt (row = prompt * N + sample) read that
     one prompt cache while decoding (model.SharedPrefixCache), so a prompt is
     prefilled once and stored once, not N times; each row's generated tokens
     get their own keys/values;
  3. decode: lax.while_loops feed one token per row per step. Step 0 re-feeds
     the last prompt token at its own position (its prefill slot is masked out)
     and samples the first new token from its logits; this gives every row of
     a variable-length batch the same loop without a ragged prefill gather.
     The loop runs in phases (decode_chunks): phase j attends over the
     generated slots of phases 0..j only, not over all max_new_tokens. It
     exits as soon as every row has emitted EOS (or a stop string / sequence,
     matched on device: stops.py) or the max_new_tokens budget is reached. No
     host syncs inside the loop; what it carries is a `DecodeState`.

Shapes are bucketed so new inputs rarely recompile:
  * prompt length L: next power of two >= the longest prompt, at least
    MIN_PROMPT_BUCKET (16), capped at model max_seq_len;
  * prompt count P: next power of two >= the number of prompts, rounded up to a
    multiple of partitioning.data_parallel_size(mesh) (padding prompts are
    dropped from the output);
  * generated cache length: max_new_tokens, split into phases;
  * num_samples and max_new_tokens are static (they shape the output).
`sample_chunked` (the E-step's and evaluation's one path) uses one (P, L)
shape for all its chunks, L from the longest of all its prompts: one compile
per E-step, the same executable for every evaluation of that prompt set.

Refill (Sampler(refill=True), off by default): a chunk's rows stop at
different steps (GSM8K / MATH solutions of 50-500 tokens), and a loop that
runs until its longest row stops decodes padding in the others. So one call
takes the prompts of several chunks as a queue, and a row that stops takes the
next (prompt, sample) pair at the next step: refill.py.

Decoding modes (`SamplingMode`): temperature 0 is greedy; otherwise
softmax(logits / T), restricted first to the top_k tokens (if top_k > 0), then
to the nucleus (smallest prefix, by decreasing probability, of the
renormalised distribution whose mass reaches top_p; if top_p < 1). What
selects the compiled program is static: greedy or not, top_k (it sets a
shape), top_p < 1 or not. The temperature and top_p *values* are traced, so
sweeping T = 0.7 -> 1.0 or p = 0.9 -> 0.95 reuses the same executable.

Randomness: per-row keys, independent of batching. With `rng` the caller's key
and `prompt_ids` caller-given integer ids (default: index of the prompt in the
list given to sample / sample_chunked), token t of sample j of prompt i
uses fold_in(fold_in(fold_in(rng, prompt_ids[i]), j), t). So results do not
depend on chunking, refill, batch padding or which other prompts share the call, and a
resumed E-step regenerates exactly the samples of the prompts it redoes.

Log-probs: `SampleOutput.logprobs` holds log_softmax(model logits) at the chosen
token, i.e. the model's own log p(y_t | prefix) at temperature 1 without top-k /
top-p truncation (what scoring and the M-step loss see), not the log-prob
under the truncated, tempered sampling distribution.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from restem_jax import model as M
from restem_jax.encoding import encode_prompt  # noqa: F401  (callers use sampling.encode_prompt)
from restem_jax import partitioning
from restem_jax import refill as refill_lib
from restem_jax import stops as stops_lib

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  """How the next token is chosen. temperature == 0 means greedy (top_k/top_p unused)."""
  temperature: float = 0.0
  top_k: int = 0  # 0 disables top-k.
  top_p: float = 1.0  # 1.0 disables nucleus sampling.

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"SamplingMode.temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"SamplingMode.top_k={self.top_k} must be >= 0 (0 disables top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingMode.top_p={self.top_p} must be in (0, 1]")

  @classmethod
  def from_config(cls, c: Any) -> "SamplingMode":
    """From a config block with temperature / top_k / top_p (config.sampling, config.eval)."""
    return cls(temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def static_key(self) -> tuple[bool, int, bool]:
    """The parts that select a compiled program: (greedy, top_k, uses top-p)."""
    if self.greedy:
      return (True, 0, False)
    return (False, self.top_k, self.top_p < 1.0)


GREEDY = SamplingMode()


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray  # [B, N, T] int32, pad_id after EOS / stop / budget.
  lengths: np.ndarray  # [B, N] int32, tokens generated, EOS (or stop sequence) included.
  logprobs: np.ndarray  # [B, N, T] float32, model log p of each token; 0 at padding.
  done: np.ndarray  # [B, N] bool: EOS (or a stop sequence) was emitted.
  steps: int = 0  # Decode steps the loop ran (< max_new_tokens when all rows stopped early).


def decode_completions(vocab: Any, out: SampleOutput) -> list[list[str]]:
  """[P][N] completion texts, cut at EOS. A stop string stays in (with the rest
  of the token that completed it): Task.postprocess cuts there."""
  texts = []
  for b in range(out.tokens.shape[0]):
    row = []
    for n in range(out.tokens.shape[1]):
      ids = [int(t) for t in out.tokens[b, n, : out.lengths[b, n]]]
      if ids and ids[-1] == vocab.eos_id:
        ids = ids[:-1]
      row.append(vocab.decode(ids))
    texts.append(row)
  return texts


@flax.struct.dataclass
class DecodeState:
  """What the decode loop carries from one step to the next (B rows, T = max_new_tokens)."""
  step: jax.Array  # int32 []: tokens decoded so far = the output column written next.
  caches: list  # One M.SharedPrefixCache per layer.
  token_B: jax.Array  # int32: the token fed at this step (last prompt token at step 0).
  position_B: jax.Array  # int32: its position.
  done_B: jax.Array  # bool: the row emitted EOS or completed a stop.
  length_B: jax.Array  # int32: tokens generated, EOS / stop token included.
  tokens_BxT: jax.Array  # int32: generated tokens, pad_id after the row stopped.
  logprobs_BxT: jax.Array  # float32: model log p of each token, 0 at padding.
  stop_states: tuple  # int32 [B] per StopTable: the row's automaton state.


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, static: tuple[bool, int, bool],
                  temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next token per row. `static` = SamplingMode.static_key(); values traced."""
  greedy, top_k, use_top_p = static
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k or use_top_p:
    # Candidates sorted by decreasing logit. With top-k only k of them (cheap);
    # nucleus alone needs the whole vocabulary sorted.
    k = top_k if top_k else scaled_BxV.shape[-1]
    cand_BxK, index_BxK = jax.lax.top_k(scaled_BxV, k)
  else:
    cand_BxK, index_BxK = scaled_BxV, None
  if use_top_p:
    probs_BxK = jax.nn.softmax(cand_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    # Keep a token while the mass strictly before it is < p: the smallest prefix
    # reaching p. The first candidate always survives (mass before it is 0).
    cand_BxK = jnp.where(mass_before_BxK < top_p, cand_BxK, -jnp.inf)
  choice_B = jax.vmap(jax.random.categorical)(keys_B, cand_BxK).astype(jnp.int32)
  if index_BxK is None:
    return choice_B
  return jnp.take_along_axis(index_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_from_logits(logits_BxV: jax.Array, keys_B: jax.Array,
                       mode: SamplingMode) -> jax.Array:
  """choose_tokens for a SamplingMode (tests, callers with their own logits)."""
  return choose_tokens(logits_BxV, keys_B, mode.static_key(),
                       jnp.float32(mode.temperature or 1.0), jnp.float32(mode.top_p))


def prefill_cache(cfg: M.ModelConfig, mesh: Mesh, params: Any, prompts_PxL: jax.Array) -> M.Cache:
  """KV cache [layers, P, K, L, H] of P right-padded prompts, one row per prompt (traceable).

  The prompts run through the model once, into a cache as long as the prompt
  bucket L; the logits are unused, so XLA drops the output projection. Slots
  at and after a prompt's length hold padding keys that the decode masks out.
  """
  num_p, prompt_len = prompts_PxL.shape
  shape = M.cache_shape(cfg, num_p, prompt_len)
  sharding = partitioning.sharding_for(mesh, M.CACHE_AXES, shape)
  cache = {k: jax.lax.with_sharding_constraint(jnp.zeros(shape, cfg.compute_dtype), sharding)
           for k in ("k", "v")}
  positions_PxL = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompts_PxL.shape)
  _, cache = M.Transformer(cfg, mesh).apply({"params": params}, prompts_PxL, positions_PxL,
                                            cache=cache)
  return cache


MIN_PHASE_TOKENS = 32


def decode_chunks(max_new_tokens: int, max_phases: int) -> list[int]:
  """Sizes of the generated-cache chunks, one per decode phase.

  Phase j decodes the tokens of chunk j while attending over chunks 0..j, so
  J phases read on average (J + 1) / 2J of the generated slots. Each phase is
  its own copy of the loop body in the compiled program, so J is capped
  (max_phases) and phases are at least MIN_PHASE_TOKENS long: short
  generations (tests, greedy evaluation of short answers) compile one loop.
  """
  phases = max(1, min(max_phases, max_new_tokens // MIN_PHASE_TOKENS))
  size = -(-max_new_tokens // phases)
  return [size] * (phases - 1) + [max_new_tokens - size * (phases - 1)]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def prompt_chunks(num_prompts: int, num_samples: int, max_batch: int) -> list[range]:
  """The prompts of each call of `Sampler.sample_chunked`: max_batch // num_samples each.

  The E-step names its resume units (shard/stats files) by these indices.
  """
  per_chunk = max_batch // num_samples
  if per_chunk < 1:
    raise ValueError(f"max_batch={max_batch} is too small for num_samples={num_samples}: it must "
                     f"be >= {num_samples} (rows per sampler call = prompts x samples)")
  return [range(s, min(s + per_chunk, num_prompts)) for s in range(0, num_prompts, per_chunk)]


class Sampler:
  """Samples completions for batches of prompts with one compiled program per shape bucket.

  Args:
    model_cfg: the model's architecture.
    mesh: the (data, fsdp, tensor) mesh; params must be (or will be moved) on
      model.param_shardings(model_cfg, mesh). Rows are split over data x fsdp.
    eos_id: end-of-sequence token; a row stops after emitting it.
    pad_id: written after a row stops.
    stop_sequences: optional token sequences that also stop a row (included in
      the output, like EOS).
    stop_strings: texts that stop a row as soon as its decoded completion
      contains one (the task's `stop_strings`: a few-shot model starting the
      next exemplar), unless a call names its own (`stop_strings=` of sample /
      sample_chunked: evaluating another task with the same sampler). Matched
      on the text, whatever the tokenization (stops.py); the completing token
      stays in the output.
    vocabulary: the seqio.Vocabulary that decodes the sampled ids (needed for
      stop strings).
    max_decode_phases: the decode loop runs in up to this many phases (see
      decode_chunks); 1 attends over all max_new_tokens slots at every step.
    refill: sample_chunked refills rows (refill.py); False (the default): one call per
      chunk, each decoding until its longest row stops (the phased loop).
    refill_window: chunks per refilling call (its queue); the rows drain at the
      end of a call, and the next call is dispatched before this one is fetched.
    refill_prompts: prompt slots of a refilling call (each holds one prompt's
      cache until its N samples stop); 0: 3 x the prompts of a chunk.
  """

  def __init__(self, model_cfg: M.ModelConfig, mesh: Mesh, *, eos_id: int, pad_id: int = 0,
               stop_sequences: Sequence[Sequence[int]] = (), stop_strings: Sequence[str] = (),
               vocabulary: Any = None, max_decode_phases: int = 4, refill: bool = False,
               refill_window: int = 8, refill_prompts: int = 0):
    partitioning.check_model_fits_mesh(model_cfg, mesh)
    if refill_window < 1:
      raise ValueError(f"refill_window={refill_window} must be >= 1 (chunks per refill call)")
    if refill_prompts < 0:
      raise ValueError(f"refill_prompts={refill_prompts} must be >= 0 (0: 3 x a chunk's prompts)")
    self.refill_prompts = int(refill_prompts)
    self.max_decode_phases = int(max_decode_phases)
    self.refill, self.refill_window = bool(refill), int(refill_window)
    # Decode work so far (benchmarks/estep.py): tokens kept (up to each row's
    # stop) and row-steps decoded (rows x loop steps, padding rows included).
    self.decode_stats = {"tokens": 0, "row_steps": 0, "steps": 0}
    self.cfg, self.mesh = model_cfg, mesh
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)
    self.vocabulary = vocabulary
    self._token_stops = tuple(
        [stops_lib.StopTable.from_token_sequences(stop_sequences, model_cfg.vocab_size)]
        if any(len(s) for s in stop_sequences) else [])
    self.stop_strings = tuple(s for s in stop_strings if s)
    # Stop strings -> their tables (token sequences' first) and those on the mesh.
    self._stops: dict[tuple[str, ...], tuple[tuple[stops_lib.StopTable, ...], Any]] = {}
    self.dp = partitioning.data_parallel_size(mesh)
    self._param_shardings = M.param_shardings(model_cfg, mesh)
    self._jitted: dict[tuple, Any] = {}
    self.stop_tables()  # Bad stop strings fail here, before any work.

  # ----------------------------------------------------------------- public API

  def sample(self, params: Any, prompts: Sequence[Sequence[int]], *, num_samples: int,
             max_new_tokens: int, mode: SamplingMode, rng: jax.Array,
             prompt_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] | None = None) -> SampleOutput:
    """Samples num_samples completions per prompt; outputs are [len(prompts), num_samples, ...].

    stop_strings: None = the sampler's own; () = none (EOS and budget only).
    """
    prompts = [list(p) for p in prompts]
    self._validate(prompts, num_samples, max_new_tokens, mode)
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    self._check_ids(ids, len(prompts))
    shape = (self._batch_bucket(len(prompts)), self._prompt_bucket(prompts))
    stops = self._stop_tables(stop_strings)[1]
    return self._fetch(self._launch(params, prompts, ids, shape, num_samples, max_new_tokens,
                                    mode, rng, stops))

  def sample_chunked(self, params: Any, prompts: Sequence[Sequence[int]], *, num_samples: int,
                     max_new_tokens: int, mode: SamplingMode, rng: jax.Array, max_batch: int,
                     prompt_ids: Sequence[int] | None = None,
                     chunks: Sequence[int] | None = None,
                     stop_strings: Sequence[str] | None = None,
                     refill: bool | None = None
                     ) -> Iterator[tuple[slice, SampleOutput]]:
    """Yields (slice of `prompts`, its SampleOutput) per chunk of max_batch // num_samples prompts.

    The chunks are `prompt_chunks(len(prompts), num_samples, max_batch)`;
    `chunks` picks some of them by index, in that order (a resumed E-step
    skips finished ones). Rows per call are max_batch rounded down to a
    multiple of num_samples, padded up to a multiple of num_samples x the
    data-parallel size, so device memory does not grow with the number of
    problems. Every chunk has the same padded shape, set by all of `prompts`
    whichever chunks run (one compile). Keys are per prompt id (default: the
    index in `prompts`), so the concatenated result equals `sample(...)` on
    all prompts whatever max_batch is. The next chunk is dispatched before the
    current one is copied to the host, so the caller's scoring and writing
    overlap the device work. stop_strings: as in `sample`.

    Refill (refill=None: the sampler's `refill`): a call decodes the prompts of
    up to refill_window chunks with one chunk's rows; a row that stops takes the
    next (prompt, sample) pair of the queue at once (refill.py) instead of idling
    until the chunk's longest row stops. Keys are per (prompt id, sample, token
    index), so the outputs are the same with and without refill.
    SampleOutput.steps is then the call's.
    """
    prompts = [list(p) for p in prompts]
    self._validate(prompts, num_samples, max_new_tokens, mode)
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    self._check_ids(ids, len(prompts))
    ranges = prompt_chunks(len(prompts), num_samples, max_batch)
    per_chunk = max_batch // num_samples
    shape = (min(_round_up(per_chunk, self.dp), self._batch_bucket(len(prompts))),
             self._prompt_bucket(prompts))
    stops = self._stop_tables(stop_strings)[1]
    todo = list(range(len(ranges)) if chunks is None else chunks)
    if self.refill if refill is None else refill:
      yield from self._refill_chunks(params, prompts, ids, ranges, todo, shape, num_samples,
                                     max_new_tokens, mode, rng, stops)
      return
    pending = None
    for c in todo:
      sl = slice(ranges[c].start, ranges[c].stop)
      handle = self._launch(params, prompts[sl], ids[sl], shape, num_samples, max_new_tokens,
                            mode, rng, stops)
      if pending is not None:
        yield pending[0], self._fetch(pending[1])
      pending = (sl, handle)
    if pending is not None:
      yield pending[0], self._fetch(pending[1])

  def stop_tables(self, stop_strings: Sequence[str] | None = None
                  ) -> tuple[stops_lib.StopTable, ...]:
    """The stop tables of a call with `stop_strings` (None = the sampler's own)."""
    return self._stop_tables(stop_strings)[0]

  def _stop_tables(self, stop_strings: Sequence[str] | None
                   ) -> tuple[tuple[stops_lib.StopTable, ...], Any]:
    strings = self.stop_strings if stop_strings is None else tuple(s for s in stop_strings if s)
    if strings not in self._stops:
      tables = self._token_stops
      if strings:
        if self.vocabulary is None:
          raise ValueError(f"stop strings {strings} need the vocabulary that decodes the sampled "
                           "ids: Sampler(..., vocabulary=)")
        tables += (stops_lib.StopTable.from_strings(strings, self.vocabulary,
                                                    self.cfg.vocab_size),)
      on_mesh = tuple(jax.device_put(t.next_SxV, partitioning.replicated(self.mesh))
                      for t in tables)
      self._stops[strings] = (tables, on_mesh)
    return self._stops[strings]

  def num_compiled(self) -> int:
    """Compiled executables so far (tests check that buckets are reused)."""
    return sum(f._cache_size() for f in self._jitted.values())

  # ------------------------------------------------------------------ checks

  def _validate(self, prompts: list[list[int]], num_samples: int, max_new_tokens: int,
                mode: SamplingMode) -> None:
    cfg = self.cfg
    if not isinstance(mode, SamplingMode):
      raise TypeError(f"mode must be a SamplingMode, got {type(mode).__name__}")
    if num_samples < 1 or max_new_tokens < 1:
      raise ValueError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} "
                       "must both be >= 1")
    if not mode.greedy and mode.top_k > cfg.vocab_size:
      raise ValueError(f"top_k={mode.top_k} exceeds vocab_size={cfg.vocab_size}")
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"prompt {i} is empty: the sampler needs at least one prompt token")
      if len(p) > cfg.max_seq_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens, longer than the model context "
                         f"max_seq_len={cfg.max_seq_len}")
      if len(p) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt {i} has {len(p)} tokens + max_new_tokens={max_new_tokens} = "
            f"{len(p) + max_new_tokens} > max_seq_len={cfg.max_seq_len} (the KV cache length)")

  @staticmethod
  def _check_ids(ids: list[int], n: int) -> None:
    if len(ids) != n:
      raise ValueError(f"prompt_ids has {len(ids)} entries for {n} prompts")
    if any(not 0 <= int(i) < 2 ** 31 for i in ids):
      raise ValueError("prompt_ids must be integers in [0, 2**31)")

  def _prompt_bucket(self, prompts: list[list[int]]) -> int:
    longest = max((len(p) for p in prompts), default=1)
    return min(self.cfg.max_seq_len, max(MIN_PROMPT_BUCKET, _next_pow2(longest)))

  def _batch_bucket(self, n: int) -> int:
    return _round_up(_next_pow2(max(n, 1)), self.dp)

  # ------------------------------------------------------------- execution

  def _launch(self, params: Any, prompts: list[list[int]], ids: list[int],
              shape: tuple[int, int], num_samples: int, max_new_tokens: int,
              mode: SamplingMode, rng: jax.Array, stops: tuple[jax.Array, ...]
              ) -> tuple[int, int, Any]:
    """Dispatches one padded batch (asynchronously); returns what _fetch needs."""
    num_p, prompt_len = shape
    tokens_PxL = np.full((num_p, prompt_len), self.pad_id, np.int32)
    lengths_P = np.ones((num_p,), np.int32)  # padding prompts: one pad token
    ids_P = np.zeros((num_p,), np.int32)
    for i, p in enumerate(prompts):
      tokens_PxL[i, :len(p)] = p
      lengths_P[i] = len(p)
      ids_P[i] = ids[i]
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    fn = self._program(num_samples, max_new_tokens, mode.static_key())
    mesh = self.mesh

    def put(x: np.ndarray) -> jax.Array:
      # Every host holds the whole (small) prompt batch; each device takes its rows.
      return partitioning.put_global(x, partitioning.batch_sharding(mesh, x.ndim))

    out = fn(params, rng, put(tokens_PxL), put(lengths_P), put(ids_P), stops,
             jnp.float32(mode.temperature or 1.0), jnp.float32(mode.top_p))
    return len(prompts), num_samples, out

  def _fetch(self, handle: tuple[int, int, Any]) -> SampleOutput:
    n_real, n, (tokens_BxT, lengths_B, logprobs_BxT, done_B, steps) = handle[:3]
    slot_rows = handle[3] if len(handle) > 3 else tokens_BxT.shape[0]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      get = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    else:
      get = np.asarray
    rows = n_real * n
    fold = lambda x: get(x)[:rows].reshape((n_real, n) + x.shape[1:])
    out = SampleOutput(tokens=fold(tokens_BxT), lengths=fold(lengths_B),
                       logprobs=fold(logprobs_BxT), done=fold(done_B), steps=int(get(steps)))
    self.decode_stats["tokens"] += int(out.lengths.sum())
    self.decode_stats["row_steps"] += out.steps * slot_rows
    self.decode_stats["steps"] += out.steps
    return out

  def _program(self, num_samples: int, max_new_tokens: int, static: tuple[bool, int, bool]):
    key = (num_samples, max_new_tokens, static)
    if key not in self._jitted:
      mesh = self.mesh
      rows2, rows1 = partitioning.batch_sharding(mesh, 2), partitioning.batch_sharding(mesh, 1)
      rep = partitioning.replicated(mesh)
      self._jitted[key] = jax.jit(
          functools.partial(self._generate, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, static=static),
          in_shardings=(self._param_shardings, rep, rows2, rows1, rows1, rep, rep, rep),
          out_shardings=(rows2, rows1, rows2, rows1, rep))
    return self._jitted[key]

  def _generate(self, params: Any, rng: jax.Array, prompts_PxL: jax.Array,
                prompt_lengths_P: jax.Array, ids_P: jax.Array, stop_tables: tuple[jax.Array, ...],
                temperature: jax.Array, top_p: jax.Array, *, num_samples: int,
                max_new_tokens: int, static: tuple[bool, int, bool]):
    cfg, mesh, n, T = self.cfg, self.mesh, num_samples, max_new_tokens
    num_p, prompt_len = prompts_PxL.shape
    b = num_p * n

    # 1-2. Prefill each prompt once. Its n rows share that cache while decoding
    # (M.SharedPrefixCache); each layer's cache is its own array, split here,
    # once (M.decode_step says why; the weights are per-layer arrays already). Decode
    # step 0 feeds the last prompt token again (its logits give the first new
    # token), so its prefill slot is masked out: it would be attended twice.
    cache = prefill_cache(cfg, mesh, params, prompts_PxL)
    prompt_valid_PxL = jnp.arange(prompt_len)[None, :] < (prompt_lengths_P - 1)[:, None]
    chunks = decode_chunks(T, self.max_decode_phases)
    layer_caches = [M.SharedPrefixCache.create(lc, prompt_valid_PxL, n, chunks).constrain(mesh)
                    for lc in M.split_layers(cache, cfg.n_layers)]
    last_P = jnp.take_along_axis(prompts_PxL, (prompt_lengths_P - 1)[:, None], axis=1)[:, 0]
    token_B = jnp.repeat(last_P, n)
    position_B = jnp.repeat(prompt_lengths_P - 1, n)
    prompt_keys_P = jax.vmap(jax.random.fold_in, (None, 0))(rng, ids_P)
    row_keys_B = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(
        k, jnp.arange(n)))(prompt_keys_P).reshape(b)

    # 3. Decode until every row stopped or the budget is spent, in phases: phase
    # j fills generated-cache chunk j and attends over chunks 0..j only.
    def cond(state: DecodeState, end: int) -> jax.Array:
      return (state.step < end) & ~jnp.all(state.done_B)

    def body(state: DecodeState) -> DecodeState:
      t = state.step
      logits_Bx1xV, caches = M.decode_step(cfg, mesh, params, state.token_B[:, None],
                                           state.position_B[:, None], state.caches)
      logits_BxV = logits_Bx1xV[:, 0]
      step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
      new_B = choose_tokens(logits_BxV, step_keys_B, static, temperature, top_p)
      # Model log-prob of the chosen token: logit - logsumexp (no full log_softmax).
      logp_B = (jnp.take_along_axis(logits_BxV, new_B[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(logits_BxV, axis=-1))
      active_B = ~state.done_B
      new_B = jnp.where(active_B, new_B, self.pad_id)
      logp_B = jnp.where(active_B, logp_B, 0.0)
      stopped_B = new_B == self.eos_id
      # Each stop automaton moves by the new token (one gather); reaching its
      # absorbing state means a stop string / sequence just ended.
      stop_states = tuple(table_SxV[s_B, new_B]
                          for table_SxV, s_B in zip(stop_tables, state.stop_states))
      for table_SxV, s_B in zip(stop_tables, stop_states):
        stopped_B |= s_B == table_SxV.shape[0] - 1
      step_B = active_B.astype(jnp.int32)
      return DecodeState(
          step=t + 1, caches=[c.constrain(mesh) for c in caches], token_B=new_B,
          position_B=state.position_B + step_B, done_B=state.done_B | (active_B & stopped_B),
          length_B=state.length_B + step_B,
          tokens_BxT=jax.lax.dynamic_update_slice(state.tokens_BxT, new_B[:, None], (0, t)),
          logprobs_BxT=jax.lax.dynamic_update_slice(state.logprobs_BxT, logp_B[:, None], (0, t)),
          stop_states=stop_states)

    state = DecodeState(
        step=jnp.int32(0), caches=layer_caches, token_B=token_B, position_B=position_B,
        done_B=jnp.zeros((b,), bool), length_B=jnp.zeros((b,), jnp.int32),
        tokens_BxT=jnp.full((b, T), self.pad_id, jnp.int32),
        logprobs_BxT=jnp.zeros((b, T), jnp.float32),
        # Every automaton starts in its `start` state (StopTable: the second-to-last row).
        stop_states=tuple(jnp.full((b,), t.shape[0] - 2, jnp.int32) for t in stop_tables))
    end = 0
    for phase, size in enumerate(chunks):
      end += size
      state = state.replace(caches=[c.replace(active=phase + 1) for c in state.caches])
      state = jax.lax.while_loop(functools.partial(cond, end=end), body, state)
    return state.tokens_BxT, state.length_B, state.logprobs_BxT, state.done_B, state.step

  # ----------------------------------------------------------------- refill

  def _refill_chunks(self, params: Any, prompts: list[list[int]], ids: list[int],
                     ranges: list[range], todo: list[int], shape: tuple[int, int],
                     num_samples: int, max_new_tokens: int, mode: SamplingMode,
                     rng: jax.Array, stops: tuple[jax.Array, ...]
                     ) -> Iterator[tuple[slice, SampleOutput]]:
    """sample_chunked with refill: refill_window chunks per call, yielded chunk by chunk."""
    num_slots, prompt_len = shape
    per_chunk = len(ranges[0])
    queue = max(num_slots, _round_up(min(self.refill_window * per_chunk, len(prompts)), self.dp))
    windows = [todo[i:i + self.refill_window] for i in range(0, len(todo), self.refill_window)]
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    fn = self._refill_program(num_slots, num_samples, max_new_tokens, mode.static_key())
    put = lambda x: partitioning.put_global(x, partitioning.batch_sharding(self.mesh, x.ndim))

    def launch(window: list[int]):
      rows = [i for c in window for i in ranges[c]]
      tokens_QxL = np.full((queue, prompt_len), self.pad_id, np.int32)
      lengths_Q = np.ones((queue,), np.int32)
      ids_Q = np.zeros((queue,), np.int32)
      for q, i in enumerate(rows):
        tokens_QxL[q, :len(prompts[i])] = prompts[i]
        lengths_Q[q], ids_Q[q] = len(prompts[i]), ids[i]
      out = fn(params, rng, put(tokens_QxL), put(lengths_Q), put(ids_Q), jnp.int32(len(rows)),
               stops, jnp.float32(mode.temperature or 1.0), jnp.float32(mode.top_p))
      return window, (len(rows), num_samples, out, num_slots * num_samples)

    def split(window: list[int], handle: tuple) -> Iterator[tuple[slice, SampleOutput]]:
      out, start = self._fetch(handle), 0
      for c in window:
        k = len(ranges[c])
        yield slice(ranges[c].start, ranges[c].stop), SampleOutput(
            tokens=out.tokens[start:start + k], lengths=out.lengths[start:start + k],
            logprobs=out.logprobs[start:start + k], done=out.done[start:start + k],
            steps=out.steps)
        start += k

    pending = None
    for window in windows:
      launched = launch(window)
      if pending is not None:
        yield from split(*pending)
      pending = launched
    if pending is not None:
      yield from split(*pending)

  def _refill_program(self, num_slots: int, num_samples: int, max_new_tokens: int,
                      static: tuple[bool, int, bool]):
    key = ("refill", num_slots, num_samples, max_new_tokens, static)
    if key not in self._jitted:
      mesh = self.mesh
      rows2, rows1 = partitioning.batch_sharding(mesh, 2), partitioning.batch_sharding(mesh, 1)
      rep = partitioning.replicated(mesh)
      self._jitted[key] = jax.jit(
          functools.partial(self._generate_refill, num_slots=num_slots, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, static=static),
          in_shardings=(self._param_shardings, rep, rows2, rows1, rows1, rep, rep, rep, rep),
          out_shardings=(rows2, rows1, rows2, rows1, rep))
    return self._jitted[key]

  def _generate_refill(self, params: Any, rng: jax.Array, queue_QxL: jax.Array,
                       queue_lengths_Q: jax.Array, ids_Q: jax.Array, num_real: jax.Array,
                       stop_tables: tuple[jax.Array, ...], temperature: jax.Array,
                       top_p: jax.Array, *, num_slots: int, num_samples: int,
                       max_new_tokens: int, static: tuple[bool, int, bool]):
    """The first num_real queue prompts, N samples each, on num_slots x N rows (refill.py)."""
    return refill_lib.generate(
        self.cfg, self.mesh, params, rng, queue_QxL, queue_lengths_Q, ids_Q, num_real,
        stop_tables, temperature, top_p, num_rows=num_slots * num_samples,
        num_prompt_slots=self.refill_prompts or 3 * num_slots, num_samples=num_samples,
        max_new_tokens=max_new_tokens, static=static, eos_id=self.eos_id, pad_id=self.pad_id,
        prefill=prefill_cache, choose=choose_tokens)
