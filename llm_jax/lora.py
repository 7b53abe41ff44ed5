"""LoRA plumbing shared by the fine-tuning stages (SFT, reward model, RLHF; DPO calls the same few functions).

The adapters are flax's own `nnx.LoRA` modules inside the model (llm_jax/model.py: `Transformer(cfg, lora=...)`),
x·W + (alpha/rank)·x·A·B with B zero-initialized. Everything else is here:

    from_config(config)           `config.lora` (config.add_lora; rank 0 = off) → a `LoraConfig` or None
    frozen_layout(model)          which parameters a LoRA model does not train: its transformers' own weights
    split / join                  a parameter tree ↔ (trainable, frozen) by those paths (no copies)
    base_record(workdir, params)  the checkpoint meta naming the base: {"base", "base_step", "base_fingerprint",
                                  "rank", "alpha", "targets"}
    check_base(...)               a base that is missing or no longer the one trained on: one UserError
    merge(params, lora)           W + scale·A·B for every adapter, adapters dropped: a plain model's parameters

A stage with LoRA builds its model with `lora=from_config(config)`, starts from the base's parameters, and puts
`{"lora": base_record(...)}` in its checkpoint meta; `loop.Trainer` then trains and saves only the trainable part
(adapters, and heads outside the transformer) and `modeling.load_model` merges a LoRA workdir into its base.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm_jax.errors import UserError
from llm_jax.model import LORA_TARGETS, LoraConfig, Transformer

Path = tuple[Any, ...]

TARGET_GROUPS = {
  "attention": ("q", "k", "v", "o"),
  "mlp": ("mlp_in", "mlp_gate", "mlp_out"),
  "all": tuple(LORA_TARGETS),
}


def parse_targets(text: str) -> tuple[str, ...]:
  names: list[str] = []
  for part in (p.strip() for p in text.split(",")):
    if not part:
      continue
    group = TARGET_GROUPS.get(part, (part,))
    for name in group:
      if name not in LORA_TARGETS:
        choices = list(LORA_TARGETS) + list(TARGET_GROUPS)
        raise UserError(f"lora.targets={text!r}: unknown target {part!r}; choose from {choices}")
      if name not in names:
        names.append(name)
  if not names:
    raise UserError(f"lora.targets={text!r}: name at least one projection (e.g. 'all' or 'attention')")
  return tuple(n for n in LORA_TARGETS if n in names)  # Canonical order: the same targets compare equal.


def from_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
  lora = config.get("lora")
  if lora is None or lora.rank == 0:
    return None
  if lora.rank < 0:
    raise UserError(f"lora.rank={lora.rank} must be >= 0 (0: full fine-tuning)")
  if not lora.alpha > 0:
    raise UserError(f"lora.alpha={lora.alpha} must be positive")
  return LoraConfig(int(lora.rank), float(lora.alpha), parse_targets(lora.targets))


def from_record(record: dict) -> LoraConfig:
  return LoraConfig(int(record["rank"]), float(record["alpha"]), tuple(record["targets"]))


# ----------------------------------------------------------------------------------------------------------
# Trainable and frozen parameters.


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
  """A nested dict of parameters → {path: leaf} (only dicts are descended: PartitionSpecs are leaves)."""
  out: dict[Path, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: dict[Path, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def frozen_layout(model: nnx.Module) -> tuple[frozenset[Path], tuple[Path, ...]]:
  """(paths of the frozen parameters, paths of the transformers with adapters) of a model (abstract or not).

  Frozen: every parameter of a transformer built with LoRA except its adapters. A model without LoRA has none.
  Parameters outside the transformers (a reward or value head) stay trainable.
  """
  prefixes = tuple(
    tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, Transformer) and node.lora is not None
  )
  if not prefixes:
    return frozenset(), ()
  adapters = set(flatten(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))))
  paths = flatten(nnx.to_pure_dict(nnx.state(model)))
  frozen = {p for p in paths if p not in adapters and any(p[: len(q)] == q for q in prefixes)}
  return frozenset(frozen), prefixes


def split(tree: dict, frozen: frozenset[Path]) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of a parameter tree (or of its shardings / abstract arrays)."""
  if not frozen:
    return tree, {}
  flat = flatten(tree)
  return (
    unflatten({p: v for p, v in flat.items() if p not in frozen}),
    unflatten({p: v for p, v in flat.items() if p in frozen}),
  )


def join(trainable: dict, frozen: dict) -> dict:
  if not frozen:
    return trainable
  return unflatten({**flatten(frozen), **flatten(trainable)})


def place_base(base: dict, frozen: frozenset[Path], prefixes: tuple[Path, ...]) -> dict:
  """The frozen tree of a LoRA model whose transformers (at `prefixes`) all start from the LM parameters `base`."""
  flat_base, out = flatten(base), {}
  for path in frozen:
    prefix = next(q for q in prefixes if path[: len(q)] == q)
    out[path] = flat_base[path[len(prefix) :]]
  return unflatten(out)


# ----------------------------------------------------------------------------------------------------------
# Merging.


def merge(params: dict, lora: LoraConfig) -> dict:
  """W + (alpha/rank)·A·B for every adapter `lora_<target>` beside its weight; the adapters are dropped.

  Works on stacked (scanned) layers too: A [..., in, r], B [..., r, out] give [..., in, out], reshaped to the
  weight's shape. Computed in float32, stored in the weight's dtype.
  """
  out = {}
  for key, value in params.items():
    if isinstance(key, str) and key.startswith("lora_") and isinstance(value, dict) and "lora_a" in value:
      continue
    out[key] = merge(value, lora) if isinstance(value, dict) else value
  for target, weight_name in LORA_TARGETS.items():
    adapter = params.get(f"lora_{target}")
    if adapter is None:
      continue
    weight = params[weight_name]
    delta = jnp.einsum(
      "...ir,...ro->...io", adapter["lora_a"].astype(jnp.float32), adapter["lora_b"].astype(jnp.float32)
    )
    out[weight_name] = (weight.astype(jnp.float32) + lora.scale * delta.reshape(weight.shape)).astype(weight.dtype)
  return out


# ----------------------------------------------------------------------------------------------------------
# The base a LoRA workdir refers to.


def fingerprint(params: dict) -> float:
  """Σ|x| over the parameters in float32: a base replaced by another model (same shapes) changes it."""
  return float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params)))


def base_record(lora: LoraConfig, base_workdir: str, base_step: int, base_params: dict) -> dict:
  """The checkpoint meta of a LoRA run: which base it adapts (workdir, step, fingerprint) and the adapters."""
  return {
    "base": os.path.abspath(base_workdir),
    "base_step": int(base_step),
    "base_fingerprint": fingerprint(base_params),
    "rank": lora.rank,
    "alpha": lora.alpha,
    "targets": list(lora.targets),
  }


def check_base_exists(workdir: str, record: dict) -> None:
  """Before loading: the base workdir named by a LoRA checkpoint is there."""
  base = record.get("base", "")
  if not base or not os.path.isdir(base):
    raise UserError(
      f"{workdir} holds LoRA adapters of the base model {base or '(none recorded)'}, which is missing: "
      "restore that workdir (its adapters are useless without it)"
    )


def check_base_fingerprint(workdir: str, record: dict, base_params: dict) -> None:
  """After loading: the base still holds the weights the adapters were trained on."""
  expected, found = record.get("base_fingerprint"), fingerprint(base_params)
  if expected is not None and abs(found - expected) > 1e-4 * max(abs(expected), 1.0):
    raise UserError(
      f"{workdir} holds LoRA adapters of {record['base']} step {record['base_step']}, but that checkpoint "
      f"now holds other weights (fingerprint {found:.6g}, trained on {expected:.6g}): was the base replaced?"
    )


def check_same_base(workdir: str, saved: dict, current: dict) -> None:
  """A resumed LoRA run continues on the base (and adapters) it started with."""
  keys = ("base", "base_step", "rank", "alpha", "targets")
  changed = [k for k in keys if saved.get(k) != current.get(k)]
  if changed:
    raise UserError(
      f"{workdir}: its LoRA checkpoints were trained with {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; "
      f"this run has {', '.join(f'{k}={current.get(k)!r}' for k in changed)}: use a new workdir"
    )
  expected, found = saved.get("base_fingerprint"), current.get("base_fingerprint")
  if expected is not None and found is not None and abs(found - expected) > 1e-4 * max(abs(expected), 1.0):
    raise UserError(
      f"{workdir}: its LoRA adapters were trained on {saved['base']} step {saved['base_step']}, which now holds "
      "other weights: was the base replaced?"
    )
