"""Tokenizers, packing (against a plain-Python reference), document readers, and per-process batching."""

import json

import numpy as np
import pytest

from llm_jax.data import text
from llm_jax.errors import UserError
from llm_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, ByteTokenizer, load_tokenizer, train_sentencepiece

SAMPLE = "Hello wörld — 日本語 😀\n\ttabs and  spaces. <|assistant|> is just text."


def corpus(n=300):
  rng = np.random.default_rng(0)
  words = ["the", "capital", "of", "France", "is", "Paris", "people", "speak", "French", "river", "city"]
  return [" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(n)]


@pytest.mark.parametrize("kind", ["char", "spm"])
def test_tokenizer_round_trip_and_special_tokens(kind, tmp_path):
  tokenizer = ByteTokenizer() if kind == "char" else train_sentencepiece(corpus() + [SAMPLE], 400)
  ids = tokenizer.encode(SAMPLE)
  assert tokenizer.decode(ids) == SAMPLE
  # Role tokens typed by a user stay text: no special id is ever produced by encode().
  assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
  assert tokenizer.special_id("<|assistant|>") == 6 and tokenizer.eos_id == 3
  assert tokenizer.decode([BOS_ID, 6] + tokenizer.encode("hi") + [EOS_ID]) == "hi"
  tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.encode(SAMPLE) == ids and loaded.vocab_size == tokenizer.vocab_size


def test_spm_vocab_size_is_respected():
  tokenizer = train_sentencepiece(corpus(), 320)
  assert tokenizer.vocab_size <= 320
  assert len(tokenizer.encode("the capital of France")) < len("the capital of France")  # Merges learned.


def reference_pack(token_lists, seq_len):
  """Plain-Python concatenate-then-split: one token at a time."""
  stream, docs = [], []
  for d, tokens in enumerate(token_lists, 1):
    for t in [BOS_ID, *tokens, EOS_ID]:
      stream.append(t)
      docs.append(d)
  rows = {k: [] for k in text.ROW_FIELDS}
  for start in range(0, len(stream) - 1, seq_len):
    row = {k: [] for k in text.ROW_FIELDS}
    for i in range(start, start + seq_len):
      inp, doc = (stream[i], docs[i]) if i < len(stream) else (PAD_ID, 0)
      tgt, tdoc = (stream[i + 1], docs[i + 1]) if i + 1 < len(stream) else (PAD_ID, 0)
      row["inputs"].append(inp)
      row["targets"].append(tgt)
      row["loss_mask"].append(float(doc == tdoc and doc > 0))
      first_doc = docs[start]
      row["segment_ids"].append(doc - first_doc + 1 if doc else 0)
      same = i > start and row["segment_ids"][-1] == row["segment_ids"][-2]
      row["positions"].append(row["positions"][-1] + 1 if same else 0)
    for k in rows:
      rows[k].append(row[k])
  return {k: np.array(v) for k, v in rows.items()}


@pytest.mark.parametrize("seq_len", [1, 4, 7, 32])
def test_pack_matches_reference(seq_len):
  rng = np.random.default_rng(seq_len)
  token_lists = [rng.integers(8, 100, rng.integers(0, 12)).tolist() for _ in range(9)]
  packed = text.pack(token_lists, seq_len, bos_id=BOS_ID, eos_id=EOS_ID)
  expected = reference_pack(token_lists, seq_len)
  for k in text.ROW_FIELDS:
    np.testing.assert_array_equal(packed[k], expected[k], err_msg=k)
  # Every token of every document is a target exactly once.
  assert packed["loss_mask"].sum() == sum(len(t) + 1 for t in token_lists)


def test_read_documents_formats(tmp_path):
  (tmp_path / "a.txt").write_text("plain text file")
  (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
  writer.write(b"record one")
  writer.write(json.dumps({"text": "record two"}).encode())
  writer.close()
  docs = text.read_documents(f"{tmp_path}/*.txt,{tmp_path}/*.jsonl,{tmp_path}/*.array_record")
  assert docs == ["plain text file", "one", "two", "record one", "record two"]


def test_bad_inputs_name_the_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": broken\n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
    text.read_documents(str(bad))
  bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: .*'text'"):
    text.read_documents(str(bad))
  with pytest.raises(UserError, match="no file matches"):
    text.read_documents(str(tmp_path / "missing*.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(UserError, match="empty"):
    text.read_documents(str(tmp_path / "empty.txt"))
  with pytest.raises(UserError, match="need at least 2 rows"):
    text.build_packed_dataset(["ab"], ByteTokenizer(), seq_len=64, eval_fraction=0.1)


def test_processes_read_disjoint_slices_of_the_same_global_batches():
  rows = text.pack([list(range(8, 8 + n)) for n in range(40)], seq_len=8, bos_id=BOS_ID, eos_id=EOS_ID)
  global_batch, steps = 8, 12
  whole = text.train_dataset(rows, global_batch, seed=3)
  parts = [text.train_dataset(rows, global_batch, seed=3, process_index=p, process_count=4) for p in range(4)]
  for step in range(steps):  # Crosses epoch boundaries (the data has ~20 rows).
    joined = np.concatenate([part[step]["inputs"] for part in parts])
    np.testing.assert_array_equal(joined, whole[step]["inputs"])
  epoch1 = np.concatenate([whole[s]["inputs"] for s in range(2)])
  epoch2 = np.concatenate([whole[s]["inputs"] for s in range(len(rows["inputs"]) // 8, len(rows["inputs"]) // 8 + 2)])
  assert not np.array_equal(epoch1, epoch2)  # Reshuffled each epoch.


def test_eval_batches_cover_every_row_once_with_padding():
  rows = text.pack([list(range(8, 30))] * 5, seq_len=8, bos_id=BOS_ID, eos_id=EOS_ID)
  n = len(rows["inputs"])
  batches = text.eval_batches(rows, global_batch=4)
  assert len(batches) == -(-n // 4)
  mask = np.concatenate([b["loss_mask"] for b in batches])
  assert mask.sum() == rows["loss_mask"].sum()
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:n], rows["inputs"])
