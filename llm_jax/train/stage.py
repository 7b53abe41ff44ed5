"""Setup shared by the stages: the workdir's config record, and starting from an earlier stage's workdir."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
from jax.sharding import Mesh

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.modeling import read_model_config
from llm_jax.model import ModelConfig
from llm_jax.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """Saves config.json on the first run; a resumed run must keep the model it started with."""
  path = os.path.join(workdir, CONFIG_FILE)
  record = {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg)}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f).get("model")
    if previous and previous != record["model"]:
      changed = sorted(k for k in record["model"] if previous.get(k) != record["model"][k])
      raise UserError(f"{path}: this workdir was trained with a different model (fields {changed} differ); "
                      "use a new workdir")
    return
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def continue_from(config: ml_collections.ConfigDict, workdir: str, devices, what: str,
                  validate_training: bool = True) -> tuple[ModelConfig, Mesh, Tokenizer]:
  """For stages that start from `config.init_from` (SFT, reward model, RLHF): its model and tokenizer, the
  mesh, and this workdir's config record. `what` names the expected kind of workdir in the error message."""
  if not config.init_from:
    raise UserError(f"init_from: give the {what} workdir to start from")
  model_cfg = read_model_config(config.init_from)
  if validate_training:
    config_lib.validate_training_config(config, len(devices), jax.process_count(), model_cfg=model_cfg)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(config.init_from)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  check_workdir_config(workdir, config, model_cfg)
  return model_cfg, mesh, tokenizer
