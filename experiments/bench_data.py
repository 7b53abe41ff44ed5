"""Benchmark of prepared pretraining data (llm_jax/data/prepared.py): preparation MB/s per worker and the
1 → 2 worker speed-up, reader tokens/s on one core, and peak RSS (VmHWM of the parent and of every worker) while
preparing and while reading, on a generated corpus (random words, JSONL) in --tmp (deleted afterwards).

  python experiments/bench_data.py --gb=0.2            # ~3 min on a 2-core CPU
  python experiments/bench_data.py --gb=2 --workers=2  # the size comparison (README: Pretraining data at scale)

Reader target: >= 1 M tokens/s on one core. One v5p host (4 chips) training llama_7b at 50 % MFU consumes
about 4 chips x 5k tokens/s = 20k tokens/s, so 1 M tokens/s is 50x what a host needs.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_float("gb", 0.2, "GB of generated text.")
flags.DEFINE_string("workers", "1,2", "Worker counts to time preparation with (the speed-up is from the first).")
flags.DEFINE_integer("seq_len", 1024, "Row length.")
flags.DEFINE_string("tokenizer", "spm", "spm (trained on a 4 MB sample) or char (bytes: no tokenizer cost).")
flags.DEFINE_integer("vocab_size", 4096, "For spm.")
flags.DEFINE_float("chunk_mb", 8.0, "Input MB per tokenizing task.")
flags.DEFINE_integer("num_shards", 16, "Shards.")
flags.DEFINE_integer("read_batches", 400, "Batches of 8 rows to time the reader on.")
flags.DEFINE_string("tmp", "/tmp/llm_jax_bench_data", "Scratch directory (deleted at the end).")
flags.DEFINE_string("mode", "bench", "bench | read (internal: the reader, in its own process for its own RSS).")
flags.DEFINE_string("data", "", "For --mode=read.")
FLAGS = flags.FLAGS


def generate(path: str, gb: float, seed: int = 0) -> int:
  """JSONL documents of random words (a Zipf-like vocabulary of 3000 made-up words): fast, numpy-only."""
  import numpy as np

  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(3000)])
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  target, written = int(gb * 1e9), 0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    while written < target:
      ids = rng.choice(len(words), size=200_000, p=p)
      text = " ".join(words[ids])
      # ~1.5 KB documents
      parts = text.split(" ")
      docs = [" ".join(parts[i : i + 250]) for i in range(0, len(parts), 250)]
      block = "".join('{"text": "' + d + '"}\n' for d in docs)  # Lowercase words: nothing to escape.
      f.write(block)
      written += len(block)
  return written


def read_mode() -> None:
  """Reads --read_batches global batches of 8 through the training stream on one thread; prints JSON."""
  import grain

  from llm_jax.data import prepared

  t0 = time.perf_counter()
  data = prepared.PreparedData(FLAGS.data)
  n_train, _ = data.split(0.0005)
  stream = prepared.PreparedStream([data], [1.0], [n_train], 8, 0)
  it = stream.iterator(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  next(it)
  startup = time.perf_counter() - t0
  t1 = time.perf_counter()
  tokens = 0
  for _ in range(FLAGS.read_batches):
    tokens += next(it)["inputs"].size
  seconds = time.perf_counter() - t1
  it.close()
  print(
    json.dumps(
      dict(
        tokens_per_second=tokens / seconds,
        startup_seconds=startup,
        peak_rss_mb=prepared.peak_rss_mb(),
        rows=data.num_rows,
      )
    )
  )


def main(argv):
  del argv
  if FLAGS.mode == "read":
    return read_mode()
  from llm_jax.data import prepared

  os.makedirs(FLAGS.tmp, exist_ok=True)
  corpus = os.path.join(FLAGS.tmp, "corpus", "c.jsonl")
  t = time.perf_counter()
  size = generate(corpus, FLAGS.gb)
  print(f"generated {size / 1e9:.2f} GB of JSONL in {time.perf_counter() - t:.0f} s", flush=True)
  # The tokenizer once (trained on a 4 MB sample), shared by every timed preparation.
  tok_dir = os.path.join(FLAGS.tmp, "tok")
  t = time.perf_counter()
  tok = prepared._make_tokenizer(FLAGS.tokenizer, corpus, FLAGS.vocab_size, 4 << 20, 64 << 20)
  os.makedirs(tok_dir, exist_ok=True)
  tok.save(tok_dir)
  print(f"{FLAGS.tokenizer} tokenizer ({tok.vocab_size}) made in {time.perf_counter() - t:.0f} s", flush=True)

  rows = []
  first_rate = None
  for workers in [int(w) for w in FLAGS.workers.split(",")]:
    out = os.path.join(FLAGS.tmp, f"prepared_{workers}")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    result = prepared.prepare(
      corpus,
      out,
      tok_dir,
      seq_len=FLAGS.seq_len,
      num_shards=FLAGS.num_shards,
      num_workers=workers,
      chunk_mb=FLAGS.chunk_mb,
    )
    seconds = time.perf_counter() - t
    rate = size / 2**20 / seconds
    first_rate = first_rate or rate
    m = result.metadata
    rows.append(
      dict(
        workers=workers,
        seconds=seconds,
        mb_per_s=rate,
        mb_per_s_per_worker=rate / workers,
        speedup=rate / first_rate,
        tokenize_s=result.tokenize_seconds,
        pack_s=result.pack_seconds,
        parent_rss_mb=prepared.peak_rss_mb(),
        worker_rss_mb=result.worker_peak_rss_mb,
        tokens=m["num_tokens"],
        shard_gb=sum(s["bytes"] for s in m["shards"]) / 1e9,
      )
    )
    print(json.dumps(rows[-1]), flush=True)
  data = os.path.join(FLAGS.tmp, f"prepared_{FLAGS.workers.split(',')[-1]}")
  proc = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      "--mode=read",
      f"--data={data}",
      f"--read_batches={FLAGS.read_batches}",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  reader = json.loads(proc.stdout.strip().splitlines()[-1])
  print(
    f"\ncorpus {size / 1e9:.2f} GB, {rows[-1]['tokens']:,} tokens ({FLAGS.tokenizer} {tok.vocab_size}), "
    f"seq_len {FLAGS.seq_len}"
  )
  print("workers  seconds  MB/s  MB/s/worker  speed-up  tokenize s  pack s  peak RSS parent/worker MB  shards GB")
  for r in rows:
    print(
      f"{r['workers']:>7}  {r['seconds']:>7.1f}  {r['mb_per_s']:>4.1f}  {r['mb_per_s_per_worker']:>11.1f}  "
      f"{r['speedup']:>8.2f}  {r['tokenize_s']:>10.1f}  {r['pack_s']:>6.1f}  "
      f"{r['parent_rss_mb']:>12.0f} / {r['worker_rss_mb']:<10.0f}  {r['shard_gb']:.2f}"
    )
  print(
    f"reader (1 thread): {reader['tokens_per_second'] / 1e6:.2f} M tokens/s, "
    f"start-up {reader['startup_seconds']:.2f} s, "
    f"peak RSS {reader['peak_rss_mb']:.0f} MB over {reader['rows']:,} rows "
    f"({reader['tokens_per_second'] / 20e3:.0f}x a v5p host's 20k tokens/s for llama_7b at 50 % MFU)"
  )
  shutil.rmtree(FLAGS.tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
