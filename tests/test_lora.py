"""LoRA / QLoRA M-steps (restem_jax/lora.py): the adapted model against float64 numpy,
gradients against float64 finite differences, frozen base, sharding invariance, the
quantized base's error, and train.lora's config checks."""
import dataclasses
import glob
import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import ROOT, main_cmd, mesh_of, subprocess_env
from restem_jax import configlib, errors, improve, lora, model as M, preflight, training as T
from test_model import numpy_forward
from test_training import V, assert_states_close, host, mesh1, numpy_loss, random_batch, tiny_cfg, train_cfg

RANK, ALPHA = 3, 6.0


def lora_train_cfg(base_dtype="", targets=configlib.LORA_TARGETS, **kw):
  c = train_cfg(**kw)
  c.lora.rank, c.lora.alpha, c.lora.base_dtype, c.lora.targets = RANK, ALPHA, base_dtype, targets
  return c


def lora_cfg(base_dtype="", targets=configlib.LORA_TARGETS):
  return lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=tuple(targets), base_dtype=base_dtype)


@pytest.fixture(scope="module")
def params():
  return host(M.init_params(tiny_cfg(), mesh1(), jax.random.key(0)))


def random_adapters(ad: lora.Adapters, seed: int, b_scale: float = 0.3):
  """Adapters with a nonzero B (a fresh B is 0, which would make dL/dA = 0)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, b_scale, x.shape).astype(np.float32),
                      ad.abstract())


LAYERS = [f"layers_{i}" for i in range(tiny_cfg().n_layers)]


def numpy_merge(params, adapters, scale, targets=configlib.LORA_TARGETS):
  """float64 W + scale * A @ B per layer and target, by reshapes (W is [in..., out...],
  A [in..., r], B [r, out...]); the other leaves as they are."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for layer in adapters:
    for name in targets:
      a = np.asarray(adapters[layer][name]["a"], np.float64)
      b = np.asarray(adapters[layer][name]["b"], np.float64)
      w = p[layer][name]
      r = a.shape[-1]
      p[layer][name] = w + scale * (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(w.shape)
  return p


def per_target(adapters):
  """(layer, target, {"a", "b"}) of every adapter."""
  assert sorted(adapters) == LAYERS
  return [(layer, name, ab) for layer in LAYERS for name, ab in adapters[layer].items()]


def logits(cfg, params, tokens):
  return np.asarray(M.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens))[0])


TOKENS = np.random.default_rng(1).integers(0, V, (2, 10))


@pytest.mark.slow
def test_zero_b_gives_the_base_model_exactly(params):
  ad = lora.Adapters(tiny_cfg(), lora_cfg(), mesh1())
  fresh = ad.init(jax.random.key(5))
  assert len(per_target(fresh)) == len(LAYERS) * len(configlib.LORA_TARGETS)
  assert all(not np.any(np.asarray(x["b"])) for _, _, x in per_target(fresh))
  assert all(np.any(np.asarray(x["a"])) for _, _, x in per_target(fresh))
  merged = ad.merged(params, fresh)
  np.testing.assert_array_equal(logits(tiny_cfg(), merged, TOKENS),
                                logits(tiny_cfg(), params, TOKENS))


@pytest.mark.parametrize("targets", [configlib.LORA_TARGETS, pytest.param(("q", "v"), marks=pytest.mark.slow),
                                     pytest.param(("o", "down"), marks=pytest.mark.slow)])
def test_merged_model_equals_float64_reference(params, targets):
  ad = lora.Adapters(tiny_cfg(), lora_cfg(targets=targets), mesh1())
  adapters = random_adapters(ad, 7)
  merged = host(ad.merged(params, adapters))
  ref = numpy_merge(params, adapters, ALPHA / RANK, targets)
  for path, leaf in jax.tree_util.tree_leaves_with_path(merged):
    want = ref
    for k in path:
      want = want[k.key]
    np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6)
  # Untargeted matrices are the base's, bit for bit.
  for layer in LAYERS:
    for name in set(configlib.LORA_TARGETS) - set(targets):
      np.testing.assert_array_equal(merged[layer][name], params[layer][name])
  # The adapted model's logits: float32 model on merged weights vs float64 numpy forward
  # (x (W + s A B) = x W + s (x A) B: the unmerged formulation, exact in float64).
  np.testing.assert_allclose(logits(tiny_cfg(), merged, TOKENS),
                             numpy_forward(ref, tiny_cfg(), TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_adapter_gradients_equal_float64_finite_differences(params):
  """dL/dA, dL/dB of the step's loss (merge inside grad) vs central differences of the
  float64 numpy loss of W + s A B, at 3 random entries of every adapter leaf; then the
  Trainer's first step reports the norm of these gradients."""
  cfg, batch = tiny_cfg(), random_batch(3)
  ad = lora.Adapters(cfg, lora_cfg(), mesh1())
  adapters = random_adapters(ad, 11)
  model = M.Transformer(cfg)
  loss = lambda a: T.loss_fn(ad.merge(params, a), jax.tree.map(jnp.asarray, batch), model,
                             "token")[0]
  grads = host(jax.jit(jax.grad(loss))(adapters))
  ref64 = lambda a: numpy_loss(numpy_merge(params, a, ALPHA / RANK), batch, "token")
  np.testing.assert_allclose(float(loss(adapters)), ref64(adapters), rtol=1e-5)
  rng, eps = np.random.default_rng(0), 1e-5
  ad64 = jax.tree.map(lambda x: np.asarray(x, np.float64), adapters)
  for layer, name, ab in per_target(ad64):
    for key in ("a", "b"):
      g = grads[layer][name][key]
      assert np.abs(g).max() > 1e-4, (layer, name, key)  # a real gradient, not a zero one
      for idx in zip(*[rng.integers(0, n, 3) for n in g.shape]):
        shifted = []
        for sign in (1, -1):
          x = ab[key].copy()
          x[idx] += sign * eps
          shifted.append(ref64({**ad64, layer: {**ad64[layer], name: {**ab, key: x}}}))
        fd = (shifted[0] - shifted[1]) / (2 * eps)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=2e-6,
                                   err_msg=f"{layer}/{name}/{key}{idx}")
  # The Trainer's step differentiates the same function: its grad norm is these grads'.
  tr = T.Trainer(cfg, lora_train_cfg(), mesh1())
  state = tr.init_state(params).replace(params=adapters)
  _, metrics = tr.step(state, batch)
  norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)


@pytest.mark.slow
def test_fresh_adapters_get_gradient_only_through_b(params):
  # B = 0: dL/dA = s dL/dW B^T = 0 exactly, dL/dB = s A^T dL/dW is not.
  cfg = tiny_cfg()
  ad = lora.Adapters(cfg, lora_cfg(), mesh1())
  model = M.Transformer(cfg)
  batch = jax.tree.map(jnp.asarray, random_batch(3))
  grads = host(jax.grad(lambda a: T.loss_fn(ad.merge(params, a), batch, model, "token")[0])(
      ad.init(jax.random.key(1))))
  for _, _, g in per_target(grads):
    assert not np.any(g["a"]) and np.abs(g["b"]).max() > 1e-4


def _eqn_shapes(jaxpr, prims):
  """Output shapes of every equation of `prims` in a jaxpr and its sub-jaxprs (pjit, remat)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in prims:
      out += [tuple(v.aval.shape) for v in eqn.outvars]
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          out += _eqn_shapes(sub, prims)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["", "bfloat16", "int8"])
def test_in_block_adapters_equal_merging_and_make_no_weight_gradient(params, base_dtype):
  """The train step's formulation (x W + s (x A) B inside each Block, model._project)
  against merging W' = W + s A B first (what the step did before): the same loss and the
  same dA, dB to float32 rounding; and no W-shaped product or sum (a merged W' or a dW)
  anywhere in the gradient's computation, which the merging formulation has."""
  if base_dtype == "int8":
    pytest.importorskip("qwix")
  cfg = tiny_cfg()
  ad = lora.Adapters(cfg, lora_cfg(base_dtype), mesh1())
  base = ad.prepare_base(params)
  adapters = random_adapters(ad, 13)
  model = M.Transformer(cfg)
  batch = jax.tree.map(jnp.asarray, random_batch(4))
  in_block = lambda a: T.loss_fn(base, batch, model, "token", lora=ad.apply(a))[0]
  merging = lambda a: T.loss_fn(ad.merge(base, a, jnp.float32), batch, model, "token")[0]
  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(adapters) for f in (in_block, merging))
  np.testing.assert_allclose(float(l1), float(l2), rtol=2e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(adapters)  # adapter leaves only
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(g1)), jax.tree.leaves(host(g2))):
    assert np.abs(y).max() > 1e-4
    # The two orders round differently; how much depends on the CPU's kernels (an int8
    # base's 1-in-96 element differed by 1.4e-5 of the leaf's max on one machine).
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5 * np.abs(y).max(),
                               err_msg=jax.tree_util.keystr(path))
  w_shapes = {t.shape for t in ad.targets}
  prims = ("dot_general", "add", "add_any")
  shapes = lambda f: set(_eqn_shapes(jax.make_jaxpr(jax.grad(f))(adapters).jaxpr, prims))
  assert not shapes(in_block) & w_shapes
  assert shapes(merging) >= w_shapes  # the check would see them


@pytest.mark.slow
def test_dropout_on_the_adapter_input(params):
  """train.lora.dropout p: the adapter sees x with entries zeroed with probability p and
  the rest scaled by 1 / (1 - p); x W does not (with B = 0 the loss is the base's exactly).
  Inverted dropout is unbiased: dB averaged over masks is the dB without dropout."""
  cfg = tiny_cfg()
  with pytest.raises(errors.ConfigError, match="train.lora.dropout=1.0: must be in"):
    lora.Adapters(cfg, dataclasses.replace(lora_cfg(), dropout=1.0), mesh1())
  ad = lora.Adapters(cfg, dataclasses.replace(lora_cfg(), dropout=0.1), mesh1())
  model = M.Transformer(cfg)
  batch = jax.tree.map(jnp.asarray, random_batch(5))
  fresh = ad.init(jax.random.key(2))  # B = 0
  loss = jax.jit(lambda a, key: T.loss_fn(params, batch, model, "token", lora=ad.apply(a, key)))
  grad = jax.jit(jax.grad(lambda a, key: loss(a, key)[0]))
  assert float(loss(fresh, jax.random.key(0))[0]) == float(loss(fresh, None)[0])
  no_drop = host(grad(fresh, None))
  one = host(grad(fresh, jax.random.key(0)))
  mean = jax.tree.map(lambda *g: np.mean(g, axis=0),
                      *[host(grad(fresh, jax.random.key(k))) for k in range(64)])
  for (path, g), g1, gm in zip(jax.tree_util.tree_leaves_with_path(no_drop),
                               jax.tree.leaves(one), jax.tree.leaves(mean)):
    if path[-1].key == "a":  # B = 0: dA = 0 with or without dropout
      assert not np.any(g) and not np.any(g1)
      continue
    rel = lambda x: np.linalg.norm(x - g) / np.linalg.norm(g)
    assert rel(g1) > 0.02, jax.tree_util.keystr(path)  # one mask moves dB,
    assert rel(gm) < 0.35 * rel(g1), jax.tree_util.keystr(path)  # 64 average out
  # The Trainer draws a mask per step (and per micro-batch) from the step number: two
  # runs of the same steps agree, and differ from a run without dropout.
  def run(dropout, micro_batches=1):
    c = lora_train_cfg(micro_batches=micro_batches)
    c.lora.dropout = dropout
    tr = T.Trainer(cfg, c, mesh1())
    state = tr.init_state(params, rng=jax.random.key(0))
    for seed in range(2):
      state, m = tr.step(state, random_batch(seed, weights=[1.0] * 8))
    return host(state.params), m
  (a1, m1), (a2, m2), (a0, m0) = run(0.1), run(0.1), run(0.0)
  assert m1 == m2 and m1["loss"] != m0["loss"]
  jax.tree.map(np.testing.assert_array_equal, a1, a2)
  _, m_micro = run(0.1, micro_batches=2)
  assert np.isfinite(m_micro["loss"]) and m_micro["loss"] != m1["loss"]


@pytest.mark.slow
def test_decode_step_with_the_hook_equals_merged_weights(params):
  """Prefill + 4 decode steps on the base with lora=Adapters.apply(...) (what
  benchmarks/lora_sampling_memory.py measures) give the merged model's logits."""
  cfg = tiny_cfg()
  ad = lora.Adapters(cfg, lora_cfg(), mesh1())
  adapters = random_adapters(ad, 3)
  merged = ad.merged(params, adapters)

  def run(p, hook):
    cache = M.init_cache(cfg, 2)
    out, cache = M.Transformer(cfg).apply({"params": p}, jnp.asarray(TOKENS[:, :6]),
                                          cache=cache, lora=hook)
    caches, outs = M.split_layers(cache, cfg.n_layers), [out[:, -1]]
    for t in range(6, 10):
      pos = jnp.full((2, 1), t, jnp.int32)
      out, caches = M.decode_step(cfg, None, p, jnp.asarray(TOKENS[:, t:t + 1]), pos, caches,
                                  hook)
      outs.append(out[:, 0])
    return np.stack(outs)

  np.testing.assert_allclose(run(params, ad.apply(adapters)), run(merged, None),
                             rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def one_device_steps(params):
  return {bd: _three_steps(params, (1, 1, 1), bd) for bd in ("", "int8")}


def _three_steps(params, shape, base_dtype):
  mesh = mesh1() if shape == (1, 1, 1) else mesh_of(shape)
  tr = T.Trainer(tiny_cfg(), lora_train_cfg(base_dtype), mesh)
  # Adapter seed: at key 3 (with the per-layer init) one first-step dB element of the int8
  # run is ~2e-8, Adam's eps, where the update amplifies float32 reduction-order noise ~100x
  # (worst moment error 1.7x the tolerance; keys 0-2, 4, 5: <= 0.02x, float32 base too).
  state = tr.init_state(params, rng=jax.random.key(0))
  losses = []
  for seed in range(3):
    state, m = tr.step(state, random_batch(seed, weights=[1.0] * 8))
    losses.append(m)
  return tr, state, losses


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["", "int8"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_lora_steps_equal_one_device(params, one_device_steps, shape, base_dtype):
  if base_dtype:
    pytest.importorskip("qwix")
  _, ref_state, ref_metrics = one_device_steps[base_dtype]
  tr, state, metrics = _three_steps(params, shape, base_dtype)
  for m, ref in zip(metrics, ref_metrics):
    for k in ("loss", "grad_norm", "tokens"):
      np.testing.assert_allclose(m[k], ref[k], rtol=2e-5)
  assert_states_close(host(state), host(ref_state))
  # The state is adapters only (and their Adam moments), split by the logical-axis rules.
  assert all(set(state.params[layer]) == set(configlib.LORA_TARGETS) for layer in LAYERS)
  mu = state.opt_state[1][0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  if shape == (2, 2, 2):
    q_a, q_b = state.params["layers_1"]["q"]["a"], state.params["layers_1"]["q"]["b"]
    assert q_a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)  # embed, r
    assert q_b.sharding.spec[1] == "tensor"  # heads
    assert mu["layers_1"]["q"]["a"].sharding.spec == q_a.sharding.spec


def _examples(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return [improve.Example(prompt=list(rng.integers(1, V, 3)), target=list(rng.integers(1, V, 6)),
                          weight=1.0) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["", "bfloat16"])
def test_lora_m_step_changes_only_the_adapted_matrices(params, tmp_path, base_dtype):
  targets = ("q", "v", "down")
  before = jax.tree.map(np.copy, params)
  kw = dict(model_cfg=tiny_cfg(), train_cfg=lora_train_cfg(base_dtype, targets, max_steps=4,
                                                            checkpoint_every=2),
            mesh=mesh1(), examples=_examples(), seq_len=16, eval_fn=None,
            workdir=str(tmp_path), seed=1)
  trained, info = improve.improve(init_params=params, **kw)
  out = host(trained.params)
  assert info["steps"] == 4
  # The result is the frozen base (targets rounded to base_dtype) with the returned
  # adapters merged (float64 reference).
  assert trained.base is params
  frozen = jax.tree.map(np.copy, params)
  for layer in LAYERS:
    for name in targets:
      frozen[layer][name] = np.asarray(jnp.asarray(frozen[layer][name]).astype(
          base_dtype or jnp.float32).astype(jnp.float32))
  ref = numpy_merge(frozen, host(trained.adapters), ALPHA / RANK, targets)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The caller's base is untouched, bit for bit.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  # The result: base everywhere but the targets, which moved.
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    name = path[-1].key
    base_leaf = before
    for k in path:
      base_leaf = base_leaf[k.key]
    if path[0].key in LAYERS and name in targets:
      assert np.abs(leaf - base_leaf).max() > 1e-4, name
    else:
      np.testing.assert_array_equal(leaf, base_leaf, err_msg=jax.tree_util.keystr(path))
  # Mid-phase checkpoints hold adapters and their optimizer state, not a model copy:
  # calling again restores them and returns the same merged params.
  again, info2 = improve.improve(init_params=params, **kw)
  assert info2 == info
  for a, b in zip(jax.tree.leaves(host(again.params)), jax.tree.leaves(out)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_an_m_step_continues_the_adapters_it_is_given(params, tmp_path):
  """finetune_from='previous' with LoRA: the state starts from the given adapters on the
  same frozen base. With learning rate 0 they come back bit for bit (fresh ones would have
  B = 0); with a real step the result differs from a fresh start's."""
  ad = lora.Adapters(tiny_cfg(), lora_cfg(), mesh1())
  given = random_adapters(ad, seed=5)

  def m_step(name, lr, init_adapters, targets=configlib.LORA_TARGETS):
    c = lora_train_cfg("", targets, max_steps=2, checkpoint_every=2, learning_rate=lr,
                       warmup_steps=0)
    return improve.improve(model_cfg=tiny_cfg(), train_cfg=c, mesh=mesh1(), init_params=params,
                           examples=_examples(), seq_len=16, eval_fn=None,
                           workdir=str(tmp_path / name), seed=1, log=lambda _: None,
                           init_adapters=init_adapters)[0]

  frozen = m_step("lr0", 0.0, given)
  for got, want in zip(jax.tree.leaves(host(frozen.adapters)), jax.tree.leaves(given)):
    np.testing.assert_array_equal(got, want)
  ref = numpy_merge(params, given, ALPHA / RANK)
  for got, want in zip(jax.tree.leaves(host(frozen.params)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  continued, fresh = m_step("cont", 1e-2, given), m_step("fresh", 1e-2, None)
  b_cont = np.asarray(continued.adapters["layers_0"]["q"]["b"])
  b_fresh = np.asarray(fresh.adapters["layers_0"]["q"]["b"])
  assert np.abs(b_cont - given["layers_0"]["q"]["b"]).max() < 0.1  # two small steps from it
  assert np.abs(b_cont - b_fresh).max() > 0.1  # ... not from zero
  with pytest.raises(errors.ConfigError, match="train.lora.targets"):
    m_step("other_targets", 1e-2, given, targets=("q", "v"))


# ----------------------------------------------------------------------------- quantized base


def _quant_cfg():
  # Input sizes that are multiples of nf4's block of 64 (embed 128, mlp 128).
  return tiny_cfg(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=128)


@pytest.mark.slow
def test_int8_base_is_per_channel_absmax():
  pytest.importorskip("qwix")
  cfg = _quant_cfg()
  w = host(M.init_params(cfg, mesh1(), jax.random.key(2)))
  ad = lora.Adapters(cfg, lora_cfg("int8"), mesh1())
  assert len(ad.targets) == len(LAYERS) * len(configlib.LORA_TARGETS)
  for t in ad.targets:
    layer, name = t.path
    in_axes = tuple(range(len(lora.IN_AXES[name])))
    x = w[layer][name].astype(np.float64)
    # One scale per output channel; qwix maps absmax to 127.5 (the top bucket is
    # [126.5, 127.5)), and the value absmax itself to 127.
    step = np.abs(x).max(axis=in_axes, keepdims=True) / 127.5
    want = np.clip(np.round(x / step), -128, 127) * step
    got = np.asarray(lora.dequantize(lora.quantize(jnp.asarray(w[layer][name]), t, "int8")))
    assert np.abs(got - want).max() <= 1.01 * step.max()  # at most one step off (ties)
    assert np.mean(np.abs(got - want) <= 1e-6 * np.abs(x).max()) > 0.99, name


# NormalFloat-4 codes (Dettmers et al. 2023, QLoRA, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_nf4_base_is_the_nearest_code_of_each_block_of_64():
  pytest.importorskip("qwix")
  cfg = _quant_cfg()
  params = host(M.init_params(cfg, mesh1(), jax.random.key(2)))
  for t in lora.Adapters(cfg, lora_cfg("nf4"), mesh1()).targets:
    if t.path[-1] != "q":
      continue
    w = params[t.path[0]]["q"]  # [128, 4, 32]
    q = lora.quantize(jnp.asarray(w), t, "nf4")
    assert q.scale.shape == (2, 4, 32)  # a scale per block of 64 inputs per output
    blocks = np.abs(w).reshape(2, 64, 4, 32).max(axis=1, keepdims=True)  # absmax -> 1
    x = w.reshape(2, 64, 4, 32) / blocks
    want = (NF4[np.abs(x[..., None] - NF4).argmin(-1)] * blocks).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(lora.dequantize(q)), want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype,tol", [("bfloat16", 0.01), ("int8", 0.04), ("nf4", 0.5)])
def test_quantized_base_logits_close_to_float32(base_dtype, tol):
  """Stated tolerance: rms(logit error) / std(float32 logits) of a random-init model
  (measured: bfloat16 0.005, int8 0.020, nf4 0.265; real SmolLM2 weights:
  benchmarks/train_step.py --lora reports each base's loss)."""
  if base_dtype != "bfloat16":
    pytest.importorskip("qwix")
  cfg = _quant_cfg()
  params = M.init_params(cfg, mesh1(), jax.random.key(2))
  ad = lora.Adapters(cfg, lora_cfg(base_dtype), mesh1())
  merged = ad.merged(ad.prepare_base(params), ad.init(jax.random.key(0)))
  ref = logits(cfg, params, TOKENS)
  err = np.sqrt(np.mean(np.square(logits(cfg, merged, TOKENS) - ref))) / ref.std()
  assert 0 < err < tol, err


# ----------------------------------------------------------------------------- config


def test_config_problems_name_the_field():
  c = configlib.default_config()
  assert configlib.problems(c) == []  # rank 0: full fine-tuning
  c.train.lora.rank = 8
  assert configlib.problems(c) == []
  c.train.lora.alpha = 0.0
  c.train.lora.dropout = 1.0
  c.train.lora.targets = ("q", "qkv")
  c.train.lora.base_dtype = "int4"
  lines = configlib.problems(c)
  assert len(lines) == 4, lines
  assert lines[0].startswith("train.lora.alpha=0.0: must be > 0")
  assert lines[1].startswith("train.lora.dropout=1.0: must be in [0, 1)")
  assert lines[2].startswith("train.lora.targets=('q', 'qkv'): give distinct names from q, k")
  assert lines[3].startswith("train.lora.base_dtype='int4': use one of '', 'float32'")
  c.train.lora.rank = -1
  assert configlib.problems(c) == [
      "train.lora.rank=-1: must be an integer >= 0 (0 = full fine-tuning)"]
  with pytest.raises(errors.ConfigError, match="train.lora.rank=-1"):
    T.Trainer(tiny_cfg(), c.train, mesh1())


@pytest.mark.slow
def test_run_with_lora_end_to_end(tmp_path):
  """configs/tiny.py with train.lora and finetune_from='previous': the base is pretrained
  fully; every M-step and the SFT baseline train adapters (iteration 2 continuing iteration
  1's) on rows that share a prompt (train.share_prompts); each model is saved as its
  adapters alone beside the base stored once, and a rerun that restores them samples
  exactly as the run that trained them."""
  from restem_jax import checkpoints, run as run_lib  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "w")
  cmd = main_cmd(workdir, "--config.train.lora.rank=4", "--config.restem.finetune_from=previous",
                 "--config.train.share_prompts=True")
  p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stderr.count("improve: LoRA rank 4 on q,k,v,o,gate,up,down") == 3
  assert p.stderr.count("base frozen (as loaded), fresh adapters") == 2  # iter_001, sft
  assert p.stderr.count("continuing the given adapters") == 1  # iter_002
  shared = re.findall(r"improve: (\d+) examples in (\d+) rows of", p.stderr)
  assert any(int(n) > int(r) for n, r in shared), shared  # some problems kept 2 samples
  evals = sorted(os.path.basename(os.path.dirname(f))
                 for f in glob.glob(os.path.join(workdir, "*", "eval.json")))
  assert evals == ["base_eval", "iter_001", "iter_002", "sft"], evals
  with open(os.path.join(workdir, "iter_001", "improve.json")) as f:
    assert json.load(f)["steps"] > 0

  config = helpers.load_config(os.path.join(ROOT, "configs", "tiny.py")).get_config()
  config.train.lora.rank, config.restem.finetune_from = 4, "previous"
  config.train.share_prompts = True
  cfg = M.ModelConfig.from_config(config.model)
  base_dir = os.path.join(workdir, "base")
  base = host(checkpoints.restore_params(base_dir, cfg, mesh1()))
  n_params = sum(x.size for x in jax.tree.leaves(base))
  ad = lora.Adapters(cfg, lora.LoraConfig.from_train_config(config.train), mesh1())
  for name in ("iter_001", "iter_002", "sft"):
    path = os.path.join(workdir, name, "model")
    meta = checkpoints.read_metadata(path)["lora"]
    assert meta == {"rank": 4, "alpha": config.train.lora.alpha, "base": base_dir,
                    "targets": list(configlib.LORA_TARGETS), "base_dtype": ""}, name
    # The checkpoint holds the adapters alone (restoring it as full params fails).
    stored = host(checkpoints.restore_adapters(path, ad.abstract()))
    assert sum(x.size for x in jax.tree.leaves(stored)) == ad.count() < n_params / 2
    with pytest.raises(checkpoints.CheckpointError, match="does not match"):
      checkpoints.restore_params(path, cfg, mesh1())
    # Restored as the run restores it: the base with the adapters merged (float64 reference).
    ctx = run_lib.RunContext(config, workdir, override=False)
    got = host(ctx.restore(path).params)
    want = numpy_merge(base, stored, config.train.lora.alpha / 4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # A rerun restores iteration 2 from its adapters and evaluates it again: the same eval.
  eval_2 = os.path.join(workdir, "iter_002", "eval.json")
  with open(eval_2) as f:
    before = json.load(f)
  os.remove(eval_2)
  p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "improve: LoRA" not in p.stderr  # nothing was trained again
  with open(eval_2) as f:
    assert json.load(f) == before


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_gemma3_4b_lora_config_and_its_memory_figures():
  """The config validates (full size and :runlocal), and the parameter counts its memory
  comment is built on are the model's: 3.88B params, 29.8M rank-16 adapter params."""
  path = os.path.join(ROOT, "configs", "gemma3_4b_lora_gsm.py")
  mod = helpers.load_config(path)
  full = mod.get_config("base=/models/gemma-3-4b-pt")
  assert preflight.problems(full, check_files=False) == []
  assert preflight.problems(mod.get_config("runlocal")) == []
  cfg = M.ModelConfig.from_config(full.model)
  n = sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(
      M.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names")))
  assert round(n / 1e9, 2) == 3.88, n
  ad = lora.Adapters(cfg, lora.LoraConfig.from_train_config(full.train), mesh1())
  assert round(ad.count() / 1e6, 1) == 29.8
  with pytest.raises(errors.ConfigError, match="runlcoal"):
    mod.get_config("runlcoal")


def test_smollm2_rg_lora_variant_is_the_run_with_adapters():
  """configs/smollm2_135m_rg.py:lora differs from the full fine-tune only in train.lora
  and the learning rate, and validates (also combined with runlocal)."""
  mod = helpers.load_config(os.path.join(ROOT, "configs", "smollm2_135m_rg.py"))
  full, with_lora = mod.get_config(), mod.get_config("lora")
  assert preflight.problems(with_lora, check_files=False) == []
  assert preflight.problems(mod.get_config("lora,runlocal")) == []
  assert with_lora.train.lora.rank == 16 and full.train.lora.rank == 0
  diff = {k for k, v in with_lora.train.items() if full.train[k] != v}
  assert diff == {"lora", "learning_rate"}, diff
  with_lora.train, full.train = None, None
  assert with_lora.to_json_best_effort() == full.to_json_best_effort()


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_an_m_step_from_the_frozen_base_equals_one_from_the_loaded_base(params, tmp_path,
                                                                        base_dtype):
  """A run keeps only the frozen (cast / quantized) base once nothing samples the loaded
  one (run.RunContext.frozen): the M-step from it is the M-step from the loaded base, bit
  for bit, and preparing a prepared base is the identity."""
  if base_dtype == "int8":
    pytest.importorskip("qwix")
  ad = lora.Adapters(tiny_cfg(), lora_cfg(base_dtype), mesh1())
  frozen = ad.prepare_base(params)
  assert ad.is_prepared(frozen) and not ad.is_prepared(params)
  assert ad.prepare_base(frozen) is frozen
  kw = dict(model_cfg=tiny_cfg(), train_cfg=lora_train_cfg(base_dtype, max_steps=3,
                                                            checkpoint_every=3),
            mesh=mesh1(), examples=_examples(), seq_len=16, eval_fn=None, seed=1,
            log=lambda _: None)
  a = improve.improve(init_params=params, workdir=str(tmp_path / "loaded"), **kw)[0]
  b = improve.improve(init_params=frozen, workdir=str(tmp_path / "frozen"), **kw)[0]
  for x, y in zip(jax.tree.leaves(host((a.adapters, a.params))),
                  jax.tree.leaves(host((b.adapters, b.params)))):
    np.testing.assert_array_equal(x, y)


def tiny_config_on_the_tiny_run_base(tiny_run):
  """configs/tiny.py with base.source = "checkpoint": the session's tiny run's pretrained
  base (the in-process runs below need a base, not their own pretraining)."""
  config = helpers.load_config(os.path.join(ROOT, "configs", "tiny.py")).get_config()
  config.base.source, config.base.path = "checkpoint", os.path.join(tiny_run[0], "base")
  return config


@pytest.mark.slow
def test_qlora_run_drops_the_loaded_base_after_the_first_e_step(tiny_run, tmp_path, monkeypatch):
  """train.lora.base_dtype='int8': after theta_base is evaluated and sampled, the run holds
  only its int8 copy (no float32 target matrix beyond what was alive before the run, at
  the first M-step); an E-step that kept nothing makes the int8 base with zero adapters
  the iterate, saved as adapters: its params are the per-channel absmax rounding of the
  base (numpy reference) and the base's other leaves."""
  pytest.importorskip("qwix")
  from restem_jax import checkpoints, run as run_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config_on_the_tiny_run_base(tiny_run)
  config.train.lora.rank, config.train.lora.base_dtype = 4, "int8"
  config.restem.num_iterations, config.restem.sft_baseline = 1, False
  cfg = M.ModelConfig.from_config(config.model)
  targets = lora.Adapters(cfg, lora.LoraConfig.from_train_config(config.train), mesh1()).targets
  shapes = {t.shape for t in targets}

  def float_targets():
    return sum(a.dtype == jnp.float32 and a.shape in shapes for a in jax.live_arrays())
  before, at_m_step = float_targets(), []

  def kept_nothing(self, m):
    del self, m
    at_m_step.append(float_targets())
    return []
  monkeypatch.setattr(run_lib.RunContext, "kept_examples", kept_nothing)
  workdir = str(tmp_path / "w")
  run_lib.run(config, workdir)
  assert at_m_step and at_m_step[0] <= before, (at_m_step, before)

  base = host(checkpoints.restore_params(config.base.path, cfg, mesh1()))
  path = os.path.join(workdir, "iter_001", "model")
  assert checkpoints.read_metadata(path)["lora"]["base_dtype"] == "int8"
  got = host(run_lib.RunContext(config, workdir, override=False).restore(path).params)
  by_path = {t.path: t for t in targets}
  for keys, leaf in jax.tree_util.tree_leaves_with_path(got):
    keys = tuple(k.key for k in keys)
    want = base
    for k in keys:
      want = want[k]
    if keys not in by_path:
      np.testing.assert_array_equal(leaf, want)
      continue
    in_axes = tuple(range(len(lora.IN_AXES[keys[1]])))
    step = np.abs(want.astype(np.float64)).max(axis=in_axes, keepdims=True) / 127.5
    rounded = np.clip(np.round(want / step), -128, 127) * step
    assert np.abs(leaf - rounded).max() <= 1.01 * step.max(), keys
  with open(os.path.join(workdir, "iter_001", "improve.json")) as f:
    assert json.load(f)["stopped"] == "no_samples"


@pytest.mark.slow
def test_the_m_step_from_the_base_does_not_hold_the_previous_iterate(tiny_run, tmp_path,
                                                                    monkeypatch):
  """ReST-EM fine-tunes theta_base: while iteration 2's M-step runs, theta_1's params are
  not alive beside the base's (counted as arrays of the q matrix's shape when the M-step
  reads its samples)."""
  from restem_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config_on_the_tiny_run_base(tiny_run)
  config.restem.num_iterations, config.restem.sft_baseline = 2, False
  cfg = M.ModelConfig.from_config(config.model)
  q_shape = (cfg.d_model, cfg.n_heads, cfg.head_dim)
  before, counts = sum(a.shape == q_shape for a in jax.live_arrays()), []
  real = run_lib.RunContext.kept_examples

  def counted(self, m):
    counts.append(sum(a.shape == q_shape for a in jax.live_arrays()) - before)
    return real(self, m)
  monkeypatch.setattr(run_lib.RunContext, "kept_examples", counted)
  run_lib.run(config, str(tmp_path / "w"))
  # One model's worth: each such matrix as a global array and its per-device buffers
  # (jax.live_arrays lists both). Iteration 1's M-step holds the base alone; iteration 2's
  # holds no more (with theta_1 kept: twice as many, checked).
  per_model = sum(x.value.shape == q_shape for x in jax.tree.leaves(
      M.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names")))
  assert len(counts) == 2 and counts[0] <= per_model * (1 + jax.device_count()), counts
  assert counts[1] == counts[0], counts
