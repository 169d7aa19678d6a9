"""Train-step tests: the loss against float64 numpy, masking and reward weights,
learning, sharding invariance, gradient accumulation, NaN detection."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import mesh1, mesh_of
from restem_jax import batches as B, configlib, model as M, partitioning as P, training as T
from test_model import numpy_forward

V = 64
tiny_cfg = functools.partial(helpers.tiny_cfg, vocab_size=V, max_seq_len=16)


def train_cfg(**kw):
  c = configlib.default_config().train
  c.batch_size = 8
  c.learning_rate = 1e-2
  c.warmup_steps = 2
  c.max_steps = 100
  c.weight_decay = 0.01
  for k, v in kw.items():
    c[k] = v
  return c


def random_batch(seed: int, b: int = 8, seq_len: int = 12, weights=None, shape="long"):
  """Prompts and targets of different lengths, so masks and counts vary by row.

  shape "long": short prompts, targets up to the end of the row (the loss needs
  logits at every position); "short": ReST-EM's shape, long prompts and short
  targets (batches.target_window < seq_len: logits only in a window per row)."""
  rng = np.random.default_rng(seed)
  if shape == "long":
    prompts = [list(rng.integers(1, V, rng.integers(1, 5))) for _ in range(b)]
    targets = [list(rng.integers(1, V, rng.integers(1, seq_len - len(p) + 1))) for p in prompts]
  else:
    seq_len = 16
    prompts = [list(rng.integers(1, V, rng.integers(3, 12))) for _ in range(b)]
    targets = [list(rng.integers(1, V, rng.integers(1, 5))) for p in prompts]
  if weights is None:
    weights = list(rng.choice([0.0, 0.5, 1.0, 2.0], b))
  return B.make_batch(prompts, targets, weights, seq_len)


@functools.lru_cache(maxsize=None)
def trainer(shape=(1, 1, 1), micro_batches=1, normalization="token", optimizer="adamw"):
  """One Trainer (hence one compiled step) per configuration for the whole session."""
  mesh = mesh1() if shape == (1, 1, 1) else mesh_of(shape)
  tc = train_cfg(micro_batches=micro_batches, loss_normalization=normalization,
                 optimizer=optimizer)
  return T.Trainer(tiny_cfg(), tc, mesh)


@pytest.fixture(scope="module")
def params():
  return M.init_params(tiny_cfg(), mesh1(), jax.random.key(0))


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_make_batch_layout():
  b = B.make_batch([[5, 6, 7], [9]], [[1, 2], [3, 4, 8]], [1.0, 0.5], seq_len=6, pad_id=0)
  np.testing.assert_array_equal(b.tokens_BxL, [[5, 6, 7, 1, 2, 0], [9, 3, 4, 8, 0, 0]])
  # Position t predicts token t+1: the positions whose next token is a target.
  np.testing.assert_array_equal(b.loss_mask_BxL, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b.weights_B, [1.0, 0.5])
  with pytest.raises(ValueError, match="example 1 has 1 prompt \\+ 6 target tokens = 7 > seq_len=6"):
    B.make_batch([[1], [1]], [[2], [2] * 6], [1.0, 1.0], seq_len=6)


def test_target_window_by_hand():
  mask = np.zeros((3, 40), np.float32)
  mask[0, 10:13] = 1  # 3 positions
  mask[1, 30:39] = 1  # 9 positions: the widest row -> 16
  assert B.target_window(mask) == 16
  mask[2, 2] = mask[2, 38] = 1  # a row spanning 37 positions: 64 >= 40, every position
  assert B.target_window(mask) is None
  assert B.target_window(np.zeros((2, 40))) is None  # nothing to learn: no window
  assert B.target_window(mask[:1]) == 8  # at least 8
  np.testing.assert_array_equal(mask[0, 10:13], 1)  # the caller's mask is unchanged


def numpy_loss(params, batch, normalization):
  """Independent float64 loss: numpy forward, log-softmax, mask, weights, reduction."""
  cfg = tiny_cfg()
  logits = numpy_forward(params, cfg, batch.tokens_BxL)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  total, tokens, examples = 0.0, 0, 0
  for b in range(logits.shape[0]):
    seq = 0.0
    for t in range(logits.shape[1] - 1):
      if batch.loss_mask_BxL[b, t]:
        seq -= logp[b, t, batch.tokens_BxL[b, t + 1]]
        tokens += 1
    examples += int(batch.loss_mask_BxL[b].sum() > 0)
    total += float(batch.weights_B[b]) * seq
  return total / (tokens if normalization == "token" else examples)


@pytest.mark.parametrize("shape", [pytest.param("long", marks=pytest.mark.slow), "short"])
@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_matches_float64_numpy(params, normalization, shape):
  batch = random_batch(1, shape=shape)
  assert 0.0 in batch.weights_B and len(set(batch.weights_B)) > 2
  window = B.target_window(batch.loss_mask_BxL)
  assert window == (None if shape == "long" else 8)  # "short" runs the windowed path
  model = M.Transformer(tiny_cfg())
  loss, aux = T.loss_fn(params, jax.tree.map(jnp.asarray, batch), model, normalization, window)
  np.testing.assert_allclose(float(loss), numpy_loss(params, batch, normalization), rtol=2e-5)
  assert float(aux["tokens"]) == batch.loss_mask_BxL.sum()
  # The jitted eval loss is the same function.
  np.testing.assert_allclose(trainer((1, 1, 1), 1, normalization).loss(params, batch),
                             float(loss), rtol=1e-6)


@pytest.mark.slow  # Gradients of every window (~12 s of CPU).
def test_windowed_loss_has_the_full_loss_gradient(params):
  """Logits only in the target window (batches.target_window) is the same function:
  its gradient equals the every-position computation's."""
  batch = jax.tree.map(jnp.asarray, random_batch(7, shape="short"))
  model = M.Transformer(tiny_cfg())
  grad = lambda w: jax.grad(lambda p: T.loss_fn(p, batch, model, "token", w)[0])(params)
  full, windowed = host(grad(None)), host(grad(8))
  for a, b in zip(jax.tree.leaves(windowed), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
  assert max(float(np.abs(b).max()) for b in jax.tree.leaves(full)) > 1e-3  # not all zero


def test_shared_batch_layout_by_hand():
  """One prompt, then each target; positions restart after the prompt; a target's first
  token is predicted at the prompt's last index."""
  b = B.make_shared_batch([([5, 6], [([1, 2], 1.0), ([3], 0.5)]), ([9], [([4, 8, 7], 2.0)])],
                          seq_len=6, pad_id=0)
  np.testing.assert_array_equal(b.tokens_BxL, [[5, 6, 1, 2, 3, 0], [9, 4, 8, 7, 0, 0]])
  np.testing.assert_array_equal(b.positions_BxL, [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(b.segments_BxL, [[0, 0, 1, 1, 2, -1], [0, 1, 1, 1, -1, -1]])
  assert b.labels_BxT.shape == (2, 8)  # 3 target tokens at most -> T = 8
  np.testing.assert_array_equal(b.predict_at_BxT[:, :3], [[1, 2, 1], [0, 1, 2]])
  np.testing.assert_array_equal(b.labels_BxT[:, :3], [[1, 2, 3], [4, 8, 7]])
  np.testing.assert_array_equal(b.loss_mask_BxT.sum(1), [3, 3])
  np.testing.assert_array_equal(b.weights_BxT[:, :3], [[1.0, 1.0, 0.5], [2.0, 2.0, 2.0]])
  np.testing.assert_array_equal(b.examples_B, [2, 1])
  with pytest.raises(ValueError, match="row 0 has 7 tokens > seq_len=6"):
    B.make_shared_batch([([1, 2], [([3, 4], 1.0), ([5, 6, 7], 1.0)])], seq_len=6)


def shared_examples(seed: int, prompts: int = 8):
  """(rows for make_shared_batch, the same examples unpacked as make_batch lists)."""
  rng = np.random.default_rng(seed)
  rows, unpacked = [], ([], [], [])
  for _ in range(prompts):
    prompt = list(rng.integers(1, V, rng.integers(2, 9)))
    targets = [(list(rng.integers(1, V, rng.integers(1, 5))), float(rng.choice([0.0, 0.5, 2.0])))
               for _ in range(rng.integers(1, 4))]
    rows.append((prompt, targets))
    for t, w in targets:
      for part, x in zip(unpacked, (prompt, t, w)):
        part.append(x)
  return rows, unpacked


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_shared_prompt_rows_have_the_unpacked_loss(params, normalization):
  """A prompt computed once for several targets (make_shared_batch, segment masks) is the
  float64 numpy loss of the examples one per row, and has the same gradient."""
  rows, (prompts, targets, weights) = shared_examples(2)
  assert len(prompts) > len(rows)  # some prompts really are shared
  shared = jax.tree.map(jnp.asarray, B.make_shared_batch(rows, seq_len=24))
  plain = B.make_batch(prompts, targets, weights, seq_len=16)
  model = M.Transformer(tiny_cfg())
  loss, aux = T.loss_fn(params, shared, model, normalization)
  np.testing.assert_allclose(float(loss), numpy_loss(params, plain, normalization), rtol=2e-5)
  assert float(aux["tokens"]) == sum(map(len, targets))
  assert float(aux["examples"]) == len(targets)
  grad = lambda b: host(jax.grad(lambda p: T.loss_fn(p, b, model, normalization)[0])(params))
  for a, b in zip(jax.tree.leaves(grad(shared)), jax.tree.leaves(grad(jax.tree.map(jnp.asarray,
                                                                                   plain)))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_shared_prompt_rows_on_sliding_window_layers():
  """Gemma-style local layers (window 3 < the rows' lengths, local / global alternating,
  the window counted in positions that restart per target): shared rows give the loss
  of the examples one per row."""
  cfg = tiny_cfg(sliding_window=3, sliding_window_pattern=2)
  assert cfg.local_layers == (True, False)
  params = M.init_params(cfg, mesh1(), jax.random.key(5))
  rows, (prompts, targets, weights) = shared_examples(4)
  model = M.Transformer(cfg)
  shared = T.loss_fn(params, jax.tree.map(jnp.asarray, B.make_shared_batch(rows, seq_len=24)),
                     model, "token")[0]
  plain = T.loss_fn(params, jax.tree.map(jnp.asarray, B.make_batch(prompts, targets, weights,
                                                                   seq_len=16)), model, "token")[0]
  np.testing.assert_allclose(float(shared), float(plain), rtol=1e-5)


@pytest.mark.slow
def test_shared_prompt_step_on_8_devices_equals_the_unpacked_step(params):
  """Trainer.step on shared rows over a (2,2,2) mesh with 2 micro-batches == one device
  on the same examples one per row."""
  rows, (prompts, targets, weights) = shared_examples(3)
  ref = T.Trainer(tiny_cfg(), train_cfg(batch_size=len(prompts)), mesh1())
  ref_state, ref_metrics = ref.step(ref.init_state(params),
                                    B.make_batch(prompts, targets, weights, seq_len=16))
  tr = T.Trainer(tiny_cfg(), train_cfg(batch_size=len(rows), micro_batches=2),
                 mesh_of((2, 2, 2)))
  state, metrics = tr.step(tr.init_state(params), B.make_shared_batch(rows, seq_len=24))
  for k in ("loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5)
  assert_states_close(host(state), host(ref_state))


@pytest.mark.slow
def test_zero_reward_example_contributes_no_gradient(params):
  """grad(loss of B rows, row 2 at weight 0) * D_with == grad(loss without row 2) * D_without.

  Both losses are N / D with the same numerator N (row 2 adds 0 to it); only
  the denominator differs: D = target tokens ("token") or examples ("sequence"),
  and row 2 still counts in D_with.
  """
  full = random_batch(2, b=4, weights=[1.0, 0.5, 0.0, 2.0])
  without = jax.tree.map(lambda v: np.delete(v, 2, axis=0), full)
  model = M.Transformer(tiny_cfg())
  # One compile per batch shape serves both normalisations.
  grads = jax.jit(lambda p, b: [jax.grad(lambda q: T.loss_fn(q, b, model, n)[0])(p)
                                for n in ("token", "sequence")])
  (tok_with, seq_with), (tok_without, seq_without) = grads(params, full), grads(params, without)
  full_w = full.replace(weights_B=np.array([1.0, 0.5, 1.0, 2.0], np.float32))
  tok_w, _ = grads(params, full_w)
  d_tok_with, d_tok_without = full.loss_mask_BxL.sum(), without.loss_mask_BxL.sum()
  for g_with, g_without, d_with, d_without in [
      (tok_with, tok_without, d_tok_with, d_tok_without), (seq_with, seq_without, 4.0, 3.0)]:
    assert d_with != d_without  # otherwise the relation would not test the denominator
    for a, b in zip(jax.tree.leaves(g_with), jax.tree.leaves(g_without)):
      # float32 sums in another order: equal to 1e-5 of the leaf's scale (a real
      # denominator error would differ by ~1e-3 of it, see the last assertion).
      b_scaled = np.asarray(b) * d_without
      np.testing.assert_allclose(np.asarray(a) * d_with, b_scaled, rtol=1e-4,
                                 atol=1e-5 * float(np.abs(b_scaled).max()))
  # And row 2's target tokens really change the gradient once it is weighted.
  assert max(float(np.abs(np.asarray(a) * d_tok_with - np.asarray(b) * d_tok_without).max())
             for a, b in zip(jax.tree.leaves(tok_w), jax.tree.leaves(tok_without))) > 1e-3


@pytest.mark.slow
def test_training_drives_nll_down(params):
  """4 fixed (prompt, target) pairs, 60 steps: memorisation is possible (distinct
  prompts), so the target NLL must fall far below the uniform log(64) = 4.16 it
  starts near. Bound: < log(V)/4 and < 25% of the initial value."""
  tr = trainer()
  rng = np.random.default_rng(3)
  prompts = [[i + 1, int(rng.integers(1, V))] for i in range(4)]
  targets = [list(rng.integers(1, V, 8)) for _ in range(4)]
  batch = B.make_batch(prompts * 2, targets * 2, [1.0] * 8, seq_len=12)
  state = tr.init_state(params)
  first = None
  for _ in range(60):
    state, m = tr.step(state, batch)
    first = m["loss"] if first is None else first
  final = tr.loss(state.params, batch)
  assert first > 0.8 * np.log(V)
  assert final < np.log(V) / 4 and final < 0.25 * first, (first, final)
  assert int(state.step) == 60
  # The caller's params were copied, not donated.
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def assert_states_close(a, b):
  """Adam moments (the clipped gradients) tightly; params within 5% of one update.

  Adam's first update is ~lr * g / |g| per element, so elements with a near-zero
  gradient amplify float32 reduction-order noise in the params; the moments show
  the gradients themselves.
  """
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()) + 1e-12)
  lr0 = float(T.make_schedule(train_cfg(), 100)(0))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=0, atol=0.05 * lr0)
  assert int(a.step) == int(b.step)


@pytest.fixture(scope="module", params=["long", "short"])
def single_device_step(params, request):
  batch = random_batch(4, shape=request.param)
  state, metrics = trainer().step(trainer().init_state(params), batch)
  return batch, host(state), metrics


@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_sharded_step_equals_single_device(params, single_device_step, shape):
  batch, ref_state, ref_metrics = single_device_step
  tr = trainer(shape)
  state, metrics = tr.step(tr.init_state(params), batch)
  for k in ("loss", "grad_norm", "tokens", "lr"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5)
  assert_states_close(host(state), ref_state)
  # Params and Adam moments are split like the params' logical axes say.
  shard = tr.state_shardings()
  assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(shard.params)[0]
  mu = state.opt_state[1][0].mu
  for x, s in zip(jax.tree.leaves(mu), jax.tree.leaves(shard.params)):
    assert x.sharding.spec == s.spec
  if shape == (2, 2, 2):
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(mu))


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(params, single_device_step):
  """micro_batches=2 on the (2,2,2) mesh == one batch: rows have different target
  counts, so a mean of per-micro-batch means would differ."""
  batch, ref_state, ref_metrics = single_device_step
  tr = trainer((2, 2, 2), micro_batches=2)
  state, metrics = tr.step(tr.init_state(params), batch)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=2e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=2e-5)
  assert_states_close(host(state), ref_state)
  # Sanity: the two micro-batches really have different token counts.
  counts = batch.loss_mask_BxL.sum(1)
  assert counts[0::2].sum() != counts[1::2].sum()


def test_nan_loss_stops_with_step(params):
  tr = trainer()
  state = tr.init_state(params)
  batch = random_batch(5, weights=[1.0] * 8)
  state, _ = tr.step(state, batch)
  state, _ = tr.step(state, batch)
  bad = batch.replace(weights_B=np.array([1.0] * 7 + [np.nan], np.float32))
  with pytest.raises(T.NonFiniteLossError, match="at step 2"):
    tr.step(state, bad)
  # NaN inside the params: detected at the first step.
  leaves, tree = jax.tree.flatten(host(params))
  leaves[0] = leaves[0].copy()
  leaves[0].flat[3] = np.nan
  with pytest.raises(T.NonFiniteLossError, match=r"loss is nan \(grad norm nan\) at step 0"):
    tr.step(tr.init_state(jax.tree.unflatten(tree, leaves)), batch)


@pytest.mark.slow
def test_adafactor_step_and_state_shardings(params):
  tr = trainer((2, 2, 2), optimizer="adafactor")
  state = tr.init_state(params)
  batch = random_batch(6, weights=[1.0] * 8)
  losses = []
  for _ in range(3):
    state, m = tr.step(state, batch)
    losses.append(m["loss"])
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  # Every leaf of the abstract state carries a sharding (restore targets).
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding)
             for x in jax.tree.leaves(tr.abstract_state()))


def test_bad_config_fails_clearly():
  with pytest.raises(P.ConfigError, match="batch_size=6 must be a multiple"):
    T.Trainer(tiny_cfg(), train_cfg(batch_size=6), mesh_of((8, 1, 1)))
  with pytest.raises(P.ConfigError, match="loss_normalization='mean'"):
    T.Trainer(tiny_cfg(), train_cfg(loss_normalization="mean"), mesh1())
  with pytest.raises(P.ConfigError, match="optimizer='sgd'"):
    T.Trainer(tiny_cfg(), train_cfg(optimizer="sgd"), mesh1())


def test_schedule_warmup_then_cosine():
  sched = T.make_schedule(train_cfg(warmup_steps=4, learning_rate=1.0), total_steps=14)
  assert float(sched(0)) == pytest.approx(0.25) and float(sched(4)) == pytest.approx(1.0)
  assert float(sched(14)) == pytest.approx(0.0, abs=1e-6)
  const = T.make_schedule(train_cfg(warmup_steps=0, schedule="constant"), total_steps=10)
  assert float(const(7)) == pytest.approx(1e-2)


def test_step_takes_a_typed_batch_only(params):
  # The format is the batch's type (batches.py), not guessed from a dict's keys.
  tr = trainer()
  batch = random_batch(0)
  as_dict = {"tokens_BxL": batch.tokens_BxL, "loss_mask_BxL": batch.loss_mask_BxL,
             "weights_B": batch.weights_B}
  with pytest.raises(ValueError, match="batch is a dict; build it with batches.make_batch"):
    tr.loss(params, as_dict)
