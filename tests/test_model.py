"""Model tests: a float64 numpy reference, sharding invariance, masks, the cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh_of, tiny_cfg
from restem_jax import configlib, model as M, partitioning as P


def numpy_forward(params, cfg: M.ModelConfig, tokens):
  """Independent float64 Llama forward (HF conventions), one sequence at a time."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  h, n, k = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

  def rms(x, s):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

  def rot(x, pos):  # x: [L, heads, h]
    inv = 1.0 / cfg.rope_base ** (np.arange(0, h, 2) / h)
    ang = pos[:, None] * inv[None]  # [L, h/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  out = []
  for seq in np.asarray(tokens):
    L = len(seq)
    pos = np.arange(L, dtype=np.float64)
    x = p["embedding"][seq]
    for i in range(cfg.n_layers):
      lp = p[f"layers_{i}"]
      y = rms(x, lp["attn_norm"]["scale"])
      q = rot(np.einsum("ld,dnh->lnh", y, lp["q"]), pos)
      kk = rot(np.einsum("ld,dkh->lkh", y, lp["k"]), pos)
      v = np.einsum("ld,dkh->lkh", y, lp["v"])
      heads = []
      for head in range(n):
        kv = head // (n // k)  # query head -> its key/value group
        s = q[:, head] @ kk[:, kv].T / np.sqrt(h)
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
      x = x + np.einsum("lnh,nhd->ld", np.stack(heads, 1), lp["o"])
      y = rms(x, lp["mlp_norm"]["scale"])
      g = y @ lp["gate"]
      x = x + ((g / (1 + np.exp(-g))) * (y @ lp["up"])) @ lp["down"]
    x = rms(x, p["final_norm"]["scale"])
    w_out = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    out.append(x @ w_out)
  return np.stack(out)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_cfg()
  mesh1 = mesh_of((1, 1, 1), jax.devices()[:1])
  params = M.init_params(cfg, mesh1, jax.random.key(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size))
  return cfg, params, tokens


def apply(cfg, params, tokens, **kw):
  return M.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)[0]


@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_matches_float64_numpy_reference(tie):
  cfg = tiny_cfg(tie_embeddings=tie)
  params = M.init_params(cfg, mesh_of((1, 1, 1), jax.devices()[:1]), jax.random.key(3))
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 10), 0, cfg.vocab_size))
  np.testing.assert_allclose(apply(cfg, params, tokens), numpy_forward(params, cfg, tokens),
                             rtol=1e-4, atol=1e-4)


def test_param_count_matches_hand_count():
  cfg = tiny_cfg(tie_embeddings=False)
  d, f, v, n, k, h, layers = 32, 48, 64, 4, 2, 8, 2
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d  # qkvo, mlp, 2 norms
  expected = v * d + layers * per_layer + d + d * v  # embed, layers, final norm, lm_head
  params = M.init_params(cfg, mesh_of((1, 1, 1), jax.devices()[:1]), jax.random.key(0))
  assert M.count_params(params) == expected
  tied = M.init_params(tiny_cfg(tie_embeddings=True), mesh_of((1, 1, 1), jax.devices()[:1]),
                       jax.random.key(0))
  assert M.count_params(tied) == expected - d * v


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_logits_equal_single_device(setup, shape):
  cfg, params, tokens = setup
  tokens8 = np.concatenate([tokens] * 4)  # batch 8: divisible by every data split
  ref = apply(cfg, params, tokens8)
  mesh = mesh_of(shape)
  assert mesh.devices.size == 8
  sharded = jax.device_put(params, M.param_shardings(cfg, mesh))
  # With fsdp/tensor axes, params must really be split, or the test proves little.
  split = any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  assert split == (shape[1] * shape[2] > 1)
  fwd = jax.jit(lambda p, t: M.Transformer(cfg, mesh).apply({"params": p}, t)[0],
                in_shardings=(M.param_shardings(cfg, mesh), P.batch_sharding(mesh, 2)))
  out = fwd(sharded, jax.device_put(tokens8, P.batch_sharding(mesh, 2)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_causal_mask(setup):
  cfg, params, tokens = setup
  changed = tokens.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % cfg.vocab_size
  a, b = apply(cfg, params, tokens), apply(cfg, params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_padding_does_not_change_real_logits(setup):
  cfg, params, tokens = setup
  real = tokens[:, :8]
  ref = apply(cfg, params, real)
  # Right padding with garbage tokens.
  right = np.concatenate([real, np.full((2, 4), 5)], 1)
  mask = np.concatenate([np.ones((2, 8)), np.zeros((2, 4))], 1)
  out = apply(cfg, params, right, input_mask_BxL=jnp.asarray(mask))
  np.testing.assert_allclose(out[:, :8], ref, atol=2e-5)
  # Left padding: real tokens keep positions 0..7, pads are masked out as keys.
  left = np.concatenate([np.full((2, 4), 9), real], 1)
  pos = np.concatenate([np.zeros((2, 4)), np.tile(np.arange(8), (2, 1))], 1).astype(np.int32)
  out = apply(cfg, params, left, positions_BxL=jnp.asarray(pos),
              input_mask_BxL=jnp.asarray(mask[:, ::-1].copy()))
  np.testing.assert_allclose(out[:, 4:], ref, atol=2e-5)


@pytest.mark.slow  # (the fast tier's budget: 3 minutes for every module's unit tests)
def test_cache_decoding_matches_full_forward(setup):
  cfg, params, tokens = setup
  ref = np.asarray(apply(cfg, params, tokens))
  model = M.Transformer(cfg)
  # Rows with different prompt lengths (3 and 6), prefilled together, right-padded.
  lens = [3, 6]
  prompt = np.zeros((2, 6), np.int32)
  for b, n in enumerate(lens):
    prompt[b, :n] = tokens[b, :n]
  cache = M.init_cache(cfg, 2)
  logits, cache = model.apply({"params": params}, jnp.asarray(prompt), cache=cache)
  for b, n in enumerate(lens):
    np.testing.assert_allclose(logits[b, :n], ref[b, :n], atol=2e-5)
  pos = np.array(lens)
  for _ in range(5):  # then one token at a time, each row at its own position
    step_tok = tokens[np.arange(2), pos][:, None]
    logits, cache = model.apply({"params": params}, jnp.asarray(step_tok),
                                jnp.asarray(pos[:, None]), cache=cache)
    np.testing.assert_allclose(logits[:, 0], ref[np.arange(2), pos], atol=2e-5)
    pos = pos + 1


def test_shared_prefix_decoding_matches_float64_reference(setup):
  """decode_step on a SharedPrefixCache: 2 prompts (lengths 3 and 6) x N = 3 rows that
  feed different tokens, so rows of one prompt share its keys but not their own;
  generated keys in two chunks, the second one read from step 2 on."""
  cfg, params, tokens = setup
  lens, n, steps = [3, 6], 3, 5
  prompt = np.zeros((2, 6), np.int32)
  for p, length in enumerate(lens):
    prompt[p, :length] = tokens[p, :length]
  _, cache = M.Transformer(cfg).apply({"params": params}, jnp.asarray(prompt),
                                      cache=M.init_cache(cfg, 2))
  cache = jax.tree.map(lambda c: c[:, :, :, :6], cache)  # the prompt bucket: 6 slots
  # Decode step 0 feeds each prompt's last token again, so its prefill slot is masked.
  valid = jnp.arange(6)[None, :] < jnp.asarray(lens)[:, None] - 1
  # Generated slots in two chunks (the sampler's decode phases): 2 + 3.
  caches = [M.SharedPrefixCache.create(lc, valid, n, [2, steps - 2])
            for lc in M.split_layers(cache, cfg.n_layers)]
  rows = np.repeat(np.arange(2), n)  # row b = prompt b // n
  feed = np.array(jax.random.randint(jax.random.key(7), (2 * n, steps), 0, cfg.vocab_size))
  feed[:, 0] = prompt[rows, np.asarray(lens)[rows] - 1]
  pos = np.asarray(lens)[rows] - 1
  step = jax.jit(lambda lp, t, q, cs: M.decode_step(cfg, None, lp, t, q, cs))
  for t in range(steps):
    caches = [c.replace(active=1 if t < 2 else 2) for c in caches]
    logits, caches = step(params, jnp.asarray(feed[:, t:t + 1]), jnp.asarray(pos[:, None] + t),
                          caches)
    for b in range(2 * n):
      seq = np.concatenate([prompt[rows[b], :lens[rows[b]] - 1], feed[b, :t + 1]])
      ref = numpy_forward(params, cfg, seq[None])[0, -1]
      np.testing.assert_allclose(logits[b, 0], ref, rtol=1e-4, atol=1e-4)
  assert int(caches[0].step) == steps


def test_bfloat16_compute_close_to_float32(setup):
  cfg, params, tokens = setup
  ref = np.asarray(apply(cfg, params, tokens))
  out = np.asarray(apply(M.ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}), params, tokens))
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_heads_not_dividing_tensor_axis_fails_clearly():
  cfg = tiny_cfg(n_heads=6, n_kv_heads=3, d_model=36, head_dim=6)
  with pytest.raises(P.ConfigError, match=r"n_heads=6 is not divisible by the mesh's tensor axis \(4\)"):
    P.check_model_fits_mesh(cfg, mesh_of((1, 2, 4)))
  with pytest.raises(P.ConfigError, match="n_heads=4 is not divisible by model.n_kv_heads=3"):
    tiny_cfg(n_kv_heads=3)


def test_unknown_model_key_and_bad_mesh_fail_clearly():
  c = configlib.default_config().model.to_dict()
  c["n_layer"] = 3
  with pytest.raises(P.ConfigError, match=r"unknown model config keys \['n_layer'\]"):
    M.ModelConfig.from_config(c)
  with pytest.raises(P.ConfigError, match="needs 6 devices but 8 are available"):
    mesh_of((3, 2, 1))
  with pytest.raises(AttributeError):  # locked ConfigDict: typos do not pass silently
    configlib.default_config().train.lerning_rate = 1.0


def test_prompt_pool_decoding_matches_float64_reference(setup):
  """decode_step on a pool-mode SharedPrefixCache (per-row refill): 3 prompt slots
  (lengths 3, 6, 4) stored kv-heads first, 5 rows reading slots 2, 0, 1, 0, 2 (not
  grouped by prompt), generated keys in a ring; row 4 starts at step 2, so the ring
  slots written before hold another sample's keys and must stay unseen."""
  cfg, params, tokens = setup
  lens, steps = [3, 6, 4], 5
  prompt = np.zeros((3, 6), np.int32)
  prompt[0, :3], prompt[1, :6], prompt[2, :4] = tokens[0, :3], tokens[1, :6], tokens[0, 2:6]
  _, cache = M.Transformer(cfg).apply({"params": params}, jnp.asarray(prompt),
                                      cache=M.init_cache(cfg, 3))
  cache = jax.tree.map(lambda c: jnp.swapaxes(c[:, :, :, :6], 1, 2), cache)  # [layers, K, P, 6, H]
  valid = jnp.arange(6)[None, :] < jnp.asarray(lens)[:, None] - 1
  slot = np.array([2, 0, 1, 0, 2])
  start = np.array([0, 0, 0, 0, 2])
  kh, h = cfg.n_kv_heads, cfg.head_dim
  caches = [M.SharedPrefixCache(
      prompt_k=lc["k"], prompt_v=lc["v"], prompt_valid=valid,
      k=(jnp.zeros((5, kh, steps, h)),), v=(jnp.zeros((5, kh, h, steps)),), step=jnp.int32(0),
      start=jnp.asarray(start), row_slot=jnp.asarray(slot))
      for lc in M.split_layers(cache, cfg.n_layers)]
  feed = np.array(jax.random.randint(jax.random.key(8), (5, steps), 0, cfg.vocab_size))
  last = np.asarray(lens)[slot] - 1
  feed[np.arange(5), start] = prompt[slot, last]
  step = jax.jit(lambda lp, t, q, cs: M.decode_step(cfg, None, lp, t, q, cs))
  for t in range(steps):
    pos = np.maximum(last + t - start, 0)
    logits, caches = step(params, jnp.asarray(feed[:, t:t + 1]), jnp.asarray(pos[:, None]),
                          caches)
    for b in np.flatnonzero(t >= start):
      seq = np.concatenate([prompt[slot[b], :last[b]], feed[b, start[b]:t + 1]])
      ref = numpy_forward(params, cfg, seq[None])[0, -1]
      np.testing.assert_allclose(logits[b, 0], ref, rtol=1e-4, atol=1e-4)
