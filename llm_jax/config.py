"""Config helpers: the model-override template, preset resolution and whole-config validation.

Validation runs before anything is compiled or loaded, and a bad value raises one `UserError` naming the
field, e.g. "model.num_heads=5 must divide model.d_model=64".
"""

from __future__ import annotations

import dataclasses
import math
import typing

import ml_collections
from ml_collections import config_dict

from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.model import PRESETS, ModelConfig

_FIELD_TYPES = typing.get_type_hints(ModelConfig)
_CHOICES = {name: typing.get_args(t) for name, t in _FIELD_TYPES.items() if typing.get_origin(t) is typing.Literal}
DTYPES = ("float32", "bfloat16", "float16")


def model_overrides() -> ml_collections.ConfigDict:
  """One unset placeholder per ModelConfig field, so `--config.model_overrides.num_layers=4` type-checks."""
  return ml_collections.ConfigDict(
    {name: config_dict.placeholder(str if name in _CHOICES else t) for name, t in _FIELD_TYPES.items()}
  )


def resolve_model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """The preset named by `config.model`, with `config.model_overrides` applied.

  `vocab_size` (the tokenizer's, rounded up to a multiple of 64) replaces the preset's unless the user set
  `model_overrides.vocab_size` themselves.
  """
  if config.model not in PRESETS:
    raise UserError(f"model={config.model!r}: unknown preset; choose one of {sorted(PRESETS)}")
  overrides = {k: v for k, v in config.model_overrides.items() if v is not None}
  if vocab_size is not None and "vocab_size" not in overrides:
    overrides["vocab_size"] = -(-vocab_size // 64) * 64
  try:
    cfg = dataclasses.replace(PRESETS[config.model], **overrides)
  except TypeError as e:
    raise UserError(f"model_overrides: {e}") from None
  validate_model_config(cfg)
  if vocab_size is not None and cfg.vocab_size < vocab_size:
    raise UserError(
      f"model_overrides.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})"
    )
  return cfg


def validate_model_config(cfg: ModelConfig) -> None:
  def bad(field: str, message: str):
    raise UserError(f"model.{field}={getattr(cfg, field)!r} {message}")

  for field, choices in _CHOICES.items():
    if getattr(cfg, field) not in choices:
      bad(field, f"must be one of {list(choices)}")
  for field in ("dtype", "param_dtype"):
    if getattr(cfg, field) not in DTYPES:
      bad(field, f"must be one of {list(DTYPES)}")
  for field in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff", "max_seq_len"):
    if getattr(cfg, field) <= 0:
      bad(field, "must be positive")
  if cfg.head_dim < 0:
    bad("head_dim", "must be positive (or 0 for d_model // num_heads)")
  if not cfg.head_dim and cfg.d_model % cfg.num_heads:
    bad("num_heads", f"must divide model.d_model={cfg.d_model} (or set model.head_dim)")
  if cfg.num_heads % cfg.num_kv_heads:
    bad("num_kv_heads", f"must divide model.num_heads={cfg.num_heads}")
  if cfg.position == "rope" and cfg.resolved_head_dim % 2:
    bad("head_dim", "must be even for RoPE")


def validate_training_config(
  config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, model_cfg: ModelConfig | None = None
) -> tuple[ModelConfig, tuple[int, int, int, int]]:
  """Checks every training field that does not need the data; returns the model config and mesh shape (in
  `sharding.MESH_AXES` order: data, fsdp, sequence, tensor).

  The model is `config.model` with its overrides, or `model_cfg` for stages that continue an earlier model.
  """
  if model_cfg is None:
    model_cfg = resolve_model_config(config)
  positive = (
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "steps_per_call",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
  )
  for field in positive:
    if config.get(field, 1) <= 0:  # (steps_per_call: configs written before it have none)
      raise UserError(f"{field}={config[field]} must be positive")
  if "eval_batches" in config and config.eval_batches < 0:
    raise UserError(f"eval_batches={config.eval_batches} must be >= 0 (0: the whole held-out split)")
  if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
    raise UserError(f"learning_rate={config.learning_rate} must be positive and finite")
  if not 0 <= config.warmup_steps <= config.steps:
    raise UserError(f"warmup_steps={config.warmup_steps} must be in [0, steps={config.steps}]")
  if not 0 <= config.min_lr_ratio <= 1:
    raise UserError(f"min_lr_ratio={config.min_lr_ratio} must be in [0, 1]")
  for field in ("b1", "b2"):
    if not 0 <= config[field] < 1:
      raise UserError(f"{field}={config[field]} must be in [0, 1)")
  if config.grad_clip < 0 or config.weight_decay < 0:
    raise UserError("grad_clip and weight_decay must be >= 0")
  if config.seq_len > model_cfg.max_seq_len:
    raise UserError(f"seq_len={config.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  if "tokenizer" in config.data and config.data.tokenizer not in ("char", "spm"):
    raise UserError(f"data.tokenizer={config.data.tokenizer!r} must be 'char' or 'spm'")
  for field in ("num_threads", "prefetch"):
    if field in config.data and config.data[field] < -1:
      raise UserError(f"data.{field}={config.data[field]} must be >= 0, or -1 (chosen by the kind of data)")
  if not 0 <= config.data.eval_fraction < 1:
    raise UserError(f"data.eval_fraction={config.data.eval_fraction} must be in [0, 1)")
  validate_harness_eval(config)
  shape = sharding.config_mesh_shape(config.mesh, num_devices)
  shards = shape[0] * shape[1]
  sequence = shape[sharding.MESH_AXES.index("sequence")]
  if config.seq_len % sequence:
    raise UserError(
      f"seq_len={config.seq_len} must be divisible by mesh.sequence={sequence} (context parallelism splits each "
      "row's tokens evenly over the sequence axis)"
    )
  if config.batch_size % (shards * config.grad_accum):
    raise UserError(
      f"batch_size={config.batch_size} must be divisible by mesh.data*mesh.fsdp*grad_accum = "
      f"{shards}*{config.grad_accum}"
    )
  if config.batch_size % process_count:
    raise UserError(f"batch_size={config.batch_size} must be divisible by the process count {process_count}")
  if shards % process_count:  # Each process feeds its own rows: its devices must hold whole batch shards.
    raise UserError(
      f"mesh.data*mesh.fsdp = {shards} must be a multiple of the process count {process_count} "
      "(each process feeds its own rows of the batch)"
    )
  return model_cfg, shape


# ----------------------------------------------------------------------------------------------------------
# The blocks every stage's config file shares (configs/*.py call these; they are read by llm_jax.train.loop).


def add_optimizer(
  config: ml_collections.ConfigDict,
  *,
  steps: int,
  learning_rate: float,
  warmup_steps: int,
  min_lr_ratio: float = 0.1,
  weight_decay: float = 0.0,
  b2: float = 0.95,
  steps_per_call: int = 1,
) -> None:
  """AdamW with linear warmup and cosine decay to learning_rate * min_lr_ratio at `steps` (update k uses the
  schedule's value at k); global-norm clipping (0 = off); `grad_accum` microbatches per update; `steps_per_call`
  updates per jitted call (supervised stages; best a divisor of the log/eval/checkpoint intervals)."""
  config.steps = steps
  config.learning_rate = learning_rate
  config.warmup_steps = warmup_steps
  config.min_lr_ratio = min_lr_ratio
  config.weight_decay = weight_decay
  config.b1 = 0.9
  config.b2 = b2
  config.grad_clip = 1.0
  config.grad_accum = 1
  # Updates per jitted call (supervised stages): a scan over that many batches, which saves small models the
  # per-step dispatch and host round trip. Calls never span a log/eval/checkpoint boundary: same results.
  config.steps_per_call = steps_per_call
  config.seed = 0


def add_mesh(config: ml_collections.ConfigDict) -> None:
  """Mesh axes data × fsdp × sequence × tensor; they multiply to the device count, -1 fills. `sequence` > 1 is
  context parallelism (each row's tokens split over it; seq_len must be divisible by it; training only)."""
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))


def add_lora(config: ml_collections.ConfigDict, targets: str = "all") -> None:
  """LoRA adapters (llm_jax/lora.py): `lora.rank` (0 = off: full fine-tuning), `lora.alpha` (updates scaled by
  alpha / rank) and `lora.targets`, comma-separated projections q, k, v, o, mlp_in, mlp_gate, mlp_out or the
  groups attention, mlp, all. Only the adapters (and heads) train; checkpoints hold them and name the base."""
  config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=targets))


def add_data_loading(data: ml_collections.ConfigDict) -> None:
  """Grain's read threads and batches in flight; -1 = by the data (`loop.read_options`): in memory 1 thread and
  4 batches; prepared data (ArrayRecord shards) `prepared.READ_THREADS` threads and as many batches, so that
  reads waiting on storage overlap (a waiting thread uses no core)."""
  data.num_threads = -1
  data.prefetch = -1


def add_cadence(
  config: ml_collections.ConfigDict,
  *,
  log_every: int,
  checkpoint_every: int,
  keep_checkpoints: int = 3,
  eval_every: int | None = None,
  eval_batches: int | None = None,
) -> None:
  """How often a run logs, evaluates (`eval_batches` = 0: the whole held-out split) and checkpoints."""
  config.log_every = log_every
  if eval_every is not None:
    config.eval_every = eval_every
    config.eval_batches = eval_batches
  config.checkpoint_every = checkpoint_every
  config.keep_checkpoints = keep_checkpoints


def add_harness_eval(config: ml_collections.ConfigDict) -> None:
  """lm-evaluation-harness tasks run inside training on the live parameters (needs the `eval` extra), logged as
  `harness/<task>/<metric>` to metrics.jsonl and TensorBoard: `eval_tasks` comma-separated names ("" = off),
  every `eval_tasks_every` steps (0 = at every evaluation) and at the end."""
  config.eval_tasks = ""
  config.eval_tasks_every = 0
  config.eval_tasks_limit = 0  # Examples per task; 0 = all.
  config.eval_tasks_num_fewshot = -1  # -1 = each task's own.
  config.eval_tasks_batch_size = 16
  config.eval_tasks_include_path = ""  # Extra task YAML; the repo's world-facts tasks are always found.


def validate_harness_eval(config: ml_collections.ConfigDict) -> None:
  if not config.get("eval_tasks"):
    return
  for field in ("eval_tasks_every", "eval_tasks_limit"):
    if config[field] < 0:
      raise UserError(f"{field}={config[field]} must be >= 0")
  if config.eval_tasks_batch_size < 1:
    raise UserError(f"eval_tasks_batch_size={config.eval_tasks_batch_size} must be >= 1")
