"""Chat templates (SFT, chat-mode generation, reward model and RLHF all use `render`) and chat-file reading.

Models trained here use the project's template: role tokens inserted by id (they can never come from user text):

    <bos> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

A prompt for generation ends with <|assistant|>; decoding stops at <|end|> (or <eos>).

An imported chat model's tokenizer carries its own `chat_template` (Jinja): it is rendered as transformers'
`apply_chat_template` renders it (same sandboxed Jinja environment, filters and globals) and the text is tokenized
with `add_special_tokens=False`, so the ids are those transformers gives. A tokenizer with neither (GPT-2) has no
chat format: chat data and `--chat` are refused.

The training mask marks each assistant answer through its end-of-turn token (<|end|>, <|im_end|>, <|eot_id|>,
</s>): the model learns to answer and to stop, never to imitate the user, and not the template's newline after
the end-of-turn token. For a Jinja template each answer's characters are found by rendering prefixes: the
conversation up to the answer with `add_generation_prompt=True` must be a prefix of the conversation with the
answer (a template that breaks this is refused); tokens are mapped to characters by their offsets.

Chat files are JSONL, one conversation per line, in either form:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}
Rules (each violation names file:line): `messages` is a non-empty list; roles are system, user or assistant;
a system message may only come first; every content is a non-empty string. With `on_error="skip"` such lines
are skipped and counted instead of stopping the run. A conversation without an assistant turn is valid but
has nothing to train on: SFT counts and drops it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from datetime import datetime

from llm_jax.data.jsonl import read_jsonl
from llm_jax.errors import UserError
from llm_jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# The project's template: role and end-of-turn tokens (their ids come from the tokenizer).
PROJECT_ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
PROJECT_END_TOKEN = "<|end|>"


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


Chat = tuple[Message, ...]


def check_chat_format(tokenizer: Tokenizer) -> None:
  """A UserError (one line) unless the tokenizer has a chat format: its own template, or the project's."""
  if tokenizer.chat_template is None and not tokenizer.has_project_roles():
    raise UserError(
      f"this model's tokenizer ({tokenizer.kind}) has no chat template: chat data and --chat need a chat model "
      "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
    )


def render(
  tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
  """Token ids of a conversation and its training mask (1 on each assistant answer and its end-of-turn token).

  `generation_prompt=True` ends the ids where the assistant's answer begins (project template: <|assistant|>).
  """
  check_chat_format(tokenizer)
  if tokenizer.chat_template is not None:
    return _render_jinja(tokenizer, tuple(messages), generation_prompt)
  role_ids = {role: tokenizer.token_id(token) for role, token in PROJECT_ROLE_TOKENS.items()}
  end_id = tokenizer.token_id(PROJECT_END_TOKEN)
  tokens, mask = [tokenizer.bos_id], [0]
  for message in messages:
    content = tokenizer.encode(message.content)
    trained = int(message.role == "assistant")
    tokens += [role_ids[message.role], *content, end_id]
    mask += [0] + [trained] * (len(content) + 1)
  if generation_prompt:
    tokens.append(role_ids["assistant"])
    mask.append(0)
  return tokens, mask


def render_response(tokenizer: Tokenizer, context: Sequence[Message], response: str) -> tuple[list[int], int]:
  """The ids of `context` answered by `response`, and the index where the answer starts (the reward model reads
  the answer's tokens from there to the end)."""
  tokens, mask = render(tokenizer, (*context, Message("assistant", response)))
  start = len(tokens)
  while start > 0 and mask[start - 1]:
    start -= 1
  if start == len(tokens):  # An answer the template leaves no trained token for (e.g. empty): after the prompt.
    start = min(len(render(tokenizer, context, generation_prompt=True)[0]), len(tokens))
  return tokens, start


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
  """The template compiled in the environment transformers uses (utils/chat_template_utils.py)."""
  import jinja2  # noqa: PLC0415
  import jinja2.ext  # noqa: PLC0415
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise UserError(f"chat_template: not a valid Jinja template: {e.message} (line {e.lineno})") from None


def render_text(tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
  """The tokenizer's Jinja chat template rendered as transformers renders it."""
  import jinja2  # noqa: PLC0415

  template = _compiled_template(tokenizer.chat_template)
  try:
    return template.render(
      messages=[{"role": m.role, "content": m.content} for m in messages],
      add_generation_prompt=generation_prompt,
      tools=None,
      documents=None,
      **tokenizer.special_tokens,
    )
  except jinja2.exceptions.TemplateError as e:
    raise UserError(f"chat_template refused the conversation: {e}") from None


def _render_jinja(tokenizer: Tokenizer, messages: Chat, generation_prompt: bool) -> tuple[list[int], list[int]]:
  text = render_text(tokenizer, messages, generation_prompt)
  ids, offsets = tokenizer.encode_with_offsets(text)
  mask = [0] * len(ids)
  stops = set(answer_stop_ids(tokenizer))
  for i, message in enumerate(messages):
    if message.role != "assistant":
      continue
    before = render_text(tokenizer, messages[:i], True)
    through = render_text(tokenizer, messages[: i + 1], False)
    if not (through.startswith(before) and text.startswith(through)):
      raise UserError(
        f"chat_template: rendering the conversation up to assistant turn {i} with add_generation_prompt=True "
        "is not a prefix of rendering it with the answer: the answer cannot be located for the training mask"
      )
    # The answer's tokens (those starting inside its characters) through its end-of-turn token.
    for t, (start, _) in enumerate(offsets):
      if len(before) <= start < len(through):
        mask[t] = 1
        if ids[t] in stops:
          break
  return ids, mask


def answer_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """Ids that end an assistant answer: the tokenizer's stop ids and EOS, and the template's end-of-turn token."""
  cached = getattr(tokenizer, "_answer_stop_ids", None)
  if cached is None:
    cached = tuple(sorted({*tokenizer.stop_ids, tokenizer.eos_id, _end_of_turn_id(tokenizer)} - {None}))
    tokenizer._answer_stop_ids = cached
  return cached


def _end_of_turn_id(tokenizer: Tokenizer) -> int | None:
  """The first special token after an answer's text in the template (<|end|>, <|im_end|>, <|eot_id|>), if any."""
  check_chat_format(tokenizer)
  if tokenizer.chat_template is None:
    return tokenizer.token_id(PROJECT_END_TOKEN)
  probe = (Message("user", "Hi"), Message("assistant", "Hello"))
  before, through = render_text(tokenizer, probe[:1], True), render_text(tokenizer, probe, False)
  ids, offsets = tokenizer.encode_with_offsets(through)
  answer = [i for i, (start, _) in zip(ids, offsets) if start >= len(before)]
  return next((i for i in answer if i in tokenizer.special_ids), None)


def banned_in_answers(tokenizer: Tokenizer) -> tuple[int, ...]:
  """Special ids never sampled in an answer: a role token would forge a turn, BOS/PAD/UNK are never text."""
  return tuple(sorted(tokenizer.special_ids - set(answer_stop_ids(tokenizer))))


def chat_sampling(sampling, tokenizer: Tokenizer):
  """A SamplingConfig for assistant answers: stops at the end of the turn, never samples another special token."""
  return dataclasses.replace(
    sampling,
    stop_ids=tuple(sorted({*sampling.stop_ids, *answer_stop_ids(tokenizer)})),
    banned_ids=tuple(sorted({*sampling.banned_ids, *banned_in_answers(tokenizer)})),
  )


def prompt_and_answer(chat: Chat) -> tuple[Chat, str]:
  """The conversation up to its last assistant turn, and that turn's text (for exact-match evaluation)."""
  last = max(i for i, m in enumerate(chat) if m.role == "assistant")
  return chat[:last], chat[last].content


def parse_chat(obj) -> Chat:
  """One JSON object → a validated conversation; raises ValueError saying what is wrong."""
  if not isinstance(obj, dict):
    raise ValueError("expected a JSON object")
  if "messages" in obj:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
      raise ValueError("'messages' must be a non-empty list")
  elif "prompt" in obj and "response" in obj:
    raw = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
  else:
    raise ValueError("expected a 'messages' list or 'prompt' and 'response' fields")
  chat = []
  for i, message in enumerate(raw):
    if not isinstance(message, dict):
      raise ValueError(f"message {i} is not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
      raise ValueError(f"message {i}: unknown role {role!r} (expected one of {list(ROLES)})")
    if role == "system" and i != 0:
      raise ValueError(f"message {i}: a system message may only come first")
    if not isinstance(content, str) or not content.strip():
      raise ValueError(f"message {i} ({role}): 'content' must be a non-empty string")
    chat.append(Message(role, content))
  return tuple(chat)


@dataclasses.dataclass
class ChatFile:
  chats: list[Chat]
  skipped_lines: int  # Malformed lines skipped (on_error="skip").


def read_chats(path: str, on_error: str = "raise") -> ChatFile:
  """Reads a JSONL chat file (module docstring); `on_error` is "raise" or "skip"."""
  chats, skipped = read_jsonl(path, parse_chat, on_error)
  if not chats:
    raise UserError(f"{path}: no valid conversation")
  return ChatFile(chats, skipped)
