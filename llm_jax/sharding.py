"""All sharding decisions in one place: the mesh, the logical-axis rules, and batch placement.

The mesh has four named axes, outermost first:
  data      pure data parallelism (parameters replicated),
  fsdp      data parallelism with parameters and optimizer state sharded on their "embed" dimension,
  sequence  context parallelism: each row's tokens split along the sequence (activations [B, L, ...] have L
            sharded); attention all-gathers keys and values along it (model.py: `sequence_gathered`),
  tensor    Megatron-style tensor parallelism over heads, MLP width and vocabulary.
Batch rows are split over ("data", "fsdp"), their tokens over "sequence" (`token_sharding`). Parameters say which
logical axes they have (see model.py); `LOGICAL_RULES` maps each logical axis to a mesh axis (no parameter is
sharded on "sequence": it holds whole replicas, like "data"). Everything else follows from `jax.jit` with these
shardings: XLA inserts the all-gathers and reduce-scatters.

Axis order: tensor is innermost because its collectives (an all-reduce per matmul) are the most frequent and
latency-bound, so its devices should be nearest (jax.make_mesh lays the last axis on the closest chips); sequence
comes next (one K/V all-gather per layer, larger but overlappable), then the data axes whose gradient
reduce-scatters happen once per step.

Decoding (the KV-cache sampler) never shards the sequence: on a mesh with sequence > 1 it runs replicated over that
axis, and the decoding tools (generate, lm_eval) and RLHF refuse such a mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

LOGICAL_RULES: dict[str | None, str | tuple[str, ...] | None] = {
  "batch": BATCH_AXES,
  "length": SEQUENCE_AXIS,
  "vocab": "tensor",
  "embed": "fsdp",
  "mlp": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "layers": None,
  None: None,
}


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, sequence: int = 1) -> tuple[int, int, int, int]:
  """Resolves one `-1` axis to "the rest of the devices"; checks the product equals `num_devices`.

  Returns the sizes in mesh order (MESH_AXES): (data, fsdp, sequence, tensor).
  """
  sizes = {"data": data, "fsdp": fsdp, "sequence": sequence, "tensor": tensor}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: at most one axis may be -1, got {sizes}")
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise UserError(f"mesh.{name}={size}: axis sizes must be positive or -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      raise UserError(f"mesh: {sizes} cannot fill {num_devices} devices ({num_devices} is not a multiple of {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise UserError(
      f"mesh: data*fsdp*sequence*tensor = {math.prod(sizes.values())} but there are {num_devices} devices "
      f"({sizes}); use -1 for one axis to fill"
    )
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, sequence: int = 1) -> Mesh:
  """The mesh over `devices` (default: all); positional arguments keep the historical (data, fsdp, tensor) order."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices), sequence)
  # Auto axes: jit propagates shardings (Explicit axes make sharded nnx.Embed lookups a type error).
  return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def config_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int, int]:
  """`mesh_shape` for a config's `mesh` block; a block without `sequence` (older configs) means 1."""
  return mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, num_devices, mesh_config.get("sequence", 1))


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  """`make_mesh` for a config's `mesh` block (data, fsdp, tensor and, optionally, sequence)."""
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices, mesh_config.get("sequence", 1))


def sequence_shards(mesh: Mesh) -> int:
  return mesh.shape.get(SEQUENCE_AXIS, 1)


def refuse_sequence_sharding(mesh: Mesh, what: str) -> None:
  """A UserError for the paths that do not shard the sequence (decoding with a KV cache)."""
  if sequence_shards(mesh) > 1:
    raise UserError(
      f"{what} does not shard the sequence: mesh.sequence={sequence_shards(mesh)} must be 1 "
      "(context parallelism is for training and full forward passes)"
    )


def logical_to_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """Maps logical axis names to a PartitionSpec; a dimension the mesh axis does not divide stays replicated."""
  spec = []
  used: set[str] = set()
  for name, dim in zip(names, shape):
    axes = LOGICAL_RULES.get(name)
    if axes is None:
      spec.append(None)
      continue
    axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes_tuple)
    if dim % size or used & set(axes_tuple):
      spec.append(None)  # e.g. 8 kv heads on a 16-way tensor axis: replicate rather than fail.
      continue
    used |= set(axes_tuple)
    spec.append(axes)
  return P(*spec)


def tree_shardings(abstract_tree: Any, logical_names: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of arrays, given the same tree of logical-name PartitionSpecs."""
  return jax.tree.map(
    lambda x, names: NamedSharding(mesh, logical_to_spec(tuple(names), x.shape, mesh)),
    abstract_tree,
    logical_names,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def token_spec(mesh: Mesh, shape: tuple[int, ...]) -> P:
  """[B, L, ...]: rows over ("data", "fsdp"), tokens over "sequence" where it divides L (else replicated)."""
  if len(shape) < 2 or sequence_shards(mesh) == 1 or shape[1] % sequence_shards(mesh):
    return P(BATCH_AXES, *([None] * (len(shape) - 1)))
  return P(BATCH_AXES, SEQUENCE_AXIS, *([None] * (len(shape) - 2)))


def token_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Where a batch field [B, L, ...] lives: `token_spec`. The same as `batch_sharding` when mesh.sequence is 1."""
  return NamedSharding(mesh, token_spec(mesh, tuple(shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays (process order = row order), rows sharded on the batch axes
  and tokens on "sequence" (`token_sharding`). Each process feeds whole rows: its devices hold whole sequence
  groups, as the mesh puts "sequence" inside the batch axes and config validation makes every process hold whole
  batch shards."""
  return {
    k: jax.make_array_from_process_local_data(token_sharding(mesh, np.shape(v)), v) for k, v in local_batch.items()
  }


def stacked_global_batch(local_batches: list[dict[str, np.ndarray]], mesh: Mesh) -> dict[str, jax.Array]:
  """Several consecutive `global_batch`es stacked on a new leading axis (one call of several training steps):
  each [B, L, ...] slice is placed as `global_batch` places it."""
  stacked = {k: np.stack([b[k] for b in local_batches]) for k in local_batches[0]}
  return {
    k: jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, *token_spec(mesh, v.shape[1:]))), v)
    for k, v in stacked.items()
  }


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Explicit arguments win; otherwise JAX's own auto-detection (TPU pods, SLURM, or the JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables) decides. A single plain process does nothing.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if not coordinator_address and num_processes <= 1:
    return
  if num_processes and not 0 <= process_id < num_processes:
    raise UserError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only used when the platform is CPU.
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
