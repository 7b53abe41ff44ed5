"""The one chat template (SFT, chat-mode generation, reward model and RLHF all use it) and chat-file reading.

A conversation is rendered as token ids, role tokens inserted by id (they can never come from user text):

    <bos> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

The training mask marks the assistant's text and its <|end|>: the model learns to answer and to stop, never
to imitate the user. A prompt for generation ends with <|assistant|>; decoding stops at <|end|>.

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
from collections.abc import Sequence

from llm_jax.data.jsonl import read_jsonl
from llm_jax.errors import UserError
from llm_jax.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_IDS = {role: SPECIAL_TOKENS.index(f"<|{role}|>") for role in ROLES}
END_ID = SPECIAL_TOKENS.index("<|end|>")
# An answer ends at <|end|> (or <eos>). No other special token is ever sampled in an answer: a role token
# would forge a turn, <bos>/<pad>/<unk> are never text.
ANSWER_STOP_IDS = (END_ID, EOS_ID)
BANNED_IN_ANSWERS = tuple(i for i in range(len(SPECIAL_TOKENS)) if i not in ANSWER_STOP_IDS)


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


Chat = tuple[Message, ...]


def render(
  tokenizer: Tokenizer, messages: Sequence[Message], generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
  """Token ids of a conversation and its training mask (1 on assistant text and its <|end|>).

  `generation_prompt=True` appends <|assistant|> so that the model's continuation is the answer.
  """
  tokens, mask = [BOS_ID], [0]
  for message in messages:
    content = tokenizer.encode(message.content)
    trained = int(message.role == "assistant")
    tokens += [ROLE_IDS[message.role], *content, END_ID]
    mask += [0] + [trained] * (len(content) + 1)
  if generation_prompt:
    tokens.append(ROLE_IDS["assistant"])
    mask.append(0)
  return tokens, mask


def chat_sampling(sampling):
  """A SamplingConfig for assistant answers: stops at <|end|>/<eos>, never samples another special token."""
  return dataclasses.replace(
    sampling,
    stop_ids=tuple(sorted({*sampling.stop_ids, *ANSWER_STOP_IDS})),
    banned_ids=tuple(sorted({*sampling.banned_ids, *BANNED_IN_ANSWERS})),
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
