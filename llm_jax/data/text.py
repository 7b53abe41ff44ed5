"""Pretraining data: read documents → tokenize → pack into rows → Grain shuffle / shard / batch.

Packing ("concatenate then split"): each document becomes `[<bos>] tokens <eos>` (BOS where the tokenizer adds
one by default: the project's and Llama's do, GPT-2's and Qwen2's do not); the documents are concatenated
into one stream and cut into rows of `seq_len` inputs, the targets being the stream shifted by one, so no token
is lost at a row boundary. Every row carries
  segment_ids  1, 2, ... per document piece within the row (0 = padding),
  positions    0, 1, ... restarting at each document piece, and
  loss_mask    1 where the target belongs to the same document as the input,
so attention never crosses a document boundary (see `model.attention_mask`) and no token is trained to predict
the next document. The last `eval_fraction` of the rows is the validation split (as nanoGPT holds out the end).

The packed rows live in memory (a corpus of a few hundred million tokens fits); Grain shuffles them with the
seed, reshuffles each epoch, gives each process only its own rows, and batches. The iterator's state is saved
with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from llm_jax.data.jsonl import read_jsonl
from llm_jax.errors import UserError
from llm_jax.sequences import PAD_FILL
from llm_jax.tokenizer import Tokenizer

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def expand_paths(pattern: str, name: str = "data.path") -> list[str]:
  """Comma-separated files or globs → sorted list of files; a pattern that matches nothing is an error.

  `name` is the setting the pattern came from, for the error message."""
  paths: list[str] = []
  for part in filter(None, (p.strip() for p in pattern.split(","))):
    matches = sorted(glob.glob(os.path.expanduser(part)))
    if not matches:
      raise UserError(f"{name}: no file matches {part!r}")
    paths.extend(m for m in matches if os.path.isfile(m))
  if not paths:
    raise UserError(f"{name}={pattern!r}: no files")
  return paths


def read_documents(pattern: str, text_field: str = "text", name: str = "data.path") -> list[str]:
  """Documents from text files (one per file), JSONL (one per line, field `text_field`) and ArrayRecord
  (one per record: UTF-8 text, or a JSON object with `text_field`). `name`: the setting, for error messages."""
  documents: list[str] = []
  for path in expand_paths(pattern, name):
    if path.endswith((".jsonl", ".json")):
      documents.extend(_read_jsonl(path, text_field))
    elif path.endswith(".array_record") or ".array_record-" in path:
      source = grain.sources.ArrayRecordDataSource([path])
      documents.extend(_record_text(source[i], path, i, text_field) for i in range(len(source)))
    else:
      try:
        with open(path, encoding="utf-8") as f:
          documents.append(f.read())
      except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  documents = [d for d in documents if d]
  if not documents:
    raise UserError(f"{name}={pattern!r}: the corpus is empty")
  return documents


def _read_jsonl(path: str, field: str) -> list[str]:
  def parse(obj) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
      raise ValueError(f"expected an object with a string field {field!r}")
    return obj[field]

  return read_jsonl(path, parse)[0]


def _record_text(record: bytes, path: str, index: int, field: str) -> str:
  try:
    text = record.decode("utf-8")
  except UnicodeDecodeError:
    raise UserError(f"{path}: record {index} is not UTF-8") from None
  if text.startswith("{"):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      return text
    if isinstance(obj, dict) and isinstance(obj.get(field), str):
      return obj[field]
  return text


def pack(
  token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int | None, eos_id: int
) -> dict[str, np.ndarray]:
  """Concatenate-then-split packing (module docstring). Returns [num_rows, seq_len] arrays of ROW_FIELDS.

  Each document is framed as `[bos_id] tokens [eos_id]` (no BOS when `bos_id` is None)."""
  head = [] if bos_id is None else [bos_id]
  lengths = np.array([len(t) + len(head) + 1 for t in token_lists], np.int64)
  stream = np.concatenate(
    [np.concatenate([head, np.asarray(t, np.int32), [eos_id]]).astype(np.int32) for t in token_lists]
  )
  doc_ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  num_rows = -(-(len(stream) - 1) // seq_len)
  padded = num_rows * seq_len + 1
  stream = np.pad(stream, (0, padded - len(stream)), constant_values=PAD_FILL)
  doc_ids = np.pad(doc_ids, (0, padded - len(doc_ids)))  # Padding belongs to document 0.

  inputs = stream[:-1].reshape(num_rows, seq_len)
  targets = stream[1:].reshape(num_rows, seq_len)
  input_docs = doc_ids[:-1].reshape(num_rows, seq_len)
  target_docs = doc_ids[1:].reshape(num_rows, seq_len)
  loss_mask = ((input_docs == target_docs) & (input_docs > 0)).astype(np.float32)
  # Renumber documents within each row from 1; padding stays 0.
  segment_ids = np.where(input_docs > 0, input_docs - input_docs[:, :1] + 1, 0).astype(np.int32)
  # Position = distance from the start of the token's document piece in this row.
  column = np.arange(seq_len, dtype=np.int32)
  starts = np.ones_like(segment_ids, dtype=bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  positions = column - np.maximum.accumulate(np.where(starts, column, 0), axis=1)
  return dict(
    inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions.astype(np.int32), loss_mask=loss_mask
  )


def pack_documents(token_lists: Sequence[Sequence[int]], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """`pack` with the tokenizer's document framing: BOS iff it adds one by default, EOS after each document."""
  return pack(token_lists, seq_len, bos_id=tokenizer.bos_id if tokenizer.add_bos else None, eos_id=tokenizer.eos_id)


@dataclasses.dataclass
class PackedDataset:
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  num_documents: int
  num_tokens: int

  @property
  def num_train_rows(self) -> int:
    return len(self.train["inputs"])


def build_packed_dataset(
  documents: Sequence[str],
  tokenizer: Tokenizer,
  seq_len: int,
  eval_fraction: float,
  eval_documents: Sequence[str] | None = None,
) -> PackedDataset:
  """Tokenizes and packs; validation = `eval_documents` if given, else the last `eval_fraction` of the rows."""
  token_lists = tokenizer.encode_batch(documents)
  rows = pack_documents(token_lists, tokenizer, seq_len)
  num_tokens = sum(len(t) for t in token_lists)
  if eval_documents:
    train, evaluation = rows, pack_documents(tokenizer.encode_batch(eval_documents), tokenizer, seq_len)
  else:
    num_rows = len(rows["inputs"])
    num_eval = int(round(num_rows * eval_fraction))
    if num_rows < 2 or (eval_fraction > 0 and num_eval == 0):
      num_eval = 1
    if num_rows - num_eval < 1:
      raise UserError(
        f"data: the corpus has {num_tokens} tokens ({num_rows} rows of seq_len={seq_len}); "
        "need at least 2 rows: one to train on and one to evaluate"
      )
    train = {k: v[: num_rows - num_eval] for k, v in rows.items()}
    evaluation = {k: v[num_rows - num_eval :] for k, v in rows.items()}
  return PackedDataset(train=train, eval=evaluation, num_documents=len(documents), num_tokens=num_tokens)


class _Rows(Sequence):
  """Random access to packed rows, one dict of arrays per row (a Grain data source)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}


def train_dataset(
  rows: dict[str, np.ndarray], global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """Endless shuffled batches of this process's rows.

  Global batch k is rows [k·B, (k+1)·B) of the seeded shuffle (reshuffled every epoch); process p gets the
  slice [p·B/P, (p+1)·B/P) of it and reads nothing else, so the global batch is the same for any process count.
  """
  local = global_batch // process_count
  ds = grain.MapDataset.source(_Rows(rows)).shuffle(seed=seed).repeat(None)
  return ds.batch(local, drop_remainder=True)[process_index::process_count]


def eval_batches(
  rows: dict[str, np.ndarray], global_batch: int, max_batches: int = 0, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
  """The validation rows in order, as this process's share of each global batch; the last batch is padded
  with rows whose loss_mask is 0 (they count for nothing)."""
  n = len(next(iter(rows.values())))
  num_batches = -(-n // global_batch)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  padded = {
    k: np.concatenate([v, np.zeros((num_batches * global_batch - n,) + v.shape[1:], v.dtype)])
    if num_batches * global_batch > n
    else v[: num_batches * global_batch]
    for k, v in rows.items()
  }
  local = global_batch // process_count
  out = []
  for b in range(num_batches):
    start = b * global_batch + process_index * local
    out.append({k: v[start : start + local] for k, v in padded.items()})
  return out


def pack_whole(
  sequences: Sequence[Sequence[int]], target_masks: Sequence[Sequence[int]], seq_len: int
) -> dict[str, np.ndarray]:
  """Packs sequences (e.g. rendered chats) into rows without ever splitting one ("next fit", in order).

  A sequence of n tokens gives n - 1 (input, target) pairs, so it must have n ≤ seq_len + 1 (callers truncate or
  drop longer ones). `loss_mask` is the target's entry of `target_masks`. The rest of a row is padding.
  """
  rows: list[list[tuple[Sequence[int], Sequence[int]]]] = [[]]
  used = 0
  for tokens, mask in zip(sequences, target_masks):
    pairs = len(tokens) - 1
    if pairs > seq_len:
      raise ValueError(f"a sequence of {len(tokens)} tokens does not fit seq_len={seq_len}")
    if pairs < 1:
      continue
    if used + pairs > seq_len:
      rows.append([])
      used = 0
    rows[-1].append((tokens, mask))
    used += pairs
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k == "loss_mask" else np.int32) for k in ROW_FIELDS}
  for r, row in enumerate(rows):
    start = 0
    for segment, (tokens, mask) in enumerate(row, 1):
      end = start + len(tokens) - 1
      out["inputs"][r, start:end] = tokens[:-1]
      out["targets"][r, start:end] = tokens[1:]
      out["loss_mask"][r, start:end] = mask[1:]
      out["segment_ids"][r, start:end] = segment
      out["positions"][r, start:end] = np.arange(end - start)
      start = end
  return out
