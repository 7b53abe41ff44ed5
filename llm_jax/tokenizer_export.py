"""Tokenizers as Hugging Face files: `export_hf_tokenizer` writes a directory that
`transformers.AutoTokenizer.from_pretrained` loads and that gives the same ids as `Tokenizer.encode_default`.

  kind "hf"    its files, copied.
  kind "char"  a tokenizer.json built here: ByteLevel pre-tokenizer (no regex, no prefix space) and a BPE without
               merges over the 256 byte symbols at ids 8-263; the special tokens 0-7 as added special tokens.
  kind "spm"   a tokenizer.json reproducing the SentencePiece BPE model: its vocabulary, merges ordered by the
               merged piece's id (as transformers' converter orders them), byte fallback, "▁" for spaces and no
               dummy prefix.

Both project kinds get a Jinja `chat_template` equivalent to the project's template (llm_jax/chat.py), so that
`apply_chat_template` gives the ids `chat.render` gives. One difference is inherent to Hugging Face tokenizers:
they match special-token strings typed in text ("<|user|>"), which the project's `encode` keeps as text.

`sentencepiece_bpe` also serves imported models that ship only a tokenizer.model (built as transformers 5 builds
its Llama tokenizer from one).
"""

from __future__ import annotations

import json
import os

import sentencepiece as spm

from llm_jax.errors import UserError
from llm_jax.files import write_atomically
from llm_jax.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

# The project's chat template (llm_jax/chat.py) in Jinja: role tokens are special tokens matched in the text.
PROJECT_CHAT_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}"
  "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in character of each byte (the ByteLevel pre-tokenizer's alphabet)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _with_bos_processor(fast, bos: str, bos_id: int) -> None:
  from tokenizers import processors  # noqa: PLC0415

  fast.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
  )


def char_tokenizer_json(tokenizer: ByteTokenizer) -> str:
  """The char tokenizer as a tokenizer.json (module docstring)."""
  from tokenizers import AddedToken, decoders, models, pre_tokenizers  # noqa: PLC0415
  from tokenizers import Tokenizer as FastTokenizer  # noqa: PLC0415

  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  vocab.update({char: b + len(SPECIAL_TOKENS) for b, char in bytes_to_unicode().items()})
  fast = FastTokenizer(models.BPE(vocab=vocab, merges=[]))
  fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
  fast.decoder = decoders.ByteLevel()
  fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  if tokenizer.add_bos:
    _with_bos_processor(fast, SPECIAL_TOKENS[tokenizer.bos_id], tokenizer.bos_id)
  return fast.to_str(pretty=True)


def sentencepiece_bpe(model_proto: bytes, prepend_scheme: str):
  """A `tokenizers.Tokenizer` equal to a SentencePiece BPE model with byte fallback.

  Args:
    model_proto: The serialized SentencePiece model.
    prepend_scheme: "never" (the project's models: no dummy prefix) or "first" ("▁" before the text's start, as
      transformers 5 does for a Llama tokenizer.model).
  """
  from tokenizers import AddedToken, decoders, models, pre_tokenizers  # noqa: PLC0415
  from tokenizers import Tokenizer as FastTokenizer  # noqa: PLC0415

  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  # Merges as transformers' generate_merges orders them: by the merged piece's id, then the halves' lengths.
  merges = []
  for piece, piece_id in vocab.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((piece_id, len(left), len(right), left, right))
  merges.sort(key=lambda m: m[:3])
  unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
  fast = FastTokenizer(
    models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
  )
  fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prepend_scheme != "never":
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  fast.decoder = decoders.Sequence(steps)
  # Control and unknown pieces are special added tokens; user-defined pieces are added, not special.
  from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  kinds = {sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL: True}
  kinds[sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN] = True
  kinds[sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED] = False
  added = [AddedToken(p.piece, special=kinds[p.type], normalized=False) for p in proto.pieces if p.type in kinds]
  fast.add_tokens([t for t in added if not t.special])
  fast.add_special_tokens([t for t in added if t.special])
  return fast


def spm_tokenizer_json(tokenizer: SentencePieceTokenizer) -> str:
  """The project's SentencePiece model as a tokenizer.json (module docstring)."""
  fast = sentencepiece_bpe(tokenizer.model_proto, "never")
  if tokenizer.add_bos:
    _with_bos_processor(fast, SPECIAL_TOKENS[tokenizer.bos_id], tokenizer.bos_id)
  return fast.to_str(pretty=True)


def project_tokenizer_config(tokenizer: Tokenizer) -> dict:
  """tokenizer_config.json for a project kind: a PreTrainedTokenizerFast with the project's chat template."""
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    **tokenizer.special_tokens,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1 << 30,
    "chat_template": PROJECT_CHAT_TEMPLATE,
  }


def export_hf_tokenizer(tokenizer: Tokenizer, out_dir: str) -> list[str]:
  """Writes Hugging Face tokenizer files for `tokenizer` into `out_dir`; returns the file names written."""
  os.makedirs(out_dir, exist_ok=True)
  if isinstance(tokenizer, HFTokenizer):
    files = dict(tokenizer.files)
  elif isinstance(tokenizer, ByteTokenizer):
    files = {"tokenizer.json": char_tokenizer_json(tokenizer)}
  elif isinstance(tokenizer, SentencePieceTokenizer):
    files = {"tokenizer.json": spm_tokenizer_json(tokenizer)}
  else:
    raise UserError(f"tokenizer kind {tokenizer.kind!r} cannot be exported to Hugging Face files")
  if not isinstance(tokenizer, HFTokenizer):
    files["tokenizer_config.json"] = json.dumps(project_tokenizer_config(tokenizer), indent=2, ensure_ascii=False)
  for name, data in files.items():
    write_atomically(os.path.join(out_dir, name), data)
  return sorted(files)
