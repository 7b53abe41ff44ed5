"""The layer under both training and inference: building a model, placing it on a mesh, loading it from a workdir.

    build_model(model_cfg, rngs)     the one constructor: `model_cfg.family` names the module (MODEL_FAMILIES)
    model_spec(factory, mesh)        a model's graph, abstract parameters and their shardings (no arrays)
    init_params(factory, spec, seed) fresh parameters, created directly in their shardings
    load_model(workdir, mesh, step)  a language model from any stage's workdir (its latest or given checkpoint);
                                     a LoRA workdir's adapters are merged into its base: every consumer sees a
                                     plain model

Nothing here imports `llm_jax.train` or `llm_jax.inference`: both build on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax import lora as lora_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.model import LoraConfig, ModelConfig, Transformer

ModelFactory = Callable[[nnx.Rngs], nnx.Module]
# A model's factory given its adapters (None: the plain model); how loaders build a LoRA workdir's model.
FactoryFor = Callable[[LoraConfig | None], ModelFactory]

# Model families by `ModelConfig.family`: a new architecture is one entry (its module takes (cfg, rngs=...)).
MODEL_FAMILIES: dict[str, Callable[..., nnx.Module]] = {"transformer": Transformer}

WORKDIR_CONFIG = "config.json"  # A workdir's record of its stage config and model (train/stage.py writes it).


def build_model(model_cfg: ModelConfig, rngs: nnx.Rngs, lora: LoraConfig | None = None) -> nnx.Module:
  return MODEL_FAMILIES[model_cfg.family](model_cfg, rngs=rngs, lora=lora)


@dataclasses.dataclass(frozen=True)
class LanguageModelFactory:
  """`lm_factory`'s factory: a value (hashable), so `model_spec` builds each model once per mesh."""

  model_cfg: ModelConfig
  lora: LoraConfig | None = None

  def __call__(self, rngs: nnx.Rngs) -> nnx.Module:
    return build_model(self.model_cfg, rngs, self.lora)


def lm_factory(model_cfg: ModelConfig, lora: LoraConfig | None = None) -> ModelFactory:
  return LanguageModelFactory(model_cfg, lora)


@dataclasses.dataclass(frozen=True, eq=False)  # Shared (`model_spec` hands out one per model and mesh): an identity.
class ModelSpec:
  """What a model is on a mesh, without its arrays: the static graph, the parameters' shapes and shardings."""

  graphdef: Any
  abstract_params: Any  # ShapeDtypeStructs carrying the target shardings.
  param_shardings: Any
  logical_names: Any  # PartitionSpecs of logical axis names, one per parameter.
  # LoRA: the paths of the parameters that are not trained (the transformers' own weights; empty without LoRA)
  # and where the transformers with adapters sit in the tree.
  frozen: frozenset = frozenset()
  lora_prefixes: tuple = ()

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def split(self, tree) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a tree shaped like the parameters (no copies); frozen is {} without LoRA."""
    return lora_lib.split(tree, self.frozen)

  def join(self, trainable, frozen) -> Any:
    return lora_lib.join(trainable, frozen)


class _Stream(nnx.RngStream):
  """flax's RngStream, with its counter replaced instead of updated in place. While a model is traced (both
  functions below trace its construction), flax's in-place `count[...] += 1` compares the new count's sharding
  with the old one's, and a tracer's `.sharding` error message searches the whole trace so far: quadratic in the
  number of parameters (a third of `model_spec`'s time on the tests' tiny models). Same keys, same values."""

  def __call__(self) -> jax.Array:
    key = jax.random.fold_in(self.key.get_value(), self.count.get_value())
    self.count.set_value(self.count.get_value() + 1)
    return key


def _rngs(seed: int | jax.Array) -> nnx.Rngs:
  """nnx.Rngs(seed), counting with `_Stream`."""
  rngs = nnx.Rngs(seed)
  rngs.default = _Stream(rngs.default.key.get_value(), tag="default")
  return rngs


def model_spec(model_factory: ModelFactory, mesh: Mesh) -> ModelSpec:
  """`model_factory`'s model on `mesh`: built (abstractly) once per (factory, mesh) where the factory is a value
  (`lm_factory`'s); every stage, loader and sampler asks for it again."""
  if isinstance(model_factory, LanguageModelFactory):
    return _language_model_spec(model_factory, mesh)
  return _model_spec(model_factory, mesh)


@functools.lru_cache(maxsize=64)
def _language_model_spec(model_factory: LanguageModelFactory, mesh: Mesh) -> ModelSpec:
  return _model_spec(model_factory, mesh)


def _model_spec(model_factory: ModelFactory, mesh: Mesh) -> ModelSpec:
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_factory(_rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  logical_names = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  abstract = nnx.to_pure_dict(abstract_state)
  shardings = sharding.tree_shardings(abstract, logical_names, mesh)
  frozen, prefixes = lora_lib.frozen_layout(abstract_model)
  abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
  return ModelSpec(graphdef, abstract, shardings, logical_names, frozen, prefixes)


def init_params(model_factory: ModelFactory, spec: ModelSpec, seed: int, trainable_only: bool = False, skip=()):
  """Initializes directly into the target shardings: no device ever holds the whole model.

  Only what is returned is computed (XLA drops the rest), so a caller names what it would throw away:
  `trainable_only`: the trainable part alone (a LoRA model's adapters and heads, not its base weights);
  `skip`: top-level entries the caller fills from elsewhere (a reward model's loaded backbone). The other entries
  get the values a full init gives them. The seed is an argument, not a constant: one program for every seed."""
  skip = tuple(skip)
  if isinstance(model_factory, LanguageModelFactory):  # A value: its jitted init is kept (no new trace).
    return _cached_init_fn(model_factory, spec, trainable_only, skip)(seed)
  return _init_fn(model_factory, spec, trainable_only, skip)(seed)


@functools.lru_cache(maxsize=64)
def _cached_init_fn(model_factory: LanguageModelFactory, spec: ModelSpec, trainable_only: bool, skip: tuple):
  return _init_fn(model_factory, spec, trainable_only, skip)


def _init_fn(model_factory: ModelFactory, spec: ModelSpec, trainable_only: bool, skip: tuple):
  def select(tree):
    tree = {k: v for k, v in tree.items() if k not in skip}
    return spec.split(tree)[0] if trainable_only else tree

  def init(seed):
    with nnx.use_eager_sharding(False):
      params = nnx.to_pure_dict(nnx.state(model_factory(_rngs(jax.random.key(seed)))))
    return select(params)

  return jax.jit(init, out_shardings=select(spec.param_shardings))


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
  workdir: str,
  mesh: Mesh,
  step: int | None = None,
  model_factory: FactoryFor | None = None,
  params_only_gb: int | None = None,
) -> tuple[ModelSpec, Any, dict[str, Any]]:
  """(spec, parameters sharded on `mesh`, checkpoint meta) of the latest (or `step`'s) checkpoint of `workdir`.

  The model is the workdir's language model unless `model_factory(lora)` builds another (e.g. a reward model).
  A LoRA workdir comes back merged (`load_params`): the spec is the plain model's.
  """
  factory_for = model_factory or (lambda lora: lm_factory(read_model_config(workdir), lora))
  spec = model_spec(factory_for(None), mesh)
  params, meta = load_params(workdir, spec, mesh, step, factory_for, params_only_gb)
  return spec, params, meta


def load_params(
  workdir: str,
  spec: ModelSpec,
  mesh: Mesh,
  step: int | None = None,
  model_factory: FactoryFor | None = None,
  params_only_gb: int | None = None,
) -> tuple[Any, dict[str, Any]]:
  """(parameters laid out as `spec`, a plain model's; meta) of `workdir`'s latest (or `step`'s) checkpoint.

  A LoRA checkpoint holds the adapters (and any head trained beside them) and names its base workdir and step
  (meta "lora"): the base is loaded (itself merged, if it is a LoRA workdir too), checked to be the one the
  adapters were trained on, and W + (alpha/rank)·A·B is returned. A missing or replaced base: one UserError.
  """
  record = (ckpt_lib.workdir_meta(workdir, step) or {}).get("lora")
  if not record:
    return ckpt_lib.restore_params(workdir, spec.abstract_params, step, params_only_gb)
  lora_lib.check_base_exists(workdir, record)
  lora = lora_lib.from_record(record)
  factory_for = model_factory or (lambda lora: lm_factory(read_model_config(workdir), lora))
  adapted = model_spec(factory_for(lora), mesh)
  trainable, meta = ckpt_lib.restore_params(workdir, adapted.split(adapted.abstract_params)[0], step, params_only_gb)
  record = meta["lora"]  # The checkpoint restored (a newer unreadable one may have been skipped).
  base = load_base(workdir, record, mesh)
  frozen = lora_lib.place_base(base, adapted.frozen, adapted.lora_prefixes)
  merge = jax.jit(lambda t, f: lora_lib.merge(adapted.join(t, f), lora), out_shardings=spec.param_shardings)
  return merge(trainable, frozen), meta


def load_base(workdir: str, record: dict, mesh: Mesh) -> Any:
  """The base language model a LoRA workdir's meta names (its recorded step), checked against its fingerprint."""
  base, step = record["base"], record["base_step"]
  lora_lib.check_base_exists(workdir, record)
  try:
    base_cfg = read_model_config(base)
  except UserError as e:
    raise UserError(f"{workdir}: its LoRA base {base} does not load ({e})") from None
  if dataclasses.asdict(base_cfg) != dataclasses.asdict(read_model_config(workdir)):
    raise UserError(f"{workdir}: its LoRA base {base} now describes another model: was it replaced?")
  steps = ckpt_lib.Checkpointer(base, create=False)
  try:
    available = steps.all_steps()
  finally:
    steps.close()
  if step not in available:
    raise UserError(
      f"{workdir} holds LoRA adapters of {base} step {step}, which is gone (its checkpoints: {available}): "
      "restore it, or train the adapters again"
    )
  spec = model_spec(lm_factory(base_cfg), mesh)
  params, _ = load_params(base, spec, mesh, step)
  lora_lib.check_base_fingerprint(workdir, record, params)
  return params
