"""Load a trained model from any stage's workdir (or one checkpoint of it) onto a mesh, ready to sample."""

from __future__ import annotations

import dataclasses
import json
import os

from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler
from llm_jax.model import ModelConfig, Transformer
from llm_jax.tokenizer import Tokenizer, load_tokenizer
from llm_jax.train import loop


def split_checkpoint_path(path: str) -> tuple[str, int]:
  """`WORKDIR/checkpoints/STEP` → (WORKDIR, STEP)."""
  path = os.path.abspath(path.rstrip("/"))
  parent, step = os.path.split(path)
  if not step.isdigit() or os.path.basename(parent) != ckpt_lib.CHECKPOINT_DIR:
    raise UserError(f"--checkpoint={path}: expected WORKDIR/{ckpt_lib.CHECKPOINT_DIR}/STEP")
  return os.path.dirname(parent), int(step)


def resolve(workdir: str, checkpoint: str) -> tuple[str, int | None]:
  """The --workdir / --checkpoint pair of the command-line tools → (workdir, step or None for the latest)."""
  if bool(workdir) == bool(checkpoint):
    raise UserError("give exactly one of --workdir or --checkpoint")
  return split_checkpoint_path(checkpoint) if checkpoint else (workdir, None)


def _read_workdir_json(workdir: str, key: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path}: not found; {workdir} is not an llm_jax workdir")
  try:
    with open(path) as f:
      return json.load(f)[key]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def read_model_config(workdir: str) -> ModelConfig:
  description = _read_workdir_json(workdir, "model")
  try:
    return ModelConfig(**description)
  except TypeError as e:
    raise UserError(f"{workdir}/config.json: unreadable model description ({e})") from None


def read_stage_config(workdir: str) -> dict:
  """The stage config the workdir was trained with (as written to its config.json)."""
  return _read_workdir_json(workdir, "config")


def check_model_matches(workdir: str, meta: dict) -> None:
  """The model of config.json (what is built) is the one the checkpoint holds (what is restored)."""
  recorded, current = meta.get("model") or {}, dataclasses.asdict(read_model_config(workdir))
  changed = sorted(k for k in recorded if k in current and recorded[k] != current[k])  # Older records lack fields.
  if changed:
    raise UserError(f"{workdir}/config.json describes another model than its checkpoint {meta.get('step')} "
                    f"(fields {changed} differ): was config.json replaced?")


def check_language_model(workdir: str, step: int | None = None) -> dict:
  """The latest (or `step`'s) checkpoint meta of a workdir that holds a language model; else one UserError."""
  read_model_config(workdir)  # Not a workdir at all: says so.
  meta = ckpt_lib.workdir_meta(workdir, step)
  if meta is None:
    raise UserError(f"{workdir}: no readable checkpoint in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}")
  if meta.get("stage") == "reward_model":
    raise UserError(f"{workdir} is a reward-model workdir: it scores answers but does not generate; give a "
                    "pretraining, SFT or RLHF workdir")
  check_model_matches(workdir, meta)
  return meta


def load_sampler(workdir: str, mesh: Mesh, step: int | None = None) -> tuple[Sampler, Tokenizer, dict]:
  """The latest (or `step`'s) parameters of `workdir`, sharded on `mesh`, with the workdir's tokenizer."""
  check_language_model(workdir, step)
  model_cfg = read_model_config(workdir)
  tokenizer = load_tokenizer(workdir)
  state = loop.model_state(lambda rngs: Transformer(model_cfg, rngs=rngs), mesh)
  params, meta = ckpt_lib.restore_params(workdir, state.abstract_params, step)
  return Sampler(state.graphdef, params, mesh), tokenizer, meta
