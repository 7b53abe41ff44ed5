"""Benchmark of prepared pretraining data (llm_jax/data/prepared.py): preparation MB/s per worker and the
1 → 2 worker speed-up, reader tokens/s on one core, and peak RSS (VmHWM of the parent and of every worker) while
preparing and while reading, on a generated corpus (random words, JSONL) in --tmp (deleted afterwards unless --keep).

  python experiments/bench_data.py --gb=0.2 --tokenizer=char          # ~3 min on a quiet 2-core CPU
  python experiments/bench_data.py --gb=2 --workers=2 --tokenizer=char --tmp=/tmp/pd2 --keep   # ~30 min, shared box
  python experiments/bench_data.py --mode=read --data=/tmp/pd2/prepared_2 --cache=cold --read_threads=16

The reader (`--mode=read`, any prepared directory) runs pinned to ONE core (every thread), after dropping
(`--cache=cold`) or loading (`warm`) the shards' page cache, and prints tokens/s of wall time and of CPU time (what a
core of its own gives: the box's other jobs share the pinned core), ms a row, storage KB and read syscalls a row
(/proc/self/io). Measured on the 2 GB corpus (4.4 GB of shards, 16 x 121k rows), load average 8: warm 9.6 M
tokens/s with 0 threads, 10.6 M with 16; cold 3.5 M with 0 threads, 7.0 M with 16 (README: Pretraining data at
scale). Target: >= 1 M tokens/s on one core. One v5p host (4 chips) training llama_7b at 50 % MFU consumes about
4 chips x 5k tokens/s = 20k tokens/s, so 1 M tokens/s is 50x what a host needs.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from llm_jax.errors import UserError

flags.DEFINE_float("gb", 0.2, "GB of generated text.")
flags.DEFINE_string("workers", "1,2", "Worker counts to time preparation with (the speed-up is from the first).")
flags.DEFINE_integer("seq_len", 1024, "Row length.")
flags.DEFINE_string("tokenizer", "spm", "spm (trained on a 4 MB sample) or char (bytes: no tokenizer cost).")
flags.DEFINE_integer("vocab_size", 4096, "For spm.")
flags.DEFINE_float("chunk_mb", 8.0, "Input MB per tokenizing task.")
flags.DEFINE_integer("num_shards", 16, "Shards.")
flags.DEFINE_integer("read_batches", 400, "Batches of 8 rows to time the reader on.")
flags.DEFINE_integer("warmup_batches", 50, "Batches read before the timing (opening every shard).")
flags.DEFINE_string("tmp", "/tmp/llm_jax_bench_data", "Scratch directory (deleted at the end unless --keep).")
flags.DEFINE_bool("keep", False, "Keep --tmp (the corpus and prepared_N/) to rerun the reader with --mode=read.")
flags.DEFINE_string("mode", "bench", "bench | read: only the reader, on --data (a prepared directory).")
flags.DEFINE_string("data", "", "For --mode=read: a prepared directory (experiments/prepare_data.py).")
flags.DEFINE_integer(
  "read_threads", 16, "Reader: grain ReadOptions num_threads (0 = in the main thread); --mode=bench times 0 and this."
)
flags.DEFINE_integer("prefetch", 16, "Reader: grain ReadOptions prefetch_buffer_size, with --read_threads > 0.")
flags.DEFINE_integer("core", -1, "Reader: the one core every reader thread is pinned to (-1: the last allowed).")
flags.DEFINE_enum(
  "cache", "as_is", ["cold", "warm", "as_is"], "Reader: shards' page cache: dropped, read once, untouched."
)
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


def pin_to_one_core(core: int) -> int:
  """Pins every thread of this process (and the threads it starts later) to one core; returns that core."""
  allowed = sorted(os.sched_getaffinity(0))
  core = allowed[-1] if core < 0 else core
  if core not in allowed:
    raise UserError(f"--core={core}: not one of this process's cores {allowed}")
  for tid in os.listdir("/proc/self/task"):
    os.sched_setaffinity(int(tid), {core})
  return core


def page_cache(paths: list[str], action: str) -> float:
  """Fraction of the files' bytes resident in the page cache, after `action`: "cold" drops them
  (POSIX_FADV_DONTNEED: clean pages, no root needed), "warm" reads them once, "as_is" does nothing."""
  for path in paths:
    if action == "cold":
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)  # Dirty pages (a shard just written) are not dropped.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)
    elif action == "warm":
      with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
          pass
  if not shutil.which("fincore"):
    return float("nan")
  out = subprocess.run(
    ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  resident = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
  return sum(r for r, _ in resident) / max(1, sum(s for _, s in resident))


def proc_io() -> dict[str, int]:
  """This process's I/O counters: read_bytes (from storage, not the page cache), syscr (read syscalls)."""
  with open("/proc/self/io") as f:
    return {k: int(v) for k, v in (line.split(": ") for line in f)}


def read_mode() -> None:
  """Reads --read_batches global batches of 8 rows through the training stream (global shuffle) on ONE core
  with --read_threads Grain threads, the shards' page cache as --cache says; prints one JSON line."""
  core = pin_to_one_core(FLAGS.core)
  import grain

  from llm_jax.data import prepared

  data = prepared.PreparedData(FLAGS.data)
  shards = [os.path.join(FLAGS.data, s["file"]) for s in data.metadata["shards"]]
  resident = page_cache(shards, FLAGS.cache)
  io0 = proc_io()
  t0 = time.perf_counter()
  data = prepared.PreparedData(FLAGS.data)
  n_train, _ = data.split(0.0005)
  stream = prepared.PreparedStream([data], [1.0], [n_train], 8, 0)
  options = grain.ReadOptions(
    num_threads=FLAGS.read_threads, prefetch_buffer_size=FLAGS.prefetch if FLAGS.read_threads else 0
  )
  it = stream.iterator(options)
  next(it)
  startup = time.perf_counter() - t0
  pin_to_one_core(core)  # Grain's threads, started by the first batch.
  for _ in range(FLAGS.warmup_batches):  # Opens every shard (its index is read once per run), reads other rows.
    next(it)
  io1 = proc_io()
  cpu1 = time.process_time()  # Every thread's CPU time: the busy box's other jobs are not counted.
  t1 = time.perf_counter()
  tokens = rows = 0
  for _ in range(FLAGS.read_batches):
    batch = next(it)["inputs"]
    tokens, rows = tokens + batch.size, rows + len(batch)
  seconds = time.perf_counter() - t1
  cpu_seconds = time.process_time() - cpu1
  io2 = proc_io()
  threads = len(os.listdir("/proc/self/task"))
  it.close()
  result = dict(
    tokens_per_second=tokens / seconds,
    tokens_per_cpu_second=tokens / cpu_seconds,
    cpu_share=cpu_seconds / seconds,
    startup_seconds=startup,
    peak_rss_mb=prepared.peak_rss_mb(),
    rows=data.num_rows,
    cache=FLAGS.cache,
    resident_before=resident,
    read_threads=FLAGS.read_threads,
    core=core,
    threads=threads,
    startup_read_mb=(io1["read_bytes"] - io0["read_bytes"]) / 1e6,
    storage_kb_per_row=(io2["read_bytes"] - io1["read_bytes"]) / 1e3 / rows,
    read_syscalls_per_row=(io2["syscr"] - io1["syscr"]) / rows,
    ms_per_row=seconds * 1e3 / rows,
    load_average=os.getloadavg()[0],  # The box's other jobs share the pinned core.
  )
  print_readers([result])
  print(json.dumps(result))


def read_in_subprocess(data: str, cache: str, threads: int) -> dict:
  """One reader run in its own process (its own RSS, its own pinned core)."""
  command = [sys.executable, os.path.abspath(__file__), "--mode=read", f"--data={data}", f"--cache={cache}"]
  command += [f"--read_threads={threads}", f"--read_batches={FLAGS.read_batches}", f"--prefetch={FLAGS.prefetch}"]
  proc = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def print_readers(readers: list[dict]) -> None:
  print(
    f"reader: global shuffle, batches of 8 rows, {readers[0]['rows']:,} rows, one core "
    "(M tokens/s of CPU time = on a core of its own; x = times a v5p host's 20k tokens/s for llama_7b at 50 % MFU)"
  )
  print(
    "cache  threads  M tokens/s  (x)   M tokens/CPU-s  core share  ms/row  storage KB/row  start-up s  RSS MB  load"
  )
  for r in readers:
    print(
      f"{r['cache']:<5}  {r['read_threads']:>7}  {r['tokens_per_second'] / 1e6:>10.2f}  "
      f"({r['tokens_per_second'] / 20e3:>3.0f})  {r['tokens_per_cpu_second'] / 1e6:>14.2f}  {r['cpu_share']:>10.2f}  "
      f"{r['ms_per_row']:>6.3f}  {r['storage_kb_per_row']:>14.1f}  {r['startup_seconds']:>10.2f}  "
      f"{r['peak_rss_mb']:>6.0f}  {r['load_average']:.1f}"
    )


def main(argv):
  del argv
  if FLAGS.mode == "read":
    try:
      if not FLAGS.data:
        raise UserError("--mode=read: give --data=DIR, a prepared directory")
      return read_mode()
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
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
  readers = [
    read_in_subprocess(data, cache, threads) for cache in ("cold", "warm") for threads in (0, FLAGS.read_threads)
  ]
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
  print_readers(readers)
  if FLAGS.keep:
    print(f"kept {FLAGS.tmp}: python {sys.argv[0]} --mode=read --data={data}")
  else:
    shutil.rmtree(FLAGS.tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
