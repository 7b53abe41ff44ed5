"""Tokenizers: SentencePiece BPE trained by the project, and a byte-level "char" tokenizer.

Both reserve the same special tokens at the same ids, so every later stage (SFT chat template, reward model,
RLHF) works with either and no tokenizer is ever retrained:

  0 <pad>   1 <unk>   2 <bos>   3 <eos>   4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>

Special tokens are never produced by `encode(text)`: a user who types "<|assistant|>" gets the characters, not
the role token (SentencePiece control symbols are not matched in text). Insert them by id.

A workdir holds `tokenizer.json` (which kind) and, for SentencePiece, `tokenizer.model`.
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


class Tokenizer:
  """The interface shared by both kinds."""

  kind: str
  vocab_size: int
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def special_id(self, token: str) -> int:
    return SPECIAL_TOKENS.index(token)

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

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

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])  # Control symbols decode to "".

  def save(self, directory: str) -> None:
    write_atomically(os.path.join(directory, SPM_MODEL_FILE), self.model_proto)
    _write_json(os.path.join(directory, CONFIG_FILE), {"kind": self.kind, "model": SPM_MODEL_FILE})

  def fingerprint(self) -> str:
    return f"spm:{hashlib.sha256(self.model_proto).hexdigest()[:16]}"


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
  raise UserError(f"{path}: field 'kind' must be 'char' or 'spm', got {kind!r}")


def _write_json(path: str, obj) -> None:
  write_atomically(path, json.dumps(obj, indent=2))
