"""Prepared pretraining data (llm_jax/data/prepared.py, experiments/prepare_data.py): the shards equal the
in-memory packing, every process reads only its rows and each row once per epoch, a checkpoint resumes with
another number of processes in the same global order, mixtures, damaged data, interrupted preparation."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import grain
import jax
import numpy as np
import pytest
from conftest import subprocess_env  # tests/conftest.py: the tools' environment.

from llm_jax import sequences
from llm_jax.data import prepared, text
from llm_jax.errors import UserError
from llm_jax.metrics import read_metrics
from llm_jax.tokenizer import ByteTokenizer
from llm_jax.train import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402  (configs/pretrain.py)

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
SEQ_LEN = 32


def _docs(rng, n, max_words=40):
  return [" ".join(rng.choice(WORDS, rng.integers(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Text files, a JSONL file and a Parquet file (two row groups); returns (glob, documents in order)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  d = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  jsonl, texts, parquet = _docs(rng, 150), _docs(rng, 4, 200), _docs(rng, 60)
  with open(d / "a.jsonl", "w") as f:
    for i, doc in enumerate(jsonl):
      f.write(json.dumps({"text": doc, "id": i}) + "\n" + ("\n" if i % 7 == 0 else ""))  # Blank lines skipped.
  for i, doc in enumerate(texts):
    (d / f"t{i}.txt").write_text(doc)
  pq.write_table(pa.table({"text": parquet}), d / "b.parquet", row_group_size=25)
  pattern = f"{d}/a.jsonl,{d}/*.txt,{d}/b.parquet"
  return pattern, jsonl + texts + parquet


@pytest.fixture(scope="module")
def prepared_dir(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared") / "data")
  # Tiny chunks (JSONL cut at arbitrary bytes, one task per Parquet row group) and 3 shards over 2 workers.
  prepared.prepare(corpus[0], out, "char", seq_len=SEQ_LEN, num_shards=3, num_workers=2, chunk_mb=0.002, block_rows=7)
  return out


def _in_memory(documents):
  tok = ByteTokenizer()
  return text.pack_documents(tok.encode_batch(documents), tok, SEQ_LEN)


def test_prepared_rows_equal_the_in_memory_packing(corpus, prepared_dir):
  assert prepared.PAD_FILL == sequences.PAD_FILL and prepared.ROW_FIELDS == text.ROW_FIELDS
  data = prepared.PreparedData(prepared_dir)
  expected = _in_memory(corpus[1])
  rows = data.rows(0, data.num_rows)
  assert data.num_rows == len(expected["inputs"])
  for k in text.ROW_FIELDS:
    np.testing.assert_array_equal(rows[k], expected[k], err_msg=k)
  m = data.metadata
  assert m["num_documents"] == len(corpus[1])
  assert m["num_tokens"] == sum(len(d.encode()) for d in corpus[1])
  assert [s["rows"] for s in m["shards"]] == [data.num_rows * (s + 1) // 3 - data.num_rows * s // 3 for s in range(3)]
  assert (m["token_dtype"], m["index_dtype"]) == ("<u2", "<u2")
  prepared.verify(prepared_dir)


def _epoch_rows(stream, read_options, num_batches):
  it = stream.iterator(read_options)
  out = [next(it) for _ in range(num_batches)]
  it.close()
  return out


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_each_process_reads_its_slice_and_each_row_once_per_epoch(prepared_dir, process_count):
  data = prepared.PreparedData(prepared_dir)
  n_train, _ = data.split(0.05)
  batch, seed = 8, 3
  num_batches = n_train // batch
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  per_process = [
    _epoch_rows(prepared.PreparedStream([data], [1.0], [n_train], batch, seed, p, process_count), options, num_batches)
    for p in range(process_count)
  ]
  # Global batch k = the processes' slices side by side.
  global_inputs = np.concatenate(
    [np.concatenate([per_process[p][k]["inputs"] for p in range(process_count)]) for k in range(num_batches)]
  )
  # The global order is in-memory training's (text.train_dataset over the same rows, same seed) ...
  train_rows = {k: v[:n_train] for k, v in data.rows(0, data.num_rows).items()}
  reference = text.train_dataset(train_rows, batch, seed)
  np.testing.assert_array_equal(global_inputs, np.concatenate([reference[k]["inputs"] for k in range(num_batches)]))
  # ... and one epoch holds every training row once (a multiset of rows: the bytes of each row, sorted).
  seen = sorted(r.tobytes() for r in global_inputs)
  first_epoch = sorted(train_rows["inputs"][i].tobytes() for i in range(n_train))
  assert not Counter(seen) - Counter(first_epoch)  # No row twice within the epoch's whole batches ...
  full = sorted(  # ... and, one row per batch, the whole epoch is every row once.
    r.tobytes()
    for r in np.concatenate(
      [b["inputs"] for b in _epoch_rows(prepared.PreparedStream([data], [1.0], [n_train], 1, seed), options, n_train)]
    )
  )
  assert full == first_epoch


def test_global_position_resumes_with_another_process_count(prepared_dir):
  data = prepared.PreparedData(prepared_dir)
  n_train, _ = data.split(0.05)
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

  def stream(p, count):
    return prepared.PreparedStream([data], [1.0], [n_train], 8, 5, p, count)

  uninterrupted = stream(0, 1).iterator(options)
  expected = [next(uninterrupted)["inputs"] for _ in range(12)]  # 12 × 8 rows > 1 epoch: crosses the reshuffle.
  for before, after in ((2, 1), (1, 2), (4, 2)):
    its = [stream(p, before).iterator(options) for p in range(before)]
    for _ in range(5):
      for it in its:
        next(it)
    states = {json.dumps(it.global_state()) for it in its}
    assert states == {json.dumps({"global_row": 40})}  # One global state, whatever the process count.
    resumed = [stream(p, after).iterator(options, position=40) for p in range(after)]
    for k in range(5, 12):
      np.testing.assert_array_equal(np.concatenate([next(it)["inputs"] for it in resumed]), expected[k])


def test_mixture_follows_the_weights_and_the_seed(corpus, prepared_dir, tmp_path):
  other = str(tmp_path / "other")
  rng = np.random.default_rng(1)
  (tmp_path / "o.jsonl").write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in _docs(rng, 100)))
  prepared.prepare(str(tmp_path / "o.jsonl"), other, prepared_dir, seq_len=SEQ_LEN, num_shards=2)
  datasets, weights = prepared.open_datasets("", f"{prepared_dir}:3,{other}:1")
  assert weights == [3.0, 1.0]
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

  def first_rows(seed):
    stream = prepared.PreparedStream(datasets, weights, [d.split(0.05)[0] for d in datasets], 40, seed)
    return _epoch_rows(stream, options, 10)

  rows = np.concatenate([b["inputs"] for b in first_rows(0)])
  letters = rows - 8  # The char tokenizer's byte values (past its 8 special ids).
  upper = ((letters >= ord("A")) & (letters <= ord("Z"))).any(axis=1)
  assert not (upper & ((letters >= ord("a")) & (letters <= ord("z"))).any(axis=1)).any()
  assert upper.sum() == 100 and len(rows) == 400  # Exactly 1 in 4 rows from the second dataset.
  np.testing.assert_array_equal(rows, np.concatenate([b["inputs"] for b in first_rows(0)]))
  assert not np.array_equal(rows, np.concatenate([b["inputs"] for b in first_rows(1)]))


def _config(path, steps=3, **overrides):
  config = pretrain_config.get_config()
  config.data.path, config.steps = path, steps
  settings = dict(
    model="tiny",
    batch_size=8,
    seq_len=SEQ_LEN,
    learning_rate=3e-3,
    warmup_steps=2,
    min_lr_ratio=1.0,
    log_every=1,
    eval_every=1000,
    checkpoint_every=1000,
    eval_batches=2,
  )
  settings.update(overrides)
  for key, value in settings.items():
    *parents, leaf = key.split(".")
    target = config
    for p in parents:
      target = target[p]
    target[leaf] = value
  config.data.tokenizer = "char"
  config.model_overrides.num_kv_heads = 2
  return config


def _losses(workdir, key="loss"):
  return {row["step"]: row[key] for row in read_metrics(workdir) if key in row}


def test_training_on_prepared_data_equals_training_in_memory(corpus, prepared_dir, tmp_path):
  one = jax.devices()[:1]
  jsonl = corpus[0].split(",")[0]  # The JSONL file alone, prepared on its own.
  data = str(tmp_path / "jsonl")
  prepared.prepare(jsonl, data, "char", seq_len=SEQ_LEN, num_shards=2)
  pretrain.run(_config(jsonl), str(tmp_path / "memory"), devices=one)
  pretrain.run(_config(data), str(tmp_path / "prepared"), devices=one)
  a, b = _losses(str(tmp_path / "memory"), "eval_loss"), _losses(str(tmp_path / "prepared"), "eval_loss")
  assert sorted(a) == sorted(b) == [3]
  a, b = _losses(str(tmp_path / "memory")), _losses(str(tmp_path / "prepared"))
  assert sorted(a) == [1, 2, 3] and a == b  # The same rows in the same order: the same losses, bit for bit.
  assert os.path.exists(tmp_path / "prepared" / "tokenizer.json")


def test_mismatched_or_damaged_prepared_data_is_one_line(prepared_dir, tmp_path):
  one = jax.devices()[:1]
  with pytest.raises(UserError, match=r"prepared with seq_len=32 but the run has seq_len=64"):
    pretrain.run(_config(prepared_dir, seq_len=64), str(tmp_path / "w1"), devices=one)
  spm_workdir = tmp_path / "w2"
  spm_workdir.mkdir()
  (spm_workdir / "tokenizer.json").write_text(json.dumps({"kind": "spm", "model": "tokenizer.model"}))
  from llm_jax.tokenizer import train_sentencepiece

  train_sentencepiece([" ".join(WORDS)] * 50, 300).save(str(spm_workdir))
  with pytest.raises(UserError, match=r"was prepared with tokenizer char but .* trains with spm:"):
    pretrain.run(_config(prepared_dir), str(spm_workdir), devices=one)

  damaged = tmp_path / "damaged"
  subprocess.run(["cp", "-r", prepared_dir, str(damaged)], check=True)
  shard = sorted(damaged.glob("rows-*.array_record"))[1]
  with open(shard, "r+b") as f:
    f.truncate(shard.stat().st_size - 10)
  with pytest.raises(UserError, match=rf"shard {shard.name} has [\d,]+ bytes where the metadata says"):
    pretrain.run(_config(str(damaged)), str(tmp_path / "w3"), devices=one)
  # The command line: one line, exit 2 (prepare_data.py imports no jax: fast).
  env = dict(os.environ, PYTHONPATH=ROOT)
  for args, message in (
    ([f"--output={damaged}", "--verify"], f"error: prepared data {damaged}: shard {shard.name} has"),
    ([f"--output={prepared_dir}", f"--input={prepared_dir}/../*.none"], "error: --input: no file matches"),
  ):
    proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "prepare_data.py"), *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
  (damaged / prepared.METADATA_FILE).write_text('{"format": "llm_jax.prepared/1", "seq_len": 32}')
  with pytest.raises(UserError, match=r"prepared.json: malformed \(KeyError"):
    prepared.PreparedData(str(damaged))


def test_an_interrupted_preparation_resumes_without_redoing_finished_shards(corpus, prepared_dir, tmp_path):
  out = str(tmp_path / "data")
  first = prepared.prepare(corpus[0], out, "char", seq_len=SEQ_LEN, num_shards=3, chunk_mb=0.002, keep_work=True)
  assert first.chunks_done > 3 and first.shards_done == 3
  with open(os.path.join(out, prepared.METADATA_FILE)) as f:
    complete = json.load(f)
  # As if killed while writing shard 1 (its temporary file half written) after chunk 2's tokens were lost:
  os.remove(os.path.join(out, prepared.METADATA_FILE))
  shard1 = os.path.join(out, complete["shards"][1]["file"])
  os.rename(shard1, shard1 + ".tmp")
  os.remove(os.path.join(out, prepared.WORK_DIR, "chunk-00002.json"))
  second = prepared.prepare(corpus[0], out, "char", seq_len=SEQ_LEN, num_shards=3, chunk_mb=0.002)
  assert (second.chunks_done, second.shards_done) == (1, 1)
  assert second.metadata["shards"] == complete["shards"]  # Same bytes (checksums) as the uninterrupted run.
  assert not os.path.exists(os.path.join(out, prepared.WORK_DIR))
  # Finished: a rerun does nothing; other flags are refused.
  assert prepared.prepare(corpus[0], out, "char", seq_len=SEQ_LEN, num_shards=3, chunk_mb=0.002).shards_done == 0
  with pytest.raises(UserError, match="different num_shards"):
    prepared.prepare(corpus[0], out, "char", seq_len=SEQ_LEN, num_shards=4)


# ----------------------------------------------------------------------------------------------------------
# Elastic resume with real processes (experiments/launch_local.py): 2 → 1 and 1 → 2.


def _env():
  e = subprocess_env(devices=None)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(name, None)
  return e


def _launch(workdir, data, steps):
  config = _config(data, steps)
  flat = {
    "model": config.model,
    "batch_size": 8,
    "seq_len": SEQ_LEN,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "min_lr_ratio": 1.0,
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 1000,
    "eval_batches": 2,
    "data.tokenizer": "char",
    "model_overrides.num_kv_heads": 2,
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
  }
  args = [
    sys.executable,
    os.path.join(ROOT, "experiments", "launch_local.py"),
    "--num_processes=2",
    "--devices_per_process=4",
    "--grace_seconds=5",
    "--",
    os.path.join(ROOT, "experiments", "pretrain.py"),
    f"--workdir={workdir}",
    f"--config.data.path={data}",
    f"--config.steps={steps}",
    "--sample_tokens=0",
    *(f"--config.{k}={v}" for k, v in flat.items()),
  ]
  proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_a_checkpoint_resumes_on_another_number_of_processes_in_the_same_global_order(prepared_dir, tmp_path):
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  # The uninterrupted reference (1 process × 8 devices) also leaves the step-3 checkpoint that 1 → 2 resumes.
  reference_dir = tmp_path / "reference"
  pretrain.run(_config(prepared_dir, 6, checkpoint_every=3, **mesh), str(reference_dir), devices=jax.devices())
  reference = _losses(str(reference_dir))
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]

  one_to_two = tmp_path / "one_to_two"
  shutil.copytree(reference_dir, one_to_two)
  shutil.rmtree(one_to_two / "checkpoints" / "6")
  metrics = (one_to_two / "metrics.jsonl").read_text().splitlines()
  (one_to_two / "metrics.jsonl").write_text("".join(m + "\n" for m in metrics if json.loads(m)["step"] <= 3))
  assert "resuming from step 3" in _launch(str(one_to_two), prepared_dir, 6)  # 2 processes × 4 devices.

  two_to_one = str(tmp_path / "two_to_one")
  _launch(two_to_one, prepared_dir, 3)  # 2 processes × 4 devices ...
  pretrain.run(_config(prepared_dir, 6, **mesh), two_to_one, devices=jax.devices())  # ... then 1 × 8.

  for workdir in (two_to_one, str(one_to_two)):
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-5)


def test_read_options_by_kind_of_data():
  """data.num_threads / data.prefetch = -1 (the default): prepared data gets READ_THREADS threads and as many
  batches in flight (each thread waits on its own storage reads), in-memory data 1 thread and 4 batches; values
  given are kept."""
  from llm_jax.train import loop

  data = pretrain_config.get_config().data
  assert (data.num_threads, data.prefetch) == (-1, -1)
  options = loop.data_read_options(data, prepared=True)
  assert (options.num_threads, options.prefetch_buffer_size) == (prepared.READ_THREADS, prepared.READ_THREADS)
  options = loop.data_read_options(data, prepared=False)
  assert (options.num_threads, options.prefetch_buffer_size) == (1, 4)
  data.num_threads, data.prefetch = 2, 0
  for kind in (True, False):
    options = loop.data_read_options(data, prepared=kind)
    assert (options.num_threads, options.prefetch_buffer_size) == (2, 0)
