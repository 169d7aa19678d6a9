"""Model families against transformers (torch CPU, float32), offline: Llama 3.1 (llama3 RoPE
scaling), Qwen 2.5, Qwen 3, Gemma 2, Gemma 3 (and its multimodal checkpoint's text model).

Per family a tiny random HF model whose config exercises the family's switches (GQA, tied and
untied heads, sliding windows smaller than the prompts, soft-caps, biases, QK-norm, scaled
RoPE) is saved as safetensors and imported. Checked against the reference implementation:
  * logits on prompts longer than the window (max abs diff <= 1e-4);
  * greedy tokens of our Sampler (shared prompt cache, 2 decode phases, generation crossing
    the window) == transformers' `generate`;
  * loss and gradient of one reward-weighted NLL step == torch autograd of the same loss on
    the HF model in float64, on 1 device and on a (2, 2, 2) mesh of 8;
plus the per-row cached decode path against our own no-cache forward, the transformers 4.x
config layout, and one-line errors on configs this model cannot run.

Weights are redrawn at scale ~1/sqrt(fan_in) (HF's init is 0.02 with zero norms and biases),
so that a dropped or misplaced switch moves the logits well past the tolerance.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from restem_jax import configlib, model as M, partitioning as P, sampling as S  # noqa: E402
from restem_jax import batches as B, training as T  # noqa: E402
from restem_jax.importers import ImportFormatError, common, hf as hf_importer  # noqa: E402
from restem_jax.importers import import_model  # noqa: E402

V = 64
WINDOW = 6
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
            rms_norm_eps=1e-5)
FAMILIES = {
    # Llama 3.1: llama3 frequency scaling with all three bands present at head_dim 16
    # (wavelength 6 kept, 32 blended, >= 167 slowed 8x), untied.
    "llama31": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        head_dim=16, tie_word_embeddings=False, rope_theta=5e5, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),
    # Qwen 2.5: q/k/v biases, tied (as the 0.5B / 1.5B are).
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen 3: QK-norm, head_dim 16 != hidden / heads = 8, untied.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        head_dim=16, tie_word_embeddings=False)),
    # Gemma 2: local/global alternate, soft-caps small enough to bend the logits,
    # query_pre_attn_scalar != head_dim. Untied: tiny tied Gemmas decode one token forever.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=16, num_hidden_layers=3, sliding_window=WINDOW, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, query_pre_attn_scalar=24, tie_word_embeddings=False)),
    # Gemma 3: local, local, global (pattern 3), local RoPE 1e4 vs global 1e6 with linear
    # scaling (the >= 4B models), QK-norm, an untied head.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        head_dim=16, num_hidden_layers=3, sliding_window=WINDOW, sliding_window_pattern=3,
        query_pre_attn_scalar=24, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="linear", factor=4.0))),
}
# Weight seeds whose greedy continuations are not a short loop (tiny random models often
# settle on one token; the reference then checks little of the decode path).
SEEDS = {"llama31": 3, "qwen2": 8, "qwen3": 3, "gemma2": 0, "gemma3": 0}
PROMPTS = [list(np.random.RandomState(1).randint(3, V, 11)),
           list(np.random.RandomState(2).randint(3, V, 14))]
LOGIT_TOKENS = np.random.RandomState(3).randint(0, V, (2, 20))
NEW_TOKENS = 64  # Two decode phases of 32 (sampling.decode_chunks).


def mesh_of(shape, devices=None):
  c = configlib.default_config()
  c.mesh.shape = shape
  return P.make_mesh(c.mesh, devices)


MESHES = {}


def mesh(n):
  if n not in MESHES:
    MESHES[n] = mesh_of((1, 1, 1), jax.devices()[:1]) if n == 1 else mesh_of((2, 2, 2))
  return MESHES[n]


def randomize(hf, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 1:  # Norm weights and biases (Gemma norms are stored as w of 1 + w).
        base = 1.0 if name.endswith("norm.weight") and "Gemma" not in type(hf).__name__ else 0.0
        p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
      else:
        # Layer outputs 3x larger: in a tied model the residual stream is then not
        # dominated by the current token's embedding (whose logit would win every step).
        gain = 3.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        p.copy_(torch.randn(p.shape, generator=g) * gain * p.shape[-1] ** -0.5)
  return hf


def build_hf(name, path):
  config_cls, model_cls, kw = FAMILIES[name]
  hf = randomize(model_cls(config_cls(**{**BASE, **kw})).eval(), SEEDS[name])
  hf.save_pretrained(path)
  return hf


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def forward(cfg):
  """Jitted no-cache forward (one compile per config; eager dispatch costs more here)."""
  return jax.jit(lambda p, t: M.Transformer(cfg).apply({"params": p}, t)[0])


def our_logits(cfg, params, tokens):
  return np.asarray(forward(cfg)(params, jnp.asarray(tokens)))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  hf = build_hf(request.param, path)
  cfg, params = import_model("hf", path, mesh(1), max_seq_len=96)
  return request.param, hf, cfg, params


EXPECTED = {  # The switches each family must turn on (read from the saved config.json).
    "llama31": dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=64,
                    rope_base=5e5, tie_embeddings=False, head_dim=16),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True, rope_base=1e6),
    "qwen3": dict(qk_norm=True, head_dim=16, tie_embeddings=False),
    "gemma2": dict(norm_unit_offset=True, embed_scale=True, post_norms=True,
                   mlp_activation="gelu_tanh", query_pre_attn_scalar=24.0,
                   attn_logit_softcap=2.0, final_logit_softcap=3.0, sliding_window=WINDOW,
                   sliding_window_pattern=2, tie_embeddings=False),
    "gemma3": dict(norm_unit_offset=True, embed_scale=True, post_norms=True, qk_norm=True,
                   rope_base=1e6, rope_local_base=1e4, rope_scaling="linear",
                   rope_scaling_factor=4.0, sliding_window=WINDOW, sliding_window_pattern=3,
                   attn_logit_softcap=0.0, final_logit_softcap=0.0, tie_embeddings=False),
}


def test_config_switches(family):
  name, _, cfg, _ = family
  assert {k: getattr(cfg, k) for k in EXPECTED[name]} == EXPECTED[name]
  assert cfg.max_seq_len == 96


def test_logits_match_transformers(family):
  """Prompts of 20 tokens, > the window of 6: local layers must mask by the window."""
  _, hf, cfg, params = family
  ours, ref = our_logits(cfg, params, LOGIT_TOKENS), hf_logits(hf, LOGIT_TOKENS)
  assert np.abs(ref).max() > 1.0  # Logits big enough for the tolerance to mean something.
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def hf_greedy(hf, prompt):
  """transformers' own cached greedy decoding, without an EOS."""
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                      pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_sampler_greedy_equals_transformers_generate(family):
  """2 prompts (11 and 14 tokens, > the window) x 2 samples on the shared prompt cache,
  64 new tokens in 2 decode phases, so decoding crosses the window in both phases."""
  _, hf, cfg, params = family
  ref = [hf_greedy(hf, p) for p in PROMPTS]
  assert [len(r) for r in ref] == [NEW_TOKENS] * 2
  # An EOS id the reference never emits, so all 64 tokens are compared.
  eos = next(t for t in range(V) if all(t not in r for r in ref))
  assert S.decode_chunks(NEW_TOKENS, 4) == [32, 32]
  sampler = S.Sampler(cfg, mesh(1), eos_id=eos, pad_id=0)
  out = sampler.sample(params, PROMPTS, num_samples=2, max_new_tokens=NEW_TOKENS,
                       mode=S.GREEDY, rng=jax.random.key(0))
  for i, r in enumerate(ref):
    for j in range(2):
      assert list(np.asarray(out.tokens)[i, j]) == r, (i, j)
  assert all(len(set(r[-32:])) > 3 for r in ref)  # Phase 2 is not a constant run either.


def test_cached_decoding_matches_full_forward(family):
  """Prefill into a per-row cache (Transformer with a cache), then one token per step
  (decode_step on per-layer caches) past the window: equal to the no-cache forward."""
  name, _, cfg, params = family
  if name != "gemma3":
    pytest.skip("Gemma 3 has both kinds of layer and both RoPE bases")
  tokens = LOGIT_TOKENS
  ref = our_logits(cfg, params, tokens)
  prompt = 8
  prefill = jax.jit(lambda p, t, pos, c: M.Transformer(cfg).apply({"params": p}, t, pos, cache=c))
  logits, cache = prefill(params, jnp.asarray(tokens[:, :prompt]),
                          jnp.broadcast_to(jnp.arange(prompt), (2, prompt)), M.init_cache(cfg, 2))
  np.testing.assert_allclose(logits, ref[:, :prompt], atol=1e-4)
  caches = M.split_layers(cache, cfg.n_layers)
  step = jax.jit(lambda p, t, pos, cs: M.decode_step(cfg, None, p, t, pos, cs))
  for t in range(prompt, tokens.shape[1]):
    logits, caches = step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), caches)
    np.testing.assert_allclose(logits[:, 0], ref[:, t], atol=1e-4)


# ----------------------------------------------------------------------------- training path

class _DictSource:
  """HF-named tensors from a dict (here: torch's gradients, in HF layout)."""

  def __init__(self, tensors):
    self.tensors = tensors

  def has(self, name):
    return name in self.tensors

  def get(self, name):
    return self.tensors[name]


TORCH_REFS = {}


def torch_reference(name, hf, cfg, batch):
  """(loss, gradient in our param layout) of torch, once per family."""
  if name not in TORCH_REFS:
    loss, grads = torch_loss_and_grads(hf, batch)
    if cfg.tie_embeddings:
      grads.pop("lm_head.weight", None)  # Shared with the embedding: counted there.
    # The importer brings HF-layout tensors into our layout (a linear relabelling whose
    # correctness the logits test establishes).
    TORCH_REFS[name] = loss, common.build_params(cfg, mesh(1), _DictSource(grads))
  return TORCH_REFS[name]


def torch_loss_and_grads(hf, batch):
  """The reward-weighted token-normalised NLL (training.py's docstring) in torch float64."""
  hf64 = hf.double()
  hf64.zero_grad()
  tokens = torch.tensor(batch.tokens_BxL, dtype=torch.long)
  logp = torch.log_softmax(hf64(tokens).logits, -1)
  nll = -torch.gather(logp[:, :-1], -1, tokens[:, 1:, None])[..., 0]
  mask = torch.tensor(batch.loss_mask_BxL[:, :-1], dtype=torch.float64)
  w = torch.tensor(batch.weights_B, dtype=torch.float64)
  loss = (w[:, None] * mask * nll).sum() / mask.sum()
  loss.backward()
  loss = float(loss.detach())
  grads = {n: p.grad.numpy().astype(np.float64) for n, p in hf64.named_parameters()}
  hf.float()
  return loss, grads


def train_batch():
  rng = np.random.default_rng(5)
  prompts = [list(rng.integers(3, V, rng.integers(2, 8))) for _ in range(8)]
  targets = [list(rng.integers(3, V, rng.integers(3, 16 - len(p) + 1))) for p in prompts]
  weights = [1.0, 0.0, 2.0, 0.5, 1.0, 1.5, 0.0, 1.0]
  return B.make_batch(prompts, targets, weights, seq_len=16)


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("devices", [1, 8])
def test_loss_and_gradient_match_torch_float64(family, devices):
  """jax.grad of training.loss_fn, jitted on the mesh, vs torch autograd in float64."""
  name, hf, cfg, params = family
  batch = train_batch()
  ref_loss, ref = torch_reference(name, hf, cfg, batch)
  m = mesh(devices)
  shardings = M.param_shardings(cfg, m)
  batch_sh = jax.tree.map(lambda v: P.batch_sharding(m, v.ndim), batch)
  fn = jax.jit(jax.value_and_grad(
      lambda p, b: T.loss_fn(p, b, M.Transformer(cfg, m), "token")[0]),
      in_shardings=(shardings, batch_sh))
  loss, grads = fn(jax.device_put(params, shardings), jax.device_put(batch, batch_sh))
  if devices == 8:
    assert any(not g.sharding.is_fully_replicated for g in jax.tree.leaves(grads))
  assert abs(float(loss) / ref_loss - 1) < 1e-5
  ours = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  want = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(ref)])
  assert rel_err(ours, want) < 1e-5
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)):
    assert rel_err(g, np.asarray(r, np.float64)) < 1e-5, jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------- configs

def test_gemma3_multimodal_checkpoint_imports_its_text_model(tmp_path):
  """Gemma3ForConditionalGeneration (the 4B+ checkpoints): text_config and the
  language_model.* tensors; vision tensors are ignored. Logits of text-only input."""
  _, _, kw = FAMILIES["gemma3"]
  text = {**BASE, **kw, "tie_word_embeddings": True}
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
  hf = randomize(transformers.Gemma3ForConditionalGeneration(config).eval(), 7)
  hf.save_pretrained(str(tmp_path))
  cfg, params = import_model("hf", str(tmp_path), mesh(1), max_seq_len=64)
  assert (cfg.tie_embeddings, cfg.sliding_window_pattern, cfg.rope_local_base) == (True, 3, 1e4)
  np.testing.assert_allclose(our_logits(cfg, params, LOGIT_TOKENS), hf_logits(hf, LOGIT_TOKENS),
                             atol=1e-4, rtol=0)


def legacy_config(new):
  """transformers 4.x's layout of the same config: top-level rope_theta / rope_scaling /
  rope_local_base_freq, sliding_window_pattern, no layer_types."""
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
  params = new.get("rope_parameters") or {}
  if "full_attention" in params:
    glob, local = dict(params["full_attention"]), params["sliding_attention"]
    old["rope_local_base_freq"] = local["rope_theta"]
  else:
    glob = dict(params)
  old["rope_theta"] = glob.pop("rope_theta")
  kind = glob.pop("rope_type", "default")
  if kind != "default":
    old["rope_scaling"] = {**glob, "type": kind}
  return old


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_4_config_layout_gives_the_same_model_config(name, tmp_path):
  config_cls, _, kw = FAMILIES[name]
  new = config_cls(**{**BASE, **kw}).to_dict()
  new["architectures"] = [FAMILIES[name][1].__name__]
  old = legacy_config(json.loads(json.dumps(new)))
  assert "rope_parameters" not in old and "rope_theta" in old
  a = hf_importer.model_config_from_hf(new, max_seq_len=96)
  b = hf_importer.model_config_from_hf(old, max_seq_len=96)
  assert a == b
  assert a.rope_scaling == EXPECTED[name].get("rope_scaling", "none")


@pytest.mark.parametrize("change, pattern", [
    (dict(architectures=["GPTNeoXForCausalLM"]),
     r"^architecture GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM, "),
    (dict(hidden_activation="gelu"),
     r"^hidden_activation='gelu' is not supported; supported: silu, gelu_pytorch_tanh$"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6,
                                              "factor": 4.0}}),
     r"^rope_parameters.full_attention.rope_type='yarn' is not supported; supported: default, "
     r"llama3, linear$"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"^rope_parameters.sliding_attention.rope_type='linear' is not supported; supported: "
     r"default$"),
    (dict(layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
     r"^layer_types \['F', 'S', 'S'\] \(S = sliding_attention\) is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     r"^layer_types value 'chunked_attention' is not supported; supported: full_attention, "
     r"sliding_attention$"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"^rope_parameters.low_freq_factor is missing \(needed by rope_type 'llama3'\)$"),
    (dict(architectures=["Gemma2ForCausalLM"], rope_parameters={"rope_type": "linear",
                                                                "factor": 2.0}),
     r"^Gemma2ForCausalLM with sliding-window layers and RoPE scaling 'linear' is not supported"),
])
def test_unsupported_config_fails_in_one_line(change, pattern):
  """Each on a Gemma 3 config (all switches on) with one field changed."""
  config_cls, model_cls, kw = FAMILIES["gemma3"]
  hf = config_cls(**{**BASE, **kw}).to_dict()
  hf["architectures"] = [model_cls.__name__]
  hf.update(change)
  with pytest.raises(ImportFormatError, match=pattern) as e:
    hf_importer.model_config_from_hf(hf)
  assert "\n" not in str(e.value)


def test_model_config_rejects_unknown_switch_values():
  with pytest.raises(P.ConfigError, match=r"model.rope_scaling='yarn': use one of 'none', "
                                          r"'llama3', 'linear'"):
    M.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=8,
                  rope_scaling="yarn")
  with pytest.raises(P.ConfigError, match=r"model.mlp_activation='relu': use one of"):
    M.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=8,
                  mlp_activation="relu")


def test_local_layer_pattern():
  cfg = lambda **kw: M.ModelConfig(vocab_size=8, d_model=8, n_layers=7, n_heads=2, n_kv_heads=2,
                                   d_ff=8, **kw)
  assert cfg().local_layers == (False,) * 7
  # Gemma 3: five local, one global.
  assert cfg(sliding_window=4, sliding_window_pattern=6).local_layers == (True,) * 5 + (False, True)
  assert cfg(sliding_window=4, sliding_window_pattern=2).local_layers == (True, False) * 3 + (True,)
  assert cfg(sliding_window=4).local_layers == (True,) * 7  # Mistral: all local.
