"""benchmarks/roofline.py: model FLOP counts against a hand count and XLA's cost analysis."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

import conftest
from restem_jax import model as M

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import roofline as R  # noqa: E402  pylint: disable=wrong-import-position


def test_flops_hand_count():
  # d 32, 2 layers, 4 heads x 8, 2 kv heads, d_ff 48, vocab 64, untied.
  cfg = conftest.tiny_cfg(max_seq_len=8)
  # Per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; MLP 3*32*48 = 4608.
  # Two layers: 15360; output projection 32*64 = 2048 -> 17408 matmul weights.
  assert R.matmul_params(cfg) == 17408
  # 2 x 8 tokens: 2 * 17408 * 16 = 557056; scores + values: 4 * 2 layers * 32 * 8 keys
  # * 16 tokens = 32768.
  assert R.forward_flops(cfg, 2, 8) == 557056 + 32768
  assert R.train_flops(cfg, 2, 8) == 3 * (557056 + 32768)
  # One decode step of 3 rows over 20 cached keys: 3 * (2 * 17408 + 4 * 2 * 32 * 20).
  assert R.decode_step_flops(cfg, 3, 20) == 3 * (34816 + 5120)
  # float32: (17408 + 64 * 32 embedding + 2 * 2 * 32 + 32 norm scales) * 4 bytes; KV of
  # 20 slots: 2 (k, v) * 2 layers * 2 kv heads * 8 * 20 = 1280 values * 4 bytes.
  assert R.param_bytes(cfg) == (17408 + 2048 + 160) * 4
  assert R.decode_step_bytes(cfg, 3, 20) == (17408 + 2048 + 160) * 4 + 1280 * 4


def _cost_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this backend gives no cost analysis")
  return float(cost["flops"])


@pytest.mark.slow  # (compiles the model twice; test_flops_hand_count stays in the fast tier)
@pytest.mark.parametrize("tie", [False, True])
def test_flops_match_xla_cost_analysis(tie):
  """XLA counts every op (norms, softmax too): within 3% above the matmul count."""
  cfg = M.ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=384, max_seq_len=64, tie_embeddings=tie)
  params = M.init_params(cfg, conftest.mesh_of((1, 1, 1), jax.devices()[:1]), jax.random.key(0))
  tokens = jnp.zeros((2, 64), jnp.int32)
  assert params_count_ok(cfg, params)
  forward = lambda p, t: M.Transformer(cfg).apply({"params": p}, t)[0]
  xla = _cost_flops(forward, params, tokens)
  assert 1.0 <= xla / R.forward_flops(cfg, 2, 64) < 1.03

  def loss(p, t):
    return -jnp.mean(jax.nn.log_softmax(forward(p, t))[..., 0])
  xla = _cost_flops(jax.grad(loss), params, tokens)
  assert 1.0 <= xla / R.train_flops(cfg, 2, 64) < 1.03


def params_count_ok(cfg, params) -> bool:
  """param_bytes counts every stored weight (float32): the model's own count x 4."""
  return R.param_bytes(cfg) == M.count_params(params) * 4


def test_fractions_of_measured_peaks():
  peaks = R.measure(matmul_n=64, copy_mib=1, rounds=1)
  assert peaks.matmul_flops_per_s > 0 and peaks.copy_bytes_per_s > 0
  line = R.fractions(peaks, flops=peaks.matmul_flops_per_s / 2, bytes_=0.0, seconds=1.0)
  assert "= 50.0% of matmul peak" in line and "= 0.0% of copy bandwidth" in line
