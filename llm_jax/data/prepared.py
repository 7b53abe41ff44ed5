"""Pretraining data at scale: tokenize and pack once into ArrayRecord shards, stream them with Grain.

Preparation (`prepare`, experiments/prepare_data.py) runs in two parallel phases over `num_workers` processes:
  1. tokenize: the inputs (text files, one document each; JSONL lines with a `text` field; Parquet `text`
     columns) are cut into chunks (groups of text files, line-aligned byte ranges of JSONL, Parquet row groups),
     each tokenized into `.work/chunk-NNNNN.{tokens,lengths}`: the chunk's framed documents (`[bos] ids <eos>`,
     as `text.pack_documents` frames them) as raw little-endian int32, and each document's framed length.
  2. pack: the chunks in order form the one token stream of the whole corpus, cut into rows exactly as
     `text.pack` cuts it (row r = stream[r·L, r·L + L + 1)). Shard s holds a contiguous range of rows, packed
     in blocks of bounded size from memory-mapped chunks. So the shards, read in order, ARE the in-memory
     packing of the same documents, whatever the number of shards or workers.
Every chunk and shard is written to a temporary name and renamed when complete, with a small JSON sidecar
(rows, bytes, sha256); the metadata file `prepared.json` is written last. A rerun with the same arguments skips
every finished chunk and shard (an interrupted preparation resumes), and a finished one does nothing.

A record is one packed row of seq_len L, as raw little-endian bytes (no pickle):
  tokens[L + 1]       the row's stream slice: inputs = tokens[:L], targets = tokens[1:]
  segment_ids[L + 1]  document piece of each of those tokens, from 1 in the row (0 = padding)
  positions[L]        position of each input in its document piece
with the dtypes named in the metadata (uint16 where the vocabulary / seq_len allow, else int32). loss_mask is
`seg[:L] == seg[1:]` (the target is in the input's document) and the input is not padding.

Reading (`PreparedData`, `train_stream`): the row count of each shard comes from the metadata (no file is opened
at start-up, only sizes are checked against it, so start-up is O(shards) and a truncated shard is one line);
rows are read through `ShardSource` (ArrayRecord range reads); memory grows only by each read shard's index (8 bytes
a row). The last `eval_fraction` of the rows is the validation split (as `text.build_packed_dataset`).
The global order of training rows is a seeded Grain shuffle of each dataset (reshuffled every epoch, repeated
forever), mixed by `MapDataset.mix` with the weights; global batch k is rows [p + k·B, p + (k+1)·B) of that
order, p the start position, and process i of P reads only its slice [i·B/P, (i+1)·B/P) of each. The iterator's
state is that one global row position, which is what checkpoints store: a run resumes with any number of
processes (or batch size) and continues the same order, no row repeated or skipped. With one dataset the order
is exactly `text.train_dataset`'s over the same rows, so a prepared run trains as the in-memory run does.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from llm_jax.errors import UserError
from llm_jax.files import write_atomically
from llm_jax.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

METADATA_FILE = "prepared.json"
FORMAT = "llm_jax.prepared/1"
WORK_DIR = ".work"
# One record per chunk: random access reads only that row. zstd: segment ids and positions compress ~2x overall
# at 2x the write speed of ArrayRecord's default (brotli).
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"
# Workers import this module: it must not import jax or grain (seconds per spawned worker), so these two are
# copies of `text.ROW_FIELDS` and `sequences.PAD_FILL` (tests check they are equal).
ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PAD_FILL = 0
# Training's default read threads (config.data.num_threads = -1): each random row is one storage read
# (ArrayRecord, group_size 1), so a cold read waits on the disk; threads overlap those waits on one core.
# (Grain's own ReadOptions default is 16 threads as well.) Measured in experiments/bench_data.py.
READ_THREADS = 16


def expand_paths(pattern: str, name: str):
  from llm_jax.data.text import expand_paths as expand  # noqa: PLC0415  (the parent only)

  return expand(pattern, name)


def is_prepared(path: str) -> bool:
  """Whether `path` is a directory of prepared data (it holds the metadata file)."""
  return bool(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def peak_rss_mb() -> float:
  """This process's peak resident memory (VmHWM) in MB; 0 where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


# ----------------------------------------------------------------------------------------------------------
# Inputs → chunks → documents.


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A unit of tokenizing work: `kind` "text" (whole files), "jsonl" (lines starting in [start, end) bytes of
  one file) or "parquet" (row group `start` of one file). `size`: bytes of input, for progress."""

  kind: str
  paths: tuple[str, ...]
  start: int = 0
  end: int = 0
  size: int = 0


def plan_chunks(pattern: str, chunk_bytes: int) -> list[Chunk]:
  """The inputs' chunks, in document order (files sorted per glob, globs in the order given)."""
  chunks: list[Chunk] = []
  texts: list[str] = []
  text_size = 0

  def flush_texts():
    nonlocal texts, text_size
    if texts:
      chunks.append(Chunk("text", tuple(texts), size=text_size))
    texts, text_size = [], 0

  for path in expand_paths(pattern, "--input"):
    size = os.path.getsize(path)
    if path.endswith((".jsonl", ".json")):
      flush_texts()
      for start in range(0, max(size, 1), chunk_bytes):
        chunks.append(Chunk("jsonl", (path,), start, min(start + chunk_bytes, size), min(chunk_bytes, size - start)))
    elif path.endswith(".parquet"):
      flush_texts()
      pq = _pyarrow_parquet()
      try:
        meta = pq.ParquetFile(path).metadata
      except Exception as e:  # noqa: BLE001  (pyarrow raises its own error types for a bad file)
        raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
      for group in range(meta.num_row_groups):
        chunks.append(Chunk("parquet", (path,), group, group + 1, meta.row_group(group).total_byte_size))
    else:
      texts.append(path)
      text_size += size
      if text_size >= chunk_bytes:
        flush_texts()
  flush_texts()
  return chunks


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq  # noqa: PLC0415  (only Parquet inputs need it)
  except ImportError:
    raise UserError("Parquet inputs need pyarrow: pip install pyarrow") from None
  return pq


def chunk_documents(chunk: Chunk, text_field: str = "text") -> Iterator[str]:
  """The chunk's non-empty documents in order (as `text.read_documents` reads the same files)."""
  if chunk.kind == "text":
    for path in chunk.paths:
      try:
        with open(path, encoding="utf-8") as f:
          doc = f.read()
      except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
      if doc:
        yield doc
  elif chunk.kind == "jsonl":
    yield from _jsonl_range(chunk.paths[0], chunk.start, chunk.end, text_field)
  elif chunk.kind == "parquet":
    path = chunk.paths[0]
    table = _pyarrow_parquet().ParquetFile(path)
    if text_field not in table.schema_arrow.names:
      raise UserError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
    for doc in table.read_row_group(chunk.start, columns=[text_field]).column(0).to_pylist():
      if doc:
        yield doc
  else:
    raise ValueError(chunk.kind)


def _jsonl_range(path: str, start: int, end: int, field: str) -> Iterator[str]:
  """Documents of the lines whose first byte lies in [start, end) (chunks split a file at any byte)."""
  with open(path, "rb") as f:
    if start > 0:
      f.seek(start - 1)
      if f.read(1) != b"\n":
        f.readline()  # The line that straddles `start` belongs to the previous chunk.
    while f.tell() < end:
      line_start = f.tell()
      line = f.readline()
      if not line:
        break
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text in the line at byte {line_start}") from None
      except json.JSONDecodeError as e:
        raise UserError(f"{path}: line at byte {line_start}: malformed JSON ({e.msg})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise UserError(f"{path}: line at byte {line_start}: expected an object with a string field {field!r}")
      if obj[field]:
        yield obj[field]


# ----------------------------------------------------------------------------------------------------------
# Record format.


@dataclasses.dataclass(frozen=True)
class RowFormat:
  seq_len: int
  token_dtype: str  # numpy dtype strings, little-endian: "<u2" or "<i4"
  index_dtype: str  # segment ids and positions

  @classmethod
  def for_(cls, seq_len: int, vocab_size: int) -> RowFormat:
    return cls(seq_len, "<u2" if vocab_size <= 65536 else "<i4", "<u2" if seq_len + 1 < 65536 else "<i4")

  @property
  def record_bytes(self) -> int:
    t, i = np.dtype(self.token_dtype).itemsize, np.dtype(self.index_dtype).itemsize
    return (self.seq_len + 1) * t + (2 * self.seq_len + 1) * i

  def encode(self, tokens_RT: np.ndarray, docs_RT: np.ndarray) -> list[bytes]:
    """Rows of the stream (tokens and global document ids, [rows, L + 1]) → one record each."""
    L = self.seq_len
    seg_RT = np.where(docs_RT > 0, docs_RT - docs_RT[:, :1] + 1, 0).astype(np.int32)
    column = np.arange(L, dtype=np.int32)
    starts = np.ones((len(seg_RT), L), bool)
    starts[:, 1:] = seg_RT[:, 1:L] != seg_RT[:, : L - 1]
    positions_RL = column - np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    parts = [tokens_RT.astype(self.token_dtype), seg_RT.astype(self.index_dtype), positions_RL.astype(self.index_dtype)]
    rows_RB = np.concatenate([x.view(np.uint8).reshape(len(x), -1) for x in parts], axis=1)
    return [row.tobytes() for row in rows_RB]

  def decode(self, record: bytes) -> dict[str, np.ndarray]:
    """One record → the row's ROW_FIELDS, as `text.pack` gives them."""
    return {k: v[0] for k, v in self.decode_batch([record]).items()}

  def decode_batch(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Records → [len(records), seq_len] arrays of ROW_FIELDS (the rows stacked): one buffer for the batch and
    one conversion per field, instead of three copies per row and a stack per field (the reader's CPU cost)."""
    for record in records:
      if len(record) != self.record_bytes:
        raise UserError(f"prepared data: a record of {len(record)} bytes where {self.record_bytes} are expected")
    L = self.seq_len
    t_end = (L + 1) * np.dtype(self.token_dtype).itemsize
    s_end = t_end + (L + 1) * np.dtype(self.index_dtype).itemsize
    rows_RB = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), self.record_bytes)
    tokens_RT = rows_RB[:, :t_end].view(self.token_dtype)
    seg_RT = rows_RB[:, t_end:s_end].view(self.index_dtype)
    return dict(
      inputs=tokens_RT[:, :L].astype(np.int32),
      targets=tokens_RT[:, 1:].astype(np.int32),
      segment_ids=seg_RT[:, :L].astype(np.int32),
      positions=rows_RB[:, s_end:].view(self.index_dtype).astype(np.int32),
      loss_mask=((seg_RT[:, :L] == seg_RT[:, 1:]) & (seg_RT[:, :L] > 0)).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------
# Preparation.


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode(tokenizer: Tokenizer, docs: list[str]) -> list[np.ndarray]:
  if isinstance(tokenizer, ByteTokenizer):  # The bytes themselves: no Python list per byte.
    return [np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) + tokenizer._offset for d in docs]
  return [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(docs)]


def _tokenize_chunk(task: tuple[int, Chunk, str, str]) -> dict:
  """Phase 1, in a worker: one chunk → `chunk-NNNNN.tokens` / `.lengths` and a JSON sidecar (atomic)."""
  index, chunk, work, text_field = task
  tokenizer = _worker_tokenizer
  head = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
  base = os.path.join(work, f"chunk-{index:05d}")
  num_docs = num_tokens = stream = 0
  with open(base + ".tokens.tmp", "wb") as ft, open(base + ".lengths.tmp", "wb") as fl:
    batch: list[str] = []

    def flush():
      nonlocal num_docs, num_tokens, stream
      ids = _encode(tokenizer, batch)
      framed = [np.concatenate([head, t, [tokenizer.eos_id]]).astype("<i4") for t in ids]
      if framed:
        ft.write(np.concatenate(framed).tobytes())
        fl.write(np.array([len(f) for f in framed], "<i8").tobytes())
      num_docs += len(framed)
      num_tokens += sum(len(t) for t in ids)
      stream += sum(len(f) for f in framed)
      batch.clear()

    size = 0
    for doc in chunk_documents(chunk, text_field):
      batch.append(doc)
      size += len(doc)
      if size > 4 << 20:  # Bounded memory: tokenize a few MB at a time.
        flush()
        size = 0
    flush()
  os.replace(base + ".tokens.tmp", base + ".tokens")
  os.replace(base + ".lengths.tmp", base + ".lengths")
  info = dict(documents=num_docs, tokens=num_tokens, stream=stream, bytes=chunk.size)
  write_atomically(base + ".json", json.dumps(info))
  return {**info, "peak_rss_mb": peak_rss_mb()}


class _Stream:
  """Random access to the corpus's token stream and each token's global document id (1, 2, ...; 0 = padding
  past the end), from the memory-mapped chunks."""

  def __init__(self, work: str, infos: list[dict]):
    self.work, self.infos = work, infos
    self.token_starts = np.cumsum([0] + [i["stream"] for i in infos])
    self.doc_starts = np.cumsum([0] + [i["documents"] for i in infos])
    self.length = int(self.token_starts[-1])
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    if c not in self._cache:
      self._cache.clear()  # One chunk at a time: memory bounded by the chunk size.
      base = os.path.join(self.work, f"chunk-{c:05d}")
      tokens = np.memmap(base + ".tokens", "<i4", "r") if self.infos[c]["stream"] else np.zeros(0, "<i4")
      lengths = np.fromfile(base + ".lengths", "<i8")
      self._cache[c] = (tokens, np.cumsum(lengths))
    return self._cache[c]

  def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full(stop - start, PAD_FILL, np.int32)
    docs = np.zeros(stop - start, np.int64)
    pos = start
    while pos < min(stop, self.length):
      c = int(np.searchsorted(self.token_starts, pos, side="right")) - 1
      chunk_tokens, ends = self._chunk(c)
      local = pos - int(self.token_starts[c])
      take = min(stop, int(self.token_starts[c + 1])) - pos
      tokens[pos - start : pos - start + take] = chunk_tokens[local : local + take]
      docs[pos - start : pos - start + take] = (
        self.doc_starts[c] + 1 + np.searchsorted(ends, np.arange(local, local + take), side="right")
      )
      pos += take
    return tokens, docs


def _shard_name(s: int, num_shards: int) -> str:
  return f"rows-{s:05d}-of-{num_shards:05d}.array_record"


def _write_shard(task: tuple[int, int, int, int, str, str, list[dict], RowFormat, int]) -> dict:
  """Phase 2, in a worker: rows [first, stop) of the stream → one ArrayRecord shard + its sidecar (atomic)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

  s, num_shards, first, stop, output, work, infos, fmt, block_rows = task
  stream = _Stream(work, infos)
  path = os.path.join(output, _shard_name(s, num_shards))
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
  L = fmt.seq_len
  for r0 in range(first, stop, block_rows):
    r1 = min(stop, r0 + block_rows)
    tokens, docs = stream.read(r0 * L, r1 * L + 1)
    # Row r is stream[r·L, r·L + L + 1): overlapping windows, one view, no copy.
    rows_t = np.lib.stride_tricks.sliding_window_view(tokens, L + 1)[::L]
    rows_d = np.lib.stride_tricks.sliding_window_view(docs, L + 1)[::L]
    for record in fmt.encode(rows_t, rows_d):
      writer.write(record)
  writer.close()
  digest = _sha256(tmp)
  os.replace(tmp, path)
  info = dict(file=os.path.basename(path), rows=stop - first, bytes=os.path.getsize(path), sha256=digest)
  write_atomically(os.path.join(work, f"shard-{s:05d}.json"), json.dumps(info))
  return {**info, "peak_rss_mb": peak_rss_mb()}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


class Progress:
  """One line per update on stderr: done / total units, rate and ETA."""

  def __init__(self, what: str, total: float, unit: str, scale: float = 1.0, every: float = 2.0):
    self.what, self.total, self.unit, self.scale, self.every = what, total, unit, scale, every
    self.done, self.start, self.last = 0.0, time.perf_counter(), 0.0
    self.tty = sys.stderr.isatty()

  def add(self, amount: float, final: bool = False) -> None:
    self.done += amount
    now = time.perf_counter()
    if not final and now - self.last < self.every:
      return
    self.last = now
    elapsed = now - self.start
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    line = (
      f"{self.what}: {self.done / self.scale:,.1f}/{self.total / self.scale:,.1f} {self.unit} "
      f"({100 * self.done / max(self.total, 1):.0f}%)  {rate / self.scale:,.2f} {self.unit}/s  "
      f"ETA {eta:,.0f} s  elapsed {elapsed:,.0f} s"
    )
    print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


@dataclasses.dataclass
class PrepareResult:
  metadata: dict
  tokenize_seconds: float
  pack_seconds: float
  chunks_done: int  # Chunks tokenized by this call (not skipped).
  shards_done: int  # Shards written by this call (not skipped).
  peak_rss_mb: float  # Max over this process and every worker.
  worker_peak_rss_mb: float


def _make_tokenizer(kind: str, pattern: str, vocab_size: int, sample_bytes: int, chunk_bytes: int) -> Tokenizer:
  if kind == "char":
    return ByteTokenizer()
  if kind == "spm":  # Trained on a sample: the first `sample_bytes` of documents, in order.
    sample, size = [], 0
    for chunk in plan_chunks(pattern, chunk_bytes):
      for doc in chunk_documents(chunk):
        sample.append(doc[: sample_bytes - size])
        size += len(sample[-1])
        if size >= sample_bytes:
          break
      if size >= sample_bytes:
        break
    if not sample:
      raise UserError(f"--input={pattern!r}: the corpus is empty")
    return train_sentencepiece(sample, vocab_size)
  if os.path.isdir(kind):
    return load_tokenizer(kind)
  raise UserError(f"--tokenizer={kind!r}: give 'char', 'spm' or a workdir that holds a tokenizer")


def prepare(
  pattern: str,
  output: str,
  tokenizer: str,
  *,
  seq_len: int,
  num_shards: int = 8,
  num_workers: int = 1,
  vocab_size: int = 2048,
  spm_sample_mb: float = 20.0,
  chunk_mb: float = 64.0,
  block_rows: int = 1024,
  text_field: str = "text",
  keep_work: bool = False,
) -> PrepareResult:
  """Tokenizes and packs `pattern`'s documents into `output` (module docstring); resumes an interrupted run.

  `tokenizer`: "char", "spm" (trained on the first `spm_sample_mb` MB of text, `vocab_size` pieces) or a
  workdir (or prepared directory) that holds a tokenizer."""
  if seq_len < 1 or num_shards < 1 or num_workers < 1 or block_rows < 1 or chunk_mb <= 0:
    raise UserError("--seq_len, --num_shards, --num_workers must be >= 1 and --chunk_mb > 0")
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError(f"--output={output}: exists and is not a directory")
  chunk_bytes = max(1, int(chunk_mb * 2**20))
  inputs = expand_paths(pattern, "--input")
  work = os.path.join(output, WORK_DIR)
  if is_prepared(output):
    metadata = read_metadata(output)
    _check_same_request(metadata["request"], pattern, inputs, tokenizer, seq_len, num_shards, output)
    print(f"{output}: already prepared ({metadata['num_rows']:,} rows); nothing to do", file=sys.stderr)
    return PrepareResult(metadata, 0.0, 0.0, 0, 0, peak_rss_mb(), 0.0)
  os.makedirs(work, exist_ok=True)
  request = dict(inputs=inputs, input_bytes=[os.path.getsize(p) for p in inputs], tokenizer=tokenizer)
  request.update(seq_len=seq_len, num_shards=num_shards, chunk_bytes=chunk_bytes, text_field=text_field)
  request_path = os.path.join(work, "request.json")
  if os.path.exists(request_path):  # Resuming: the same request, and the tokenizer chosen the first time.
    with open(request_path) as f:
      previous = json.load(f)
    _check_same_request(previous, pattern, inputs, tokenizer, seq_len, num_shards, output, chunk_bytes)
    tok = load_tokenizer(output)
  else:
    tok = _make_tokenizer(tokenizer, pattern, vocab_size, int(spm_sample_mb * 2**20), chunk_bytes)
    tok.save(output)
    write_atomically(request_path, json.dumps(request, indent=1))
  fmt = RowFormat.for_(seq_len, tok.vocab_size)

  chunks = plan_chunks(pattern, chunk_bytes)
  ctx = multiprocessing.get_context("spawn")  # Workers start clean (no inherited threads or jax state).
  pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(output,))
  try:
    worker_rss = 0.0
    t0 = time.perf_counter()
    todo = [i for i in range(len(chunks)) if not os.path.exists(os.path.join(work, f"chunk-{i:05d}.json"))]
    chunks_done = len(todo)
    progress = Progress("tokenize", sum(chunks[i].size for i in todo), "MB", 2**20)
    for info in pool.imap_unordered(_tokenize_chunk, [(i, chunks[i], work, text_field) for i in todo]):
      worker_rss = max(worker_rss, info["peak_rss_mb"])
      progress.add(info["bytes"])
    if todo:
      progress.add(0, final=True)
    tokenize_seconds = time.perf_counter() - t0
    infos = []
    for i in range(len(chunks)):
      with open(os.path.join(work, f"chunk-{i:05d}.json")) as f:
        infos.append(json.load(f))

    stream_length = sum(i["stream"] for i in infos)
    num_documents = sum(i["documents"] for i in infos)
    if num_documents == 0:
      raise UserError(f"--input={pattern!r}: the corpus is empty")
    num_rows = -(-(stream_length - 1) // seq_len)  # As text.pack: targets shifted by one, last row padded.
    bounds = [num_rows * s // num_shards for s in range(num_shards + 1)]
    t1 = time.perf_counter()
    todo = [s for s in range(num_shards) if not _shard_done(output, work, s, num_shards)]
    progress = Progress("pack", sum(bounds[s + 1] - bounds[s] for s in todo), "k rows", 1000)
    tasks = [(s, num_shards, bounds[s], bounds[s + 1], output, work, infos, fmt, block_rows) for s in todo]
    for info in pool.imap_unordered(_write_shard, tasks):
      worker_rss = max(worker_rss, info["peak_rss_mb"])
      progress.add(info["rows"])
    if todo:
      progress.add(0, final=True)
  finally:
    pool.terminate()
  pack_seconds = time.perf_counter() - t1
  shards = []
  for s in range(num_shards):
    with open(os.path.join(work, f"shard-{s:05d}.json")) as f:
      shards.append(json.load(f))
  metadata = dict(
    format=FORMAT,
    seq_len=seq_len,
    tokenizer=dict(kind=tok.kind, fingerprint=tok.fingerprint(), vocab_size=tok.vocab_size),
    token_dtype=fmt.token_dtype,
    index_dtype=fmt.index_dtype,
    record_bytes=fmt.record_bytes,
    num_documents=num_documents,
    num_tokens=sum(i["tokens"] for i in infos),
    num_stream_tokens=stream_length,
    num_rows=num_rows,
    input_bytes=sum(request["input_bytes"]),
    shards=shards,
    request=request,
  )
  write_atomically(os.path.join(output, METADATA_FILE), json.dumps(metadata, indent=1))  # Last: complete.
  if not keep_work:
    shutil.rmtree(work, ignore_errors=True)
  return PrepareResult(
    metadata, tokenize_seconds, pack_seconds, chunks_done, len(todo), max(peak_rss_mb(), worker_rss), worker_rss
  )


def _shard_done(output: str, work: str, s: int, num_shards: int) -> bool:
  sidecar = os.path.join(work, f"shard-{s:05d}.json")
  if not os.path.exists(sidecar):
    return False
  with open(sidecar) as f:
    info = json.load(f)
  path = os.path.join(output, _shard_name(s, num_shards))
  return os.path.exists(path) and os.path.getsize(path) == info["bytes"]


def _check_same_request(previous, pattern, inputs, tokenizer, seq_len, num_shards, output, chunk_bytes=None):
  now = dict(inputs=inputs, tokenizer=tokenizer, seq_len=seq_len, num_shards=num_shards)
  if chunk_bytes is not None:
    now["chunk_bytes"] = chunk_bytes
  changed = sorted(k for k, v in now.items() if previous.get(k) != v)
  if changed:
    raise UserError(
      f"--output={output} holds a preparation with different {', '.join(changed)} "
      f"(was {', '.join(f'{k}={previous.get(k)!r}' for k in changed)}): use a new --output or the same flags"
    )


# ----------------------------------------------------------------------------------------------------------
# Reading.


def read_metadata(path: str) -> dict:
  file = os.path.join(path, METADATA_FILE)
  try:
    with open(file) as f:
      metadata = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: not prepared data (no {METADATA_FILE}; run experiments/prepare_data.py)") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    raise UserError(f"{file}: not {FORMAT} metadata")
  return metadata


class PreparedData:
  """One prepared directory: checked against its metadata (O(shards), no file read), rows by global index."""

  def __init__(self, path: str):
    self.path = path
    self.metadata = m = read_metadata(path)
    try:
      self.format = RowFormat(m["seq_len"], m["token_dtype"], m["index_dtype"])
      shards = [(s["file"], int(s["rows"]), int(s["bytes"])) for s in m["shards"]]
      self.num_rows = int(m["num_rows"])
      fingerprint = m["tokenizer"]["fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f"{os.path.join(path, METADATA_FILE)}: malformed ({type(e).__name__}: {e})") from None
    if sum(rows for _, rows, _ in shards) != self.num_rows:
      raise UserError(f"{os.path.join(path, METADATA_FILE)}: shard rows do not add up to num_rows={self.num_rows}")
    for file, _, size in shards:
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise UserError(f"prepared data {path}: shard {file} is missing")
      if os.path.getsize(full) != size:
        raise UserError(
          f"prepared data {path}: shard {file} has {os.path.getsize(full):,} bytes where the metadata says "
          f"{size:,} (truncated or replaced): prepare it again"
        )
    self.tokenizer = load_tokenizer(path)
    if self.tokenizer.fingerprint() != fingerprint:
      raise UserError(f"prepared data {path}: its tokenizer files do not match the metadata's fingerprint")
    # The row counts come from the metadata, so no shard is opened until it is read.
    self._shards = [(os.path.join(path, file), rows) for file, rows, _ in shards if rows]
    self._source = None

  @property
  def seq_len(self) -> int:
    return self.format.seq_len

  @property
  def source(self):
    """The records as a Grain random-access data source (each shard opened on first use)."""
    if self._source is None:
      self._source = ShardSource(self._shards)
    return self._source

  def row(self, i: int) -> dict[str, np.ndarray]:
    return self.format.decode(self.source[i])

  def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) stacked: [n, seq_len] arrays of ROW_FIELDS."""
    return self.format.decode_batch(self.source.__getitems__(range(start, stop)) if stop > start else [])

  def split(self, eval_fraction: float, has_eval_path: bool = False) -> tuple[int, int]:
    """(train rows, eval rows): the last `eval_fraction` of the rows, as `text.build_packed_dataset`."""
    n = self.num_rows
    if has_eval_path:
      return n, 0
    num_eval = int(round(n * eval_fraction))
    if n < 2 or (eval_fraction > 0 and num_eval == 0):
      num_eval = 1
    if n - num_eval < 1:
      raise UserError(f"prepared data {self.path}: {n} rows; need at least 2: one to train on and one to evaluate")
    return n - num_eval, num_eval


class ShardSource:
  """Records by global index over ArrayRecord shards [(path, rows)]: Grain's random-access source protocol.

  Not `grain.sources.ArrayRecordDataSource`: it reads each record with ArrayRecord's by-index call
  (`reader.read([i])`), whose CPU cost grows with the records in the shard (measured 0.72 ms a record in a shard of
  121k records, 0.04 ms in one of 3k: the 2 GB corpus read 10x slower than the 0.2 GB one, warm or cold); the range
  call `reader.read(i, i + 1)` costs 0.02 ms in both. Each reader keeps its shard's index in memory (8 bytes a row;
  "index_storage_option:offloaded" re-reads it on every access: measured 0.03 M tokens/s on 2 GB)."""

  def __init__(self, shards: Sequence[tuple[str, int]]):
    self.paths = [path for path, _ in shards]
    self.starts = np.cumsum([0] + [rows for _, rows in shards]).tolist()
    self._readers: list = [None] * len(shards)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.starts[-1]

  def _reader(self, s: int):
    if self._readers[s] is None:
      with self._lock:  # Grain's read threads share one (thread-safe) reader per shard.
        if self._readers[s] is None:
          from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

          self._readers[s] = ArrayRecordReader(self.paths[s], "readahead_buffer_size:0")
    return self._readers[s]

  def __getitem__(self, index) -> bytes:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    s = bisect.bisect_right(self.starts, i) - 1
    local = i - self.starts[s]
    return self._reader(s).read(local, local + 1)[0]

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"ShardSource({len(self.paths)} shards, {len(self)} records)"

  def __getstate__(self):  # Readers and the lock do not pickle (Grain's worker processes reopen the shards).
    return {"paths": self.paths, "starts": self.starts}

  def __setstate__(self, state):
    self.paths, self.starts = state["paths"], state["starts"]
    self._readers, self._lock = [None] * len(self.paths), threading.Lock()


def verify(path: str) -> None:
  """Checks every shard's sha256 against the metadata (reads the whole corpus: not done at training start-up)."""
  data = PreparedData(path)
  for shard in data.metadata["shards"]:
    if _sha256(os.path.join(path, shard["file"])) != shard["sha256"]:
      raise UserError(f"prepared data {path}: shard {shard['file']} does not match its checksum")


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """ "DIR:WEIGHT,DIR:WEIGHT" (a DIR alone weighs 1) → [(dir, weight)]."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    path, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
    try:
      w = float(weight)
    except ValueError:
      raise UserError(f"data.mixture: {part!r} is not DIR:WEIGHT") from None
    if not w > 0:
      raise UserError(f"data.mixture: the weight of {path} must be > 0")
    out.append((path, w))
  if not out:
    raise UserError(f"data.mixture={spec!r}: no datasets")
  return out


def component_seed(seed: int, index: int) -> int:
  """Dataset `index` of a mixture is shuffled with this seed (index 0: the run's seed itself)."""
  return (seed + 1_000_003 * index) % 2**32


def global_order(datasets: Sequence[PreparedData], train_rows: Sequence[int], weights: Sequence[float], seed: int):
  """The endless global order of training rows as a grain MapDataset of records (module docstring); the datasets
  share one RowFormat (`open_datasets` checks the tokenizer and seq_len), which decodes them a batch at a time."""
  import grain  # noqa: PLC0415

  parts = []
  for i, (data, n) in enumerate(zip(datasets, train_rows)):
    parts.append(grain.MapDataset.source(data.source)[:n].shuffle(seed=component_seed(seed, i)).repeat(None))
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))


class GlobalPositionIterator:
  """This process's share of each global batch, from global row `position` on; its state is that position."""

  def __init__(
    self,
    order,
    row_format: RowFormat,
    global_batch: int,
    process_index: int,
    process_count: int,
    read_options,
    position=0,
  ):
    self.order, self.row_format, self.global_batch, self.read_options = order, row_format, global_batch, read_options
    self.process_index, self.process_count = process_index, process_count
    self._iterator = None
    self.set_global_state({"global_row": position})

  def _dataset(self, position: int):
    local = self.global_batch // self.process_count
    batches = self.order[position:].batch(local, drop_remainder=True, batch_fn=self.row_format.decode_batch)
    return batches[self.process_index :: self.process_count]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.position += self.global_batch
    return batch

  def global_state(self) -> dict:
    return {"global_row": int(self.position)}

  def set_global_state(self, state: dict) -> None:
    self.close()
    self.position = int(state["global_row"])
    self._iterator = iter(self._dataset(self.position).to_iter_dataset(self.read_options))

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


@dataclasses.dataclass
class PreparedStream:
  """Training data from prepared directories: what `loop.train` takes in place of a grain MapDataset."""

  datasets: list[PreparedData]
  weights: list[float]
  train_rows: list[int]
  global_batch: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def order(self):
    if any(d.format != self.datasets[0].format for d in self.datasets):
      raise UserError("data.mixture: the datasets' record formats differ (tokenizer or seq_len)")
    return global_order(self.datasets, self.train_rows, self.weights, self.seed)

  def example(self) -> dict[str, np.ndarray]:
    """One local batch's shapes (for the batch shardings), without starting an iterator."""
    row = self.datasets[0].row(0)
    local = self.global_batch // self.process_count
    return {k: np.stack([v] * local) for k, v in row.items()}

  def iterator(self, read_options, position: int = 0) -> GlobalPositionIterator:
    return GlobalPositionIterator(
      self.order(),
      self.datasets[0].format,
      self.global_batch,
      self.process_index,
      self.process_count,
      read_options,
      position,
    )


def open_datasets(spec_path: str, mixture: str) -> tuple[list[PreparedData], list[float]]:
  """`data.path` (one prepared dir) or `data.mixture` → datasets (same tokenizer and seq_len) and weights."""
  if mixture:
    pairs = parse_mixture(mixture)
  else:
    pairs = [(spec_path, 1.0)]
  datasets = [PreparedData(p) for p, _ in pairs]
  first = datasets[0]
  for d in datasets[1:]:
    if d.metadata["tokenizer"]["fingerprint"] != first.metadata["tokenizer"]["fingerprint"]:
      raise UserError(f"data.mixture: {d.path} and {first.path} were prepared with different tokenizers")
    if d.seq_len != first.seq_len:
      raise UserError(f"data.mixture: {d.path} has seq_len={d.seq_len} and {first.path} seq_len={first.seq_len}")
  return datasets, [w for _, w in pairs]
