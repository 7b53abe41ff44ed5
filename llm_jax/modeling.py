"""The layer under both training and inference: building a model, placing it on a mesh, loading it from a workdir.

    build_model(model_cfg, rngs)     the one constructor: `model_cfg.family` names the module (MODEL_FAMILIES)
    model_spec(factory, mesh)        a model's graph, abstract parameters and their shardings (no arrays)
    init_params(factory, spec, seed) fresh parameters, created directly in their shardings
    load_model(workdir, mesh, step)  a language model from any stage's workdir (its latest or given checkpoint)

Nothing here imports `llm_jax.train` or `llm_jax.inference`: both build on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.model import ModelConfig, Transformer

ModelFactory = Callable[[nnx.Rngs], nnx.Module]

# Model families by `ModelConfig.family`: a new architecture is one entry (its module takes (cfg, rngs=...)).
MODEL_FAMILIES: dict[str, Callable[..., nnx.Module]] = {"transformer": Transformer}

WORKDIR_CONFIG = "config.json"  # A workdir's record of its stage config and model (train/stage.py writes it).


def build_model(model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  return MODEL_FAMILIES[model_cfg.family](model_cfg, rngs=rngs)


def lm_factory(model_cfg: ModelConfig) -> ModelFactory:
  return lambda rngs: build_model(model_cfg, rngs)


@dataclasses.dataclass
class ModelSpec:
  """What a model is on a mesh, without its arrays: the static graph, the parameters' shapes and shardings."""

  graphdef: Any
  abstract_params: Any  # ShapeDtypeStructs carrying the target shardings.
  param_shardings: Any
  logical_names: Any  # PartitionSpecs of logical axis names, one per parameter.

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)


def model_spec(model_factory: ModelFactory, mesh: Mesh) -> ModelSpec:
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  logical_names = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  abstract = nnx.to_pure_dict(abstract_state)
  shardings = sharding.tree_shardings(abstract, logical_names, mesh)
  return ModelSpec(graphdef, ckpt_lib.abstract_with_shardings(abstract, shardings), shardings, logical_names)


def init_params(model_factory: ModelFactory, spec: ModelSpec, seed: int):
  """Initializes directly into the target shardings: no device ever holds the whole model."""

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.to_pure_dict(nnx.state(model_factory(nnx.Rngs(seed))))

  return jax.jit(init, out_shardings=spec.param_shardings)()


def _read_workdir_json(workdir: str, key: str):
  path = os.path.join(workdir, WORKDIR_CONFIG)
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
    raise UserError(f"{workdir}/{WORKDIR_CONFIG}: unreadable model description ({e})") from None


def read_stage_config(workdir: str) -> dict:
  """The stage config the workdir was trained with (as written to its config.json)."""
  return _read_workdir_json(workdir, "config")


def check_model_matches(workdir: str, meta: dict) -> None:
  """The model of config.json (what is built) is the one the checkpoint holds (what is restored)."""
  recorded, current = meta.get("model") or {}, dataclasses.asdict(read_model_config(workdir))
  changed = sorted(k for k in recorded if k in current and recorded[k] != current[k])  # Older records lack fields.
  if changed:
    raise UserError(
      f"{workdir}/config.json describes another model than its checkpoint {meta.get('step')} "
      f"(fields {changed} differ): was config.json replaced?"
    )


def check_language_model(workdir: str, step: int | None = None) -> dict:
  """The latest (or `step`'s) checkpoint meta of a workdir that holds a language model; else one UserError."""
  read_model_config(workdir)  # Not a workdir at all: says so.
  meta = ckpt_lib.workdir_meta(workdir, step)
  if meta is None:
    raise UserError(f"{workdir}: no readable checkpoint in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}")
  if meta.get("stage") == "reward_model":
    raise UserError(
      f"{workdir} is a reward-model workdir: it scores answers but does not generate; give a "
      "pretraining, SFT or RLHF workdir"
    )
  check_model_matches(workdir, meta)
  return meta


def load_model(
  workdir: str, mesh: Mesh, step: int | None = None, model_factory: ModelFactory | None = None
) -> tuple[ModelSpec, Any, dict[str, Any]]:
  """(spec, parameters sharded on `mesh`, checkpoint meta) of the latest (or `step`'s) checkpoint of `workdir`.

  The model is the workdir's language model unless `model_factory` builds another (e.g. a reward model).
  """
  spec = model_spec(model_factory or lm_factory(read_model_config(workdir)), mesh)
  params, meta = ckpt_lib.restore_params(workdir, spec.abstract_params, step)
  return spec, params, meta
