"""Pretraining: next-token prediction on packed documents.

The stage contributes its loss (cross-entropy on the tokens whose target is in the same document), its data
(`llm_jax.data.text`) and its tokenizer; `llm_jax.train.loop.train` does everything else.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from llm_jax import config as config_lib
from llm_jax import sharding, tasks
from llm_jax.data import text
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


def run(
  config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None, devices=None
) -> loop.TrainResult:
  """Pretrains on `devices` (default: all). `stop_after=N` stops after N steps, as a preemption would."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate_training_config(config, len(devices), jax.process_count())
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  stage.make_workdir(workdir)
  stage.check_workdir_stage(workdir, "pretrain")
  tokenizer, data, model_cfg = prepare(config, workdir)
  stage.check_workdir_config(workdir, config, model_cfg)
  print(
    f"corpus: {data.num_documents:,} documents, {data.num_tokens:,} tokens ({tokenizer.kind} tokenizer, "
    f"vocab {tokenizer.vocab_size}); {data.num_train_rows:,} train rows and "
    f"{len(data.eval['inputs']):,} eval rows of {config.seq_len}",
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
    train_data=text.train_dataset(data.train, config.batch_size, config.seed, pid, count),
    eval_data=text.eval_batches(data.eval, config.batch_size, config.eval_batches, pid, count),
    tokens_per_step=config.batch_size * config.seq_len,
    flops_per_token=model_cfg.train_flops_per_token(config.seq_len),
    meta={"stage": "pretrain", "model": dataclasses.asdict(model_cfg)},
    stop_after=stop_after,
    tokenizer=tokenizer,
    model_cfg=model_cfg,
  )
