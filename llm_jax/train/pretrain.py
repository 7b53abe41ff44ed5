"""Pretraining: next-token prediction on packed documents.

The stage contributes its loss (cross-entropy on the tokens whose target is in the same document), its data
(`llm_jax.data.text`) and its tokenizer; `llm_jax.train.loop.train` does everything else.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding, tasks
from llm_jax.data import prepared, text
from llm_jax.errors import UserError
from llm_jax.model import ModelConfig
from llm_jax.modeling import lm_factory
from llm_jax.sequences import next_token_loss
from llm_jax.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_sentencepiece
from llm_jax.train import loop, stage


def get_tokenizer(config: ml_collections.ConfigDict, workdir: str, documents: list[str]) -> Tokenizer:
  """The workdir's tokenizer if it has one (a resumed run), else a new one saved there."""
  if os.path.exists(os.path.join(workdir, "tokenizer.json")):
    tokenizer = load_tokenizer(workdir)
    if tokenizer.kind != config.data.tokenizer:
      raise UserError(
        f"data.tokenizer={config.data.tokenizer!r} but {workdir} already holds a "
        f"{tokenizer.kind!r} tokenizer; use a new workdir"
      )
    return tokenizer
  if config.data.tokenizer == "char":
    tokenizer = ByteTokenizer()
  else:
    tokenizer = train_sentencepiece(documents, config.data.vocab_size)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  return tokenizer


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[Tokenizer, text.PackedDataset, ModelConfig]:
  """Reads, tokenizes and packs the corpus; returns the tokenizer, the rows and the final model config."""
  # No data.path: the project's own corpus, generated into the workdir (no downloads; see llm_jax.tasks).
  path = config.data.path or tasks.builtin_corpus(workdir, config.data.builtin_seed, config.data.builtin_documents)
  documents = text.read_documents(path)
  eval_documents = text.read_documents(config.data.eval_path, name="data.eval_path") if config.data.eval_path else None
  tokenizer = get_tokenizer(config, workdir, documents)
  data = text.build_packed_dataset(documents, tokenizer, config.seq_len, config.data.eval_fraction, eval_documents)
  model_cfg = config_lib.resolve_model_config(config, vocab_size=tokenizer.vocab_size)
  return tokenizer, data, model_cfg


def uses_prepared_data(config: ml_collections.ConfigDict) -> bool:
  """`data.mixture`, or a `data.path` that is a directory of prepared data (experiments/prepare_data.py)."""
  return bool(config.data.get("mixture")) or prepared.is_prepared(config.data.path)


@dataclasses.dataclass
class PreparedRun:
  stream: prepared.PreparedStream
  eval_rows: dict
  num_documents: int
  num_tokens: int
  num_train_rows: int


def prepare_streaming(config: ml_collections.ConfigDict, workdir: str) -> tuple[Tokenizer, PreparedRun, ModelConfig]:
  """Prepared data: the prepared tokenizer (copied into the workdir; a resumed run's must be the same), the
  streamed training rows and the (bounded) evaluation rows."""
  datasets, weights = prepared.open_datasets(config.data.path, config.data.get("mixture", ""))
  tokenizer = datasets[0].tokenizer
  if os.path.exists(os.path.join(workdir, "tokenizer.json")):
    own = load_tokenizer(workdir)
    if own.fingerprint() != tokenizer.fingerprint():
      raise UserError(
        f"{datasets[0].path} was prepared with tokenizer {tokenizer.fingerprint()} but {workdir} trains with "
        f"{own.fingerprint()}: prepare the data with --tokenizer={workdir}, or use a new workdir"
      )
  if datasets[0].seq_len != config.seq_len:
    raise UserError(
      f"{datasets[0].path} was prepared with seq_len={datasets[0].seq_len} but the run has "
      f"seq_len={config.seq_len}: set --config.seq_len={datasets[0].seq_len} or prepare the data again"
    )
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  has_eval_path = bool(config.data.eval_path)
  splits = [d.split(config.data.eval_fraction, has_eval_path) for d in datasets]
  if has_eval_path:
    documents = text.read_documents(config.data.eval_path, name="data.eval_path")
    eval_rows = text.pack_documents(tokenizer.encode_batch(documents), tokenizer, config.seq_len)
  else:  # Each dataset's held-out tail; only the rows evaluation uses are read (eval_batches × batch_size).
    cap = config.eval_batches * config.batch_size
    parts = []
    for d, w, (n_train, n_eval) in zip(datasets, weights, splits):
      take = n_eval if not cap else min(n_eval, max(1, -(-cap * w // sum(weights))))
      parts.append(d.rows(n_train, n_train + int(take)))
    eval_rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  stream = prepared.PreparedStream(
    datasets, weights, [n for n, _ in splits], config.batch_size, config.seed, jax.process_index(), jax.process_count()
  )
  model_cfg = config_lib.resolve_model_config(config, vocab_size=tokenizer.vocab_size)
  data = PreparedRun(
    stream,
    eval_rows,
    sum(d.metadata["num_documents"] for d in datasets),
    sum(d.metadata["num_tokens"] for d in datasets),
    sum(n for n, _ in splits),
  )
  return tokenizer, data, model_cfg


def run(
  config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None, devices=None
) -> loop.TrainResult:
  """Pretrains on `devices` (default: all). `stop_after=N` stops after N steps, as a preemption would."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate_training_config(config, len(devices), jax.process_count())
  mesh = sharding.mesh_from_config(config.mesh, devices)
  stage.make_workdir(workdir)
  stage.check_workdir_stage(workdir, "pretrain")
  streaming = uses_prepared_data(config)
  tokenizer, data, model_cfg = (prepare_streaming if streaming else prepare)(config, workdir)
  stage.check_workdir_config(workdir, config, model_cfg)
  print(
    f"corpus: {data.num_documents:,} documents, {data.num_tokens:,} tokens ({tokenizer.kind} tokenizer, "
    f"vocab {tokenizer.vocab_size}); {data.num_train_rows:,} train rows and "
    f"{len(data.eval_rows['inputs'] if streaming else data.eval['inputs']):,} eval rows of {config.seq_len}"
    + (f" (prepared: {config.data.get('mixture') or config.data.path})" if streaming else ""),
    flush=True,
  )
  print(f"model {config.model}: {model_cfg.num_params():,} parameters; mesh {dict(mesh.shape)}", flush=True)
  pid, count = jax.process_index(), jax.process_count()
  return loop.train(
    config,
    workdir,
    mesh=mesh,
    model_factory=lm_factory(model_cfg),
    loss_fn=next_token_loss,
    train_data=data.stream if streaming else text.train_dataset(data.train, config.batch_size, config.seed, pid, count),
    eval_data=text.eval_batches(
      data.eval_rows if streaming else data.eval, config.batch_size, config.eval_batches, pid, count
    ),
    tokens_per_step=config.batch_size * config.seq_len,
    flops_per_token=model_cfg.train_flops_per_token(config.seq_len),
    meta={"stage": "pretrain", "model": dataclasses.asdict(model_cfg)},
    stop_after=stop_after,
    tokenizer=tokenizer,
    model_cfg=model_cfg,
  )
