"""Setup shared by the stages: the workdir's config record, and starting from an earlier stage's workdir."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import lora as lora_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.files import write_atomically
from llm_jax.model import LoraConfig, ModelConfig
from llm_jax.modeling import (
  ModelFactory,
  ModelSpec,
  check_model_matches,
  init_params,
  lm_factory,
  load_params,
  model_spec,
  read_model_config,
)
from llm_jax.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"


# Stages whose checkpoints hold a language model (`params` is a Transformer): what later stages start from.
# "hf_import" is a checkpoint converted from Hugging Face (experiments/convert_hf.py).
LANGUAGE_MODEL_STAGES = ("pretrain", "sft", "rlhf", "dpo", "hf_import")


def make_workdir(workdir: str) -> None:
  """Creates the workdir (and its parents); a path that is a file, or under one, is a UserError."""
  if not workdir:
    raise UserError("--workdir: give a directory")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot create it ({e.strerror})") from None


def check_workdir_stage(workdir: str, stage_name: str) -> None:
  """A run resumes only its own stage's checkpoints: never another stage's (it would train them as its own)."""
  meta = ckpt_lib.workdir_meta(workdir)
  if meta is not None and meta.get("stage") != stage_name:
    raise UserError(
      f"--workdir={workdir} holds {meta.get('stage')} checkpoints (step {meta.get('step')}), and "
      f"this is a {stage_name} run: use a new workdir"
    )


def check_source_workdir(workdir: str, field: str, what: str, stages: tuple[str, ...]) -> dict:
  """`field` (e.g. init_from) names a workdir with a checkpoint of one of `stages`; returns its latest meta."""
  if not workdir:
    raise UserError(f"{field}: give the {what} workdir")
  read_model_config(workdir)  # Says so if it is not a workdir at all.
  meta = ckpt_lib.workdir_meta(workdir)
  if meta is None:
    raise UserError(f"{field}={workdir}: no readable checkpoint in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}")
  if meta.get("stage") not in stages:
    raise UserError(f"{field}={workdir} holds {meta.get('stage')} checkpoints, where {what} checkpoints are expected")
  check_model_matches(workdir, meta)
  return meta


def check_same_tokenizer(workdir: str, field: str, reference: str, reference_field: str) -> None:
  """Two models that see the same token ids must share the tokenizer and the vocabulary size."""
  a, b = load_tokenizer(workdir), load_tokenizer(reference)
  if a.fingerprint() != b.fingerprint():
    raise UserError(
      f"{field}={workdir} and {reference_field}={reference} use different tokenizers "
      f"({a.kind}, {a.vocab_size} ids vs {b.kind}, {b.vocab_size} ids): their token ids do not match"
    )
  va, vb = read_model_config(workdir).vocab_size, read_model_config(reference).vocab_size
  if va != vb:
    raise UserError(
      f"{field}={workdir} and {reference_field}={reference} are models of different vocabularies "
      f"(model.vocab_size {va} vs {vb})"
    )


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """Saves config.json on the first run; a resumed run must keep the model it started with."""
  path = os.path.join(workdir, CONFIG_FILE)
  record = {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg)}
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f).get("model")
    except (OSError, ValueError, AttributeError) as e:
      raise UserError(
        f"{path}: unreadable ({type(e).__name__}: {e}); it records the model this workdir was "
        "trained with: restore it or use a new workdir"
      ) from None
    # A field that an older record lacks counts as its default (fields are only ever added with one).
    defaults = dataclasses.asdict(ModelConfig())
    changed = sorted(k for k in record["model"] if previous and previous.get(k, defaults[k]) != record["model"][k])
    if changed:
      raise UserError(
        f"{path}: this workdir was trained with a different model (fields {changed} differ); use a new workdir"
      )
    return
  if jax.process_index() == 0:
    write_atomically(path, json.dumps(record, indent=2, sort_keys=True, default=str))


def continue_from(
  config: ml_collections.ConfigDict,
  workdir: str,
  devices,
  what: str,
  validate_training: bool = True,
  stage_name: str | None = None,
) -> tuple[ModelConfig, Mesh, Tokenizer]:
  """For stages that start from `config.init_from` (SFT, reward model, RLHF): its model and tokenizer, the
  mesh, and this workdir's config record. `what` names the expected kind of workdir in the error message.

  Checks every workdir the config names before writing anything: init_from holds a language model; RLHF's
  reward_model holds a reward model with the same tokenizer; this workdir holds no other stage's checkpoints.
  """
  # RLHF does not name its stage here (rl.py is being rewritten): its config is the one with a reward model.
  stage_name = stage_name or ("rlhf" if "reward_model" in config else None)
  if not config.init_from:
    raise UserError(f"init_from: give the {what} workdir to start from")
  check_source_workdir(config.init_from, "init_from", what, LANGUAGE_MODEL_STAGES)
  model_cfg = read_model_config(config.init_from)
  if config.get("reward_model"):
    check_source_workdir(config.reward_model, "reward_model", "reward-model", ("reward_model",))
    check_same_tokenizer(config.reward_model, "reward_model", config.init_from, "init_from")
  if validate_training:
    config_lib.validate_training_config(config, len(devices), jax.process_count(), model_cfg=model_cfg)
  lora_lib.from_config(config)  # A bad lora.* field fails before anything is written.
  mesh = sharding.mesh_from_config(config.mesh, devices)
  tokenizer = load_tokenizer(config.init_from)
  make_workdir(workdir)
  if stage_name:
    check_workdir_stage(workdir, stage_name)
  check_workdir_config(workdir, config, model_cfg)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
  return model_cfg, mesh, tokenizer


@dataclasses.dataclass
class LoraStart:
  """A LoRA stage's starting point: the adapters' config, the base language model's parameters (the init_from
  workdir's, merged if that is a LoRA workdir itself) and the checkpoint meta that names the base."""

  lora: LoraConfig
  base: Any
  record: dict  # The checkpoint meta's "lora" entry.

  def initial_params(self, factory: ModelFactory, spec: ModelSpec, seed: int) -> Any:
    """Fresh adapters (and any head) from `seed`; every transformer with adapters starts from the base."""
    trainable = init_params(factory, spec, seed, trainable_only=True)
    return spec.join(trainable, lora_lib.place_base(self.base, spec.frozen, spec.lora_prefixes))


def lora_start(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> LoraStart | None:
  """`config.lora` (None when rank is 0) with the base model of `config.init_from` loaded onto `mesh`."""
  lora = lora_lib.from_config(config)
  if lora is None:
    return None
  base, meta = load_params(config.init_from, model_spec(lm_factory(model_cfg), mesh), mesh)
  return LoraStart(lora, base, lora_lib.base_record(lora, config.init_from, meta["step"], base))
