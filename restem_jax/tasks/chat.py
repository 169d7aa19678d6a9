"""Chat-format prompts (task.prompt_format = "chat") from the model's own chat template.

An instruct model (SmolLM2-135M-Instruct) was tuned on conversations written by
its chat template, a Jinja template stored with the tokenizer (GGUF
`tokenizer.chat_template`, HF `tokenizer_config.json` "chat_template"). In chat
format the few-shot exemplars become user / assistant turns and the question
the last user turn, rendered by that template with the generation prompt, as
transformers' `apply_chat_template` does: Jinja2's immutable sandbox (the
template is data from a file, not trusted code), trim_blocks / lstrip_blocks,
the loop-controls extension, and the helpers templates call (raise_exception,
tojson, strftime_now).

The seqio pipeline builds every prompt as `prefix + before + question + hint +
after` (prompts.PromptFormat). A chat prompt has that shape when the template
writes message content verbatim: `chat_format` renders the conversation once
with a marker as the question's content and splits there, then checks with a
second marker (with surrounding whitespace) that the split reproduces the
template's own rendering; a template that rewrites content (e.g. trims it) is
refused in one line.

Stops: a chat model ends its answer with its end-of-turn token (SmolLM2: its
EOS, <|im_end|>, which already ends a sample). If it goes on into a next turn,
the text it writes there, as decoding shows it (special tokens dropped:
"\\nuser\\nQuestion:" for ChatML), is added as a stop string, so the completion
still ends where the next turn starts.
"""
from __future__ import annotations

import datetime
import functools
import json
import mmap
import os
import struct
from typing import Any, Callable, Optional, Sequence

from restem_jax.tasks import prompts

FORMATS = ("few_shot", "chat")
_MARK = "\x00restem-question\x00"
_MARK2 = " \n\x00restem-other\x00\n "


class ChatTemplateError(ValueError):
  """The chat template cannot be used (absent, or it rewrites message content)."""


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
             separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def render(template: str, messages: Sequence[dict], *, add_generation_prompt: bool,
           special_tokens: Optional[dict] = None) -> str:
  """The conversation as the template writes it (apply_chat_template(tokenize=False))."""
  return _compile(template).render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   **(special_tokens or {}))


def conversation(exemplars: Sequence[tuple[str, str]], question: str) -> list[dict]:
  """Exemplars as user / assistant turns, then the question as the last user turn."""
  out = []
  for user, assistant in exemplars:
    out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
  return out + [{"role": "user", "content": question}]


def chat_format(template: str, exemplars: Sequence[tuple[str, str]], before: str, *,
                special_tokens: Optional[dict] = None, strip_prefix: str = "",
                decode: Callable[[str], str] = lambda s: s
                ) -> tuple[prompts.PromptFormat, tuple[str, ...]]:
  """(PromptFormat, stop strings) of chat prompts whose last user turn is before + question + hint.

  strip_prefix: removed from the start of the rendering (the BOS text a template
  writes when the tokenizer adds BOS itself, so it is not doubled). decode: text as
  sampled completions show it (special tokens dropped), for the stop string.
  """
  def rendered(content: str) -> str:
    text = render(template, conversation(exemplars, content), add_generation_prompt=True,
                  special_tokens=special_tokens)
    return text[len(strip_prefix):] if strip_prefix and text.startswith(strip_prefix) else text

  text = rendered(before + _MARK)
  if text.count(_MARK) != 1:
    raise ChatTemplateError("the chat template does not write the question verbatim once; "
                            "use task.prompt_format='few_shot'")
  head, after = text.split(_MARK)
  if not head.endswith(before):
    raise ChatTemplateError("the chat template rewrites the user message's start; use "
                            "task.prompt_format='few_shot'")
  fmt = prompts.PromptFormat(head[:len(head) - len(before)], before, after)
  if rendered(before + _MARK2) != fmt.render(_MARK2):
    raise ChatTemplateError("the chat template changes message content (e.g. trims it), so "
                            "prompts cannot be assembled from its parts; use "
                            "task.prompt_format='few_shot'")
  return fmt, _turn_stops(template, before, special_tokens, decode)


def _turn_stops(template: str, before: str, special_tokens: Optional[dict],
                decode: Callable[[str], str]) -> tuple[str, ...]:
  """What the model writes from the end of its answer into the next user turn, decoded."""
  answer, question = "\x00restem-answer\x00", "\x00restem-next\x00"
  text = render(template, conversation([("\x00restem-q\x00", answer)], question),
                add_generation_prompt=False, special_tokens=special_tokens)
  if answer not in text or question not in text:
    return ()
  between = text[text.index(answer) + len(answer):text.index(question)]
  stop = decode(between) + before.rstrip()
  return (stop,) if stop.strip() else ()


# ----------------------------------------------------------------------------- stored templates

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_TEMPLATE_KEY = "tokenizer.chat_template"
UNKNOWN = object()  # stored_template could not tell (a file it cannot parse).


def _gguf_string_field(path: str, key: str) -> Any:
  """The string metadata value `key` of a GGUF file, None if absent, UNKNOWN if unparsable.

  Walks the key/value section only (gguf.GGUFReader also maps every token and
  tensor: seconds for a large vocabulary; configlib checks a config in about one).
  """
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] not in (2, 3):
        return UNKNOWN
      (num_kv,) = struct.unpack_from("<Q", m, 16)
      pos = 24

      def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", m, pos)
        return m[pos + 8:pos + 8 + n], pos + 8 + n

      def skip(kind: int, pos: int) -> int:
        if kind == _GGUF_STRING:
          return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
        if kind == _GGUF_ARRAY:
          item, count = struct.unpack_from("<IQ", m, pos)
          pos += 12
          if item in _GGUF_SCALAR_SIZES:
            return pos + count * _GGUF_SCALAR_SIZES[item]
          for _ in range(count):
            pos = skip(item, pos)
          return pos
        return pos + _GGUF_SCALAR_SIZES[kind]

      for _ in range(num_kv):
        name, pos = string(pos)
        (kind,) = struct.unpack_from("<I", m, pos)
        pos += 4
        if name.decode("utf-8", "replace") == key:
          return string(pos)[0].decode("utf-8") if kind == _GGUF_STRING else UNKNOWN
        pos = skip(kind, pos)
      return None
  except (OSError, ValueError, KeyError, struct.error):
    return UNKNOWN


def stored_template(path: str) -> Any:
  """The chat template stored with the tokenizer at `path` (cheap: no TF, no tokenizer).

  A .gguf file, a tokenizer.json (its directory's tokenizer_config.json) or an HF
  directory; None when it stores none (a SentencePiece .model never does), UNKNOWN
  when the file cannot be read here (the run's own load reports it).
  """
  if not os.path.exists(path):  # gs:// or missing: the run's own load decides.
    return UNKNOWN
  if path.endswith(".gguf"):
    return _gguf_string_field(path, GGUF_TEMPLATE_KEY)
  if path.endswith(".model"):
    return None
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  jinja_file = os.path.join(directory, "chat_template.jinja")  # transformers >= 4.43 saves it so
  if os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  config = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(config):
    return None
  try:
    with open(config) as f:
      template = json.load(f).get("chat_template")
  except (OSError, ValueError):
    return UNKNOWN
  # A list of named templates (older HF files): the "default" one.
  if isinstance(template, list):
    template = {t.get("name"): t.get("template") for t in template}.get("default")
  return template or None
