"""Tokenizers: SentencePiece BPE trained by the project, a byte-level "char" tokenizer, and imported Hugging Face
tokenizers. Every tokenizer carries its special tokens as data (`pad_id`, `bos_id`, `eos_id`, `stop_ids`,
`add_bos`, `special_ids`, `chat_template`, `special_tokens`): no other module knows an id.

The project's own kinds reserve the same special tokens at the same ids, so every later stage (SFT chat
template, reward model, RLHF) works with either and no tokenizer is ever retrained:

  0 <pad>   1 <unk>   2 <bos>   3 <eos>   4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>

Their special tokens are never produced by `encode(text)`: a user who types "<|assistant|>" gets the characters,
not the role token (SentencePiece control symbols are not matched in text). Insert them by id. Their chat
template is the project's (llm_jax/chat.py), so `chat_template` is None.

An imported tokenizer (kind "hf") tokenizes as the model's own `transformers` tokenizer does with
`add_special_tokens=False` (special-token strings in text *are* matched, as there); `encode_default` adds BOS
where that tokenizer does by default (Llama: yes; GPT-2, Qwen2: no).

A workdir holds `tokenizer.json`, the project's description of which kind: `{"kind": "char"}`,
`{"kind": "spm", "model": "tokenizer.model"}` or `{"kind": "hf", "dir": "hf_tokenizer"}`, the last with the Hugging
Face files copied into that subdirectory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from llm_jax.errors import UserError
from llm_jax.files import write_atomically

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_TOKENS = SPECIAL_TOKENS[4:]
CONFIG_FILE = "tokenizer.json"
SPM_MODEL_FILE = "tokenizer.model"
HF_DIR = "hf_tokenizer"
# The Hugging Face files an imported tokenizer reads and carries along (what exists of them).
HF_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
  "chat_template.jinja",
)
# The special-token strings a chat template may read (transformers passes its special_tokens_map).
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
  """The interface shared by every kind. Special tokens are data (module docstring).

  Attributes:
    kind: "char", "spm" or "hf".
    vocab_size: Number of ids (the model's vocabulary may be larger).
    pad_id: Id of the padding token (the eos id where a tokenizer has none).
    unk_id: Id of the unknown token, or None.
    bos_id: Id of the beginning-of-sequence token, or None (GPT-2 style tokenizers have one, Qwen2 none).
    eos_id: Id of the end-of-sequence token: the document separator in pretraining.
    stop_ids: Ids at which generation stops (Hugging Face: generation_config.json's eos_token_id).
    add_bos: Whether the tokenizer starts a prompt or a document with BOS by default.
    special_ids: Every special/control id (never text).
    chat_template: The model's Jinja chat template, or None for the project's own template.
    special_tokens: The special-token strings by name ("bos_token", ...), for chat templates.
  """

  kind: str
  vocab_size: int
  pad_id: int = PAD_ID
  unk_id: int | None = UNK_ID
  bos_id: int | None = BOS_ID
  eos_id: int = EOS_ID
  stop_ids: tuple[int, ...] = (EOS_ID,)
  add_bos: bool = True
  special_ids: frozenset[int] = frozenset(range(len(SPECIAL_TOKENS)))
  chat_template: str | None = None
  special_tokens: dict[str, str] = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
  }

  def token_id(self, token: str) -> int:
    """The id of a special token's string; a UserError if the tokenizer has no such token."""
    if token in SPECIAL_TOKENS:
      return SPECIAL_TOKENS.index(token)
    raise UserError(f"tokenizer ({self.kind}): no token {token!r}")

  def special_id(self, token: str) -> int:
    return self.token_id(token)

  def has_project_roles(self) -> bool:
    """Whether the project's chat template (role tokens <|system|> ... <|end|>) applies to this tokenizer."""
    return self.chat_template is None and self.kind in ("char", "spm")

  def encode(self, text: str) -> list[int]:
    """Plain ids of the text: no special token added."""
    raise NotImplementedError

  def encode_default(self, text: str) -> list[int]:
    """Ids as the model's own tokenizer gives them by default (BOS first iff `add_bos`): prompts, documents."""
    return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's (start, end) character span in `text`."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the ids; special tokens are dropped."""
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError

  def fingerprint(self) -> str:
    """Equal for two tokenizers exactly when they map text to the same ids."""
    return self.kind


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past the special ids: any text, no training, 264 ids (nanoGPT-style char runs)."""

  kind = "char"
  vocab_size = len(SPECIAL_TOKENS) + 256
  _offset = len(SPECIAL_TOKENS)

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._offset).tolist()

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = [], []
    for i, char in enumerate(text):
      for byte in char.encode("utf-8"):
        ids.append(byte + self._offset)
        offsets.append((i, i + 1))
    return ids, offsets

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(i - self._offset for i in ids if self._offset <= i < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def save(self, directory: str) -> None:
    _write_json(os.path.join(directory, CONFIG_FILE), {"kind": self.kind})


class SentencePieceTokenizer(Tokenizer):
  kind = "spm"

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    for i, token in enumerate(SPECIAL_TOKENS):
      if self.sp.id_to_piece(i) != token:
        raise UserError(
          f"SentencePiece model: id {i} is {self.sp.id_to_piece(i)!r}, expected {token!r} "
          "(train it with llm_jax.tokenizer.train_sentencepiece)"
        )

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    return _spm_ids_and_offsets(self.sp, text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])  # Control symbols decode to "".

  def save(self, directory: str) -> None:
    write_atomically(os.path.join(directory, SPM_MODEL_FILE), self.model_proto)
    _write_json(os.path.join(directory, CONFIG_FILE), {"kind": self.kind, "model": SPM_MODEL_FILE})

  def fingerprint(self) -> str:
    return f"spm:{hashlib.sha256(self.model_proto).hexdigest()[:16]}"


def _spm_ids_and_offsets(sp: spm.SentencePieceProcessor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """SentencePiece ids with character spans (its pieces carry UTF-8 byte spans)."""
  char_at_byte = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
  position = 0
  for i, char in enumerate(text):
    width = len(char.encode("utf-8"))
    char_at_byte[position : position + width] = i
    position += width
  char_at_byte[position] = len(text)
  pieces = sp.encode(text, return_type="proto").pieces
  ids = [p.id for p in pieces]
  offsets = [(int(char_at_byte[p.begin]), int(char_at_byte[p.end])) for p in pieces]
  # A multi-byte character split into byte pieces: every piece spans the whole character.
  offsets = [(s, e if e > s else min(s + 1, len(text))) for s, e in offsets]
  return ids, offsets


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer (tokenizer.json, or tokenizer.model alone) with its configuration files.

  `files` maps each file name of `HF_FILES` that exists to its bytes: saved along, hashed for the fingerprint.
  Build one with `HFTokenizer.from_hf_dir(path)`.
  """

  kind = "hf"

  def __init__(self, files: dict[str, bytes], source: str = "<memory>"):
    self.files, self.source = dict(files), source
    config = self._json("tokenizer_config.json")
    special_map = self._json("special_tokens_map.json")
    generation = self._json("generation_config.json")
    if "tokenizer.json" in files:
      self._fast = self._load_fast()
    elif "tokenizer.model" in files:
      # Built as transformers 5 builds a Llama tokenizer from a tokenizer.model alone.
      from llm_jax.tokenizer_export import sentencepiece_bpe  # noqa: PLC0415 (it imports this module)

      prefix = config.get("add_prefix_space")
      try:
        self._fast = sentencepiece_bpe(files["tokenizer.model"], "never" if prefix is False else "first")
      except Exception as e:  # noqa: BLE001 (protobuf and sentencepiece raise assorted types)
        raise UserError(f"{self._where('tokenizer.model')}: not a SentencePiece BPE model ({e})") from None
    else:
      raise UserError(f"{source}: no tokenizer.json or tokenizer.model (a Hugging Face tokenizer directory?)")
    self._vocab = self._fast.get_vocab(with_added_tokens=True)
    special = {i for i, t in self._fast.get_added_tokens_decoder().items() if t.special}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
      if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        self._vocab.setdefault(entry["content"], int(key))
        if entry.get("special", True):
          special.add(int(key))

    # Special-token strings: tokenizer_config.json first, then special_tokens_map.json.
    self.special_tokens = {}
    for name in TEMPLATE_TOKEN_NAMES:
      for file, table in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        value = table.get(name)
        if isinstance(value, dict):
          value = value.get("content")
        if value is None:
          continue
        if not isinstance(value, str):
          raise UserError(f"{self._where(file)}: field {name!r} must be a string or {{'content': ...}}")
        if value not in self._vocab:
          raise UserError(f"{self._where(file)}: field {name!r} = {value!r} is not in the vocabulary")
        self.special_tokens[name] = value
        break
    ids = {name: self._vocab[token] for name, token in self.special_tokens.items()}
    self.bos_id, self.unk_id = ids.get("bos_token"), ids.get("unk_token")
    if "eos_token" not in ids:
      raise UserError(f"{self._where('tokenizer_config.json')}: field 'eos_token' is missing (no end-of-text token)")
    self.eos_id = ids["eos_token"]
    self.pad_id = ids.get("pad_token", self.eos_id)
    self.special_ids = frozenset(special | set(ids.values()))
    self.vocab_size = max(len(self._vocab), max(self._vocab.values()) + 1)

    stops = generation.get("eos_token_id", self.eos_id)
    stops = stops if isinstance(stops, list) else [stops]
    if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in stops):
      raise UserError(f"{self._where('generation_config.json')}: field 'eos_token_id' must be ids, got {stops!r}")
    self.stop_ids = tuple(dict.fromkeys(stops))
    self.add_bos = self._default_add_bos(config)

    template = config.get("chat_template")
    if "chat_template.jinja" in files:
      template = files["chat_template.jinja"].decode("utf-8")
    if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}, ...].
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    if template is not None and not isinstance(template, str):
      raise UserError(f"{self._where('tokenizer_config.json')}: field 'chat_template' must be a string")
    self.chat_template = template

  @classmethod
  def from_hf_dir(cls, path: str) -> HFTokenizer:
    """Reads the tokenizer files of a Hugging Face model directory (`HF_FILES`, what exists of them)."""
    if not os.path.isdir(path):
      raise UserError(f"{path}: not a directory")
    files = {}
    for name in HF_FILES:
      file_path = os.path.join(path, name)
      if os.path.exists(file_path):
        try:
          with open(file_path, "rb") as f:
            files[name] = f.read()
        except OSError as e:
          raise UserError(f"{file_path}: {e.strerror}") from None
    return cls(files, path)

  def _where(self, name: str) -> str:
    return os.path.join(self.source, name)

  def _json(self, name: str) -> dict:
    if name not in self.files:
      return {}
    try:
      obj = json.loads(self.files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f"{self._where(name)}: unreadable JSON: {e}") from None
    if not isinstance(obj, dict):
      raise UserError(f"{self._where(name)}: expected a JSON object")
    return obj

  def _load_fast(self):
    import tokenizers  # noqa: PLC0415 (only imported models need it)

    try:
      fast = tokenizers.Tokenizer.from_str(self.files["tokenizer.json"].decode("utf-8"))
    except Exception as e:  # noqa: BLE001 (the library raises plain Exceptions for bad files)
      raise UserError(f"{self._where('tokenizer.json')}: unreadable tokenizer: {str(e).splitlines()[0]}") from None
    fast.no_truncation()
    fast.no_padding()
    return fast

  def _default_add_bos(self, config: dict) -> bool:
    """BOS by default: tokenizer_config's add_bos_token if set, else what the post-processor (tokenizer.json) or
    the SentencePiece convention (tokenizer.model) does."""
    if self.bos_id is None:
      return False
    if isinstance(config.get("add_bos_token"), bool):
      return config["add_bos_token"]
    with_specials = self._fast.encode("a", add_special_tokens=True).ids
    return with_specials[:1] == [self.bos_id] and self._fast.encode("a", add_special_tokens=False).ids[:1] != [
      self.bos_id
    ]

  def token_id(self, token: str) -> int:
    if token not in self._vocab:
      raise UserError(f"{self.source}: no token {token!r} in the vocabulary")
    return self._vocab[token]

  def encode(self, text: str) -> list[int]:
    return self.encode_with_offsets(text)[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = self._fast.encode(text, add_special_tokens=False)
    return encoding.ids, [tuple(o) for o in encoding.offsets]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    return self._fast.decode(ids, skip_special_tokens=True)

  def save(self, directory: str) -> None:
    os.makedirs(os.path.join(directory, HF_DIR), exist_ok=True)
    for name, data in self.files.items():
      write_atomically(os.path.join(directory, HF_DIR, name), data)
    _write_json(os.path.join(directory, CONFIG_FILE), {"kind": self.kind, "dir": HF_DIR})

  def fingerprint(self) -> str:
    digest = hashlib.sha256()
    for name in sorted(self.files):
      digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
    return f"hf:{digest.hexdigest()[:16]}"


def train_sentencepiece(
  texts: Iterable[str], vocab_size: int, *, max_sentence_length: int = 1 << 16, num_threads: int = 2
) -> SentencePieceTokenizer:
  """Trains a BPE model with byte fallback; ids 0-7 are the special tokens above."""
  if vocab_size < len(SPECIAL_TOKENS) + 256 + 16:
    raise UserError(f"data.vocab_size={vocab_size}: byte fallback needs at least {len(SPECIAL_TOKENS) + 272}")
  buffer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=buffer,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      pad_piece="<pad>",
      unk_piece="<unk>",
      bos_piece="<bos>",
      eos_piece="<eos>",
      control_symbols=list(ROLE_TOKENS),
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      normalization_rule_name="identity",
      split_digits=True,
      character_coverage=1.0,
      max_sentence_length=max_sentence_length,
      num_threads=num_threads,
      minloglevel=2,
      hard_vocab_limit=False,
    )
  except RuntimeError as e:
    raise UserError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from None
  return SentencePieceTokenizer(buffer.getvalue())


def load_tokenizer(directory: str) -> Tokenizer:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"{path}: no tokenizer in this workdir")
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: unreadable tokenizer description: {e}") from None
  kind = spec.get("kind")
  if kind == "char":
    return ByteTokenizer()
  if kind == "spm":
    model_path = os.path.join(directory, spec.get("model", SPM_MODEL_FILE))
    try:
      with open(model_path, "rb") as f:
        return SentencePieceTokenizer(f.read())
    except OSError as e:
      raise UserError(f"{model_path}: {e.strerror}") from None
  if kind == "hf":
    hf_dir = spec.get("dir", HF_DIR)
    if not isinstance(hf_dir, str) or os.path.isabs(hf_dir):
      raise UserError(f"{path}: field 'dir' must be a relative directory name, got {hf_dir!r}")
    return HFTokenizer.from_hf_dir(os.path.join(directory, hf_dir))
  raise UserError(f"{path}: field 'kind' must be 'char', 'spm' or 'hf', got {kind!r}")


def _write_json(path: str, obj) -> None:
  write_atomically(path, json.dumps(obj, indent=2))
