"""Fused attention kernels, chosen per platform: Pallas splash attention (TPU), cuDNN (GPU), written-out XLA (CPU).

`ModelConfig.attention_impl` names one: "xla" (model.attention, materialises [B, N, L, S] scores), "cudnn"
(`jax.nn.dot_product_attention(implementation="cudnn")`, needs bf16/fp16), "splash" (Pallas splash attention,
`jax.experimental.pallas.ops.tpu.splash_attention`; interpreted off TPU, for tests) or "auto" (the default):
splash on TPU, cuDNN on GPU for bf16/fp16 models, xla otherwise (CPU, and float32 on GPU, which cuDNN refuses).
The platform is read when the step is traced, from the mesh it is traced under (`jax.set_mesh`): an ahead-of-time
compile on a CPU box for a TPU topology traces under a mesh of TPU devices and so gets splash.

Only full forward passes (training, prefill) use a fused kernel. The one-token decode step against the KV cache
stays on `model.attention`, which reads the cache's [B, K, S, H] layout in place (a fused kernel would need it
transposed every step, and a paged/ragged decode kernel is out of scope).

What splash computes: causal by *index* within the row, and same segment id. The project's mask
(`model.attention_mask`) is same segment and causal by *position*. They agree on every query that is a real token
because every row the project builds (packing, left-padded prompts, RL/SFT/DPO rows) numbers a segment's positions
0, 1, 2, ... left to right, so within a segment position order is index order. They differ only on padding rows
(segment 0, positions clamped to 0 or to the last real position): there the project's mask lets a pad see
later pads, splash does not. Pads are never attended by real tokens and never trained on, so logits and gradients
of real tokens are the same; the outputs at pad positions are not (both are finite: every row sees itself).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# The mesh axes (llm_jax.sharding; not imported: the model stays mesh-agnostic). "sequence" (context parallelism)
# is optional: a mesh without it works.
_BATCH_AXES, _HEAD_AXIS, _SEQUENCE_AXIS = ("data", "fsdp"), "tensor", "sequence"
_LANES = 128  # Splash blocks are multiples of 128 tokens.
_BLOCKS = (512, 256, 128)  # Largest first: MaxText's default block is 512.


def trace_platform() -> str:
  """ "tpu", "gpu" or "cpu": the platform of the mesh being traced under, else of the default device."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.devices()[0].platform


def resolve(impl: str, dtype, platform: str | None = None) -> str:
  """The implementation `impl` stands for on `platform` (default: `trace_platform()`); "auto" decides."""
  if impl != "auto":
    return impl
  platform = platform or trace_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def _mesh_axis(mesh, name: str) -> int:
  return mesh.shape[name] if not mesh.empty and name in mesh.axis_names else 1


def _block(length: int) -> int:
  return next(b for b in _BLOCKS if length % b == 0)


def _make_kernel(num_heads: int, length: int, q_block: int, kv_block: int, head_shards: int, q_shards: int, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  blocks = splash.BlockSizes(
    block_q=q_block,
    block_kv=kv_block,
    block_kv_compute=kv_block,
    block_q_dkv=q_block,
    block_kv_dkv=kv_block,
    block_kv_dkv_compute=kv_block,
    block_q_dq=q_block,
    block_kv_dq=kv_block,
  )
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  return splash.make_splash_mha(
    mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=q_shards, interpret=interpret
  )


def splash_attention(
  q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array, segment_ids_BL: jax.Array, *, interpret: bool | None = None
) -> jax.Array:
  """Causal self-attention over packed documents with Pallas splash attention: [B, L, N, H] out.

  k/v are the queries' own tokens (L keys); K < N heads is grouped-query attention (query head i reads K/V head
  i // (N/K), as `model.attention`). q is scaled by 1/sqrt(H) here (splash does not scale). L is padded up to a
  multiple of 128 (× the sequence shards) with segment-0 tokens after the row's end, which no real token sees
  (causal) and which are sliced off. `interpret` (default: off TPU) runs the kernel as plain JAX ops, for tests.

  Under a mesh (traced inside `jax.set_mesh`) the kernel runs in a `shard_map`: batch over ("data", "fsdp"),
  heads over "tensor", and, if the mesh has a "sequence" axis, queries over it with K/V replicated along it (the
  kernel's `q_seq_shards` and `manual_sharding_spec`, as MaxText's `tpu_flash_attention`). An axis that does not
  divide its dimension is left replicated.
  """
  b, l, n, h = q_BLNH.shape
  k = k_BLKH.shape[2]
  if interpret is None:
    interpret = trace_platform() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = tuple(a for a in _BATCH_AXES if _mesh_axis(mesh, a) > 1)
  batch_shards = math.prod(_mesh_axis(mesh, a) for a in batch_axes)
  batch_spec = batch_axes if batch_axes and b % batch_shards == 0 else None
  head_shards = _mesh_axis(mesh, _HEAD_AXIS)
  if n % head_shards:
    head_shards = 1
  q_shards = _mesh_axis(mesh, _SEQUENCE_AXIS)
  head_spec = _HEAD_AXIS if head_shards > 1 else None
  seq_spec = _SEQUENCE_AXIS if q_shards > 1 else None

  if k % head_shards:  # K/V heads can't follow their query heads' shards: give every query head its own.
    k_BLKH, v_BLKH = jnp.repeat(k_BLKH, n // k, axis=2), jnp.repeat(v_BLKH, n // k, axis=2)
  q_BLNH = q_BLNH * jnp.asarray(1 / math.sqrt(h), q_BLNH.dtype)
  pad = -l % (_LANES * q_shards)
  padded = l + pad
  heads_first = lambda x_BLXH: jnp.pad(x_BLXH, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q_BNLH, k_BKLH, v_BKLH = heads_first(q_BLNH), heads_first(k_BLKH), heads_first(v_BLKH)
  segment_ids_BL = jnp.pad(segment_ids_BL.astype(jnp.int32), ((0, 0), (0, pad)))  # Segment 0 = padding.

  kernel = _make_kernel(
    n, padded, _block(padded // q_shards), _block(padded), head_shards, q_shards, interpret=interpret
  )

  def run(kernel, q_BNLH, k_BKLH, v_BKLH, q_segment_ids_BL, kv_segment_ids_BL):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    segments = splash.SegmentIds(q_segment_ids_BL, kv_segment_ids_BL)
    return jax.vmap(kernel)(q_BNLH, k_BKLH, v_BKLH, segments)

  if mesh.empty or mesh.size == 1:
    out_BNLH = run(kernel, q_BNLH, k_BKLH, v_BKLH, segment_ids_BL, segment_ids_BL)
  else:
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(head_spec, seq_spec)))
    q_spec, kv_spec = P(batch_spec, head_spec, seq_spec, None), P(batch_spec, head_spec, None, None)
    out_BNLH = jax.shard_map(
      run,
      mesh=mesh,
      in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, P(batch_spec, seq_spec), P(batch_spec, None)),
      out_specs=q_spec,
      check_vma=False,  # Pallas calls carry no varying-axes rules.
    )(kernel, q_BNLH, k_BKLH, v_BKLH, segment_ids_BL, segment_ids_BL)
  return out_BNLH.transpose(0, 2, 1, 3)[:, :l]
