"""The decoder-only transformer (flax NNX), in one file.

One `Transformer` covers GPT-2 (learned positions, LayerNorm, GELU, tied head) and Llama (RoPE, RMSNorm,
SwiGLU, grouped-query attention, untied head); `ModelConfig` picks the pieces and `PRESETS` names the
configurations used by the project.

Shape suffixes: B batch, L sequence (queries), S sequence (keys), D model width, N query heads,
K key/value heads, H head dim, F MLP width, V vocabulary, T tokens (B·L, flattened for 2-D matmuls).

Every parameter carries logical axis names (`out_sharding` metadata: "vocab", "embed", "mlp", "heads",
"kv_heads", "head_dim", "layers"); `llm_jax.sharding` maps them onto the mesh. The model itself never
mentions a mesh: `jax.jit` with sharded inputs places the computation.

`backbone()` returns hidden states and `logits()` applies the LM head, so reward and value heads attach to the
backbone without touching this file.

LoRA (`Transformer(cfg, lora=LoraConfig(...))`): each targeted projection W gets a flax `nnx.LoRA` adapter
beside it, named `lora_<target>`, and computes x·W + (alpha/rank)·x·A·B. B starts at zero, so a fresh adapter
computes exactly the base model. Merging (llm_jax/lora.py) folds the adapter into W.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax import attention_kernels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: Literal["transformer"] = "transformer"  # The module that builds it (modeling.MODEL_FAMILIES).
  vocab_size: int = 264
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4  # < num_heads: grouped-query attention.
  head_dim: int = 0  # 0: d_model // num_heads.
  d_ff: int = 256
  max_seq_len: int = 128  # Size of the learned position table; the longest sequence the model accepts.
  position: Literal["learned", "rope"] = "learned"
  rope_theta: float = 10_000.0
  # Llama 3.1's long-context RoPE frequencies ("llama3": low frequencies divided by `rope_scaling_factor`, a
  # smooth ramp between the bands set by the low/high frequency factors and the original context length).
  rope_scaling: Literal["none", "llama3"] = "none"
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_eps: float = 1e-5
  mlp: Literal["gelu", "swiglu"] = "gelu"
  gelu_approximate: bool = True  # The tanh approximation (GPT-2's "gelu_new"); False: the exact erf GELU.
  use_bias: bool = False  # Biases on every projection and LayerNorm (GPT-2).
  qkv_bias: bool = False  # Biases on the query, key and value projections only (Qwen2).
  tie_embeddings: bool = True
  dtype: str = "float32"  # Compute dtype of activations and matmuls.
  param_dtype: str = "float32"  # Storage dtype of parameters (and so of the optimizer state).
  # "auto": splash on TPU, cuDNN on GPU (bf16/fp16), "xla" (the written-out attention()) otherwise; each can be
  # forced. Full forward passes only: the decode step is always attention(). llm_jax/attention_kernels.py.
  attention_impl: Literal["auto", "xla", "cudnn", "splash"] = "auto"
  remat: Literal["none", "full", "dots"] = "none"  # Recompute each block in the backward pass.
  scan_layers: bool = False  # One stacked block run by a scan: compile time independent of depth.
  init_std: float = 0.02

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def num_params(self, include_position_table: bool = True) -> int:
    """Exact parameter count (checked against the instantiated model in the tests)."""
    d, f, h = self.d_model, self.d_ff, self.resolved_head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = d * f * (3 if self.mlp == "swiglu" else 2)
    norm = d * (2 if self.norm == "layernorm" and self.use_bias else 1)
    bias = 0
    if self.use_bias or self.qkv_bias:
      bias = h * (self.num_heads + 2 * self.num_kv_heads)  # q, k, v biases.
    if self.use_bias:
      bias += d + (2 * f if self.mlp == "swiglu" else f) + d  # o and MLP biases.
    per_layer = attn + mlp + 2 * norm + bias
    total = self.num_layers * per_layer + norm + self.vocab_size * d
    if not self.tie_embeddings:
      total += self.vocab_size * d
    if self.position == "learned" and include_position_table:
      total += self.max_seq_len * d
    return total

  def train_flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs per trained token: 6·N + 12·L·d_attn·T (PaLM appendix B; nanoGPT's estimate_mfu).

    N excludes the position table (a lookup, no FLOPs) and counts a tied embedding once (it is the output
    matmul). 12·L·(N·H)·T counts the attention score and value matmuls, forward and backward, with no
    discount for the causal mask.
    """
    n = self.num_params(include_position_table=False)
    return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.resolved_head_dim * seq_len


# The model sizes used by the project. Pretraining replaces `vocab_size` with the tokenizer's (rounded up).
PRESETS: dict[str, ModelConfig] = {
  # Tests: a Llama-style model with every feature switched on (RoPE, RMSNorm, SwiGLU, GQA), tiny.
  "tiny": ModelConfig(
    num_layers=2,
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    d_ff=192,
    max_seq_len=128,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    tie_embeddings=False,
  ),
  # The default pretraining run (README): learns the built-in corpus's facts in a few CPU minutes.
  "small": ModelConfig(
    num_layers=4,
    d_model=128,
    num_heads=4,
    num_kv_heads=2,
    d_ff=384,
    max_seq_len=256,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    tie_embeddings=False,
  ),
  # nanoGPT's "baby" shakespeare_char model for CPUs: 4 layers, 128 wide, 4 heads, block 64.
  "baby_char": ModelConfig(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, d_ff=512, max_seq_len=64),
  # nanoGPT's shakespeare_char model: 6 layers, 384 wide, 6 heads, block 256 (no bias, tied, GELU).
  "gpt2_char": ModelConfig(num_layers=6, d_model=384, num_heads=6, num_kv_heads=6, d_ff=1536, max_seq_len=256),
  # GPT-2 small (vocab rounded up to a multiple of 64, as nanoGPT does).
  "gpt2_124m": ModelConfig(
    vocab_size=50_304,
    num_layers=12,
    d_model=768,
    num_heads=12,
    num_kv_heads=12,
    d_ff=3072,
    max_seq_len=1024,
    use_bias=True,
  ),
  # Llama 3.2 1B shape.
  "llama_1b": ModelConfig(
    vocab_size=128_256,
    num_layers=16,
    d_model=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    d_ff=8192,
    max_seq_len=8192,
    position="rope",
    rope_theta=500_000.0,
    norm="rmsnorm",
    mlp="swiglu",
    tie_embeddings=True,
    dtype="bfloat16",
  ),
  # Llama 2 7B shape.
  "llama_7b": ModelConfig(
    vocab_size=32_000,
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=32,
    d_ff=11_008,
    max_seq_len=4096,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    tie_embeddings=False,
    dtype="bfloat16",
    remat="full",
    scan_layers=True,
  ),
}


# LoRA targets → the weight each adapts (a weight's leading axes are its input, the rest its output).
LORA_TARGETS = {
  "q": "wq_DNH",
  "k": "wk_DKH",
  "v": "wv_DKH",
  "o": "wo_NHD",
  "mlp_in": "w_in_DF",
  "mlp_gate": "w_gate_DF",
  "mlp_out": "w_out_FD",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  alpha: float
  targets: tuple[str, ...]  # Keys of LORA_TARGETS.

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _lora(
  lora: LoraConfig | None, target: str, weight: nnx.Param, in_axes: int, rngs: nnx.Rngs, dtype
) -> nnx.LoRA | None:
  """flax's LoRA adapter for `weight` (its first `in_axes` axes are the input), or None if not targeted.

  A [in, r] is sharded like the weight's input axes, B [r, out] like its output axes (flattened: the
  projections are 2-D matmuls on reshaped weights), so adapters follow every mesh the weights do.
  """
  if lora is None or target not in lora.targets:
    return None
  shape, names = weight.shape, weight.get_metadata()["out_sharding"]
  # A flattened axis keeps the sharding of its first named part (e.g. "heads" of heads × head_dim).
  flat_name = lambda part: next((n for n in part if n is not None), None)
  return nnx.LoRA(
    math.prod(shape[:in_axes]),
    lora.rank,
    math.prod(shape[in_axes:]),
    dtype=dtype,
    param_dtype=weight.dtype,
    rngs=rngs,
    a_metadata=dict(out_sharding=(flat_name(names[:in_axes]), None), eager_sharding=False),
    b_metadata=dict(out_sharding=(None, flat_name(names[in_axes:])), eager_sharding=False),
  )


def _with_lora(y_TO: jax.Array, x_TI: jax.Array, adapter: nnx.LoRA | None, lora: LoraConfig | None) -> jax.Array:
  """y + scale·x·A·B where the projection has an adapter."""
  return y_TO if adapter is None else y_TO + adapter(x_TI) * jnp.asarray(lora.scale, y_TO.dtype)


def _logical(initializer, names: tuple[str | None, ...]):
  """An initializer whose variable carries logical axis names. Arrays are placed by `jax.jit` out_shardings
  (llm_jax.sharding), never eagerly at creation, so a model can be built with or without a mesh."""
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


_BATCH_AXES = ("data", "fsdp")  # llm_jax.sharding.BATCH_AXES (not imported: the model stays mesh-agnostic).
_SEQUENCE_AXIS = "sequence"  # llm_jax.sharding.SEQUENCE_AXIS: context parallelism.


def _pin(x: jax.Array, length_axis: str | None, rest) -> jax.Array:
  """x [B, L, ...] constrained to rows over the batch axes, L over `length_axis`, the other dims `rest` — when
  traced under a mesh that has those axes (`jax.set_mesh`; see the train step) and they divide. Else x as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(_BATCH_AXES) <= set(mesh.axis_names):
    return x
  if x.shape[0] % math.prod(mesh.shape[a] for a in _BATCH_AXES):
    return x
  if x.ndim < 2:
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(_BATCH_AXES))
  if length_axis not in mesh.axis_names or mesh.shape[length_axis] == 1 or x.shape[1] % mesh.shape[length_axis]:
    length_axis = None
  return jax.lax.with_sharding_constraint(
    x, jax.sharding.PartitionSpec(_BATCH_AXES, length_axis, *([rest] * (x.ndim - 2)))
  )


def _sequence_shards() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or _SEQUENCE_AXIS not in mesh.axis_names else mesh.shape[_SEQUENCE_AXIS]


def batch_sharded(x: jax.Array) -> jax.Array:
  """Pins an activation [B, L, ...] to rows over ("data", "fsdp") and L over "sequence" (context parallelism; L
  replicated where "sequence" does not divide it, e.g. decoding's L = 1), the rest replicated. A no-op with no mesh.

  Without it XLA may keep FSDP activations sharded like the weights and compute the LM head on the whole
  global batch on every chip (measured: 31 GiB of llama_7b's 34 GiB per v5p chip).
  """
  return _pin(x, _SEQUENCE_AXIS, None)


def sequence_gathered(x_BS: jax.Array) -> jax.Array:
  """Context parallelism's attention: keys/values (or their segment ids/positions) [B, S, ...] all-gathered along
  "sequence", the head dims left to XLA (tensor parallelism). A no-op unless mesh.sequence > 1.

  All-gathered K/V rather than ring attention: it is a single collective XLA can overlap with the Q/K/V
  projections, and numerically the plain attention; the full K/V per chip, 2·S·K·H per row and layer, is small
  next to the activations with GQA (llama_7b at 128k: 2 GiB bf16 per layer-row, recomputed under remat), and
  ring attention only pays when it does not fit. MaxText's default context parallelism is an all-gather too.
  """
  return x_BS if _sequence_shards() == 1 else _pin(x_BS, None, jax.sharding.PartitionSpec.UNCONSTRAINED)


def sequence_sharded(x_BL: jax.Array) -> jax.Array:
  """Queries [B, L, ...] kept split along "sequence" (each chip attends for its own tokens), head dims free."""
  return x_BL if _sequence_shards() == 1 else _pin(x_BL, _SEQUENCE_AXIS, jax.sharding.PartitionSpec.UNCONSTRAINED)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float, dtype) -> nnx.Param:
  """A normal(0, std) parameter annotated with its logical axis names."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  kwargs = dict(
    epsilon=cfg.norm_eps,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    rngs=rngs,
    scale_init=_logical(nnx.initializers.ones_init(), ("embed",)),
  )
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, **kwargs)
  return nnx.LayerNorm(
    cfg.d_model, use_bias=cfg.use_bias, bias_init=_logical(nnx.initializers.zeros_init(), ("embed",)), **kwargs
  )


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """[H/2] float32 angular frequencies θ^(-2i/H), rescaled as `cfg.rope_scaling` says.

  Computed with jnp inside the traced model, as they always were, so models trained here keep their
  frequencies bit for bit (transformers' 1/θ^(2i/H) differs by at most one ulp in a few: ~1e-6 in logits).
  "llama3" follows transformers' `_compute_llama3_parameters` step for step, in float32: wavelengths longer
  than original_len / low_freq_factor are slowed by `factor`, shorter than original_len / high_freq_factor
  kept, and those in between interpolated.
  """
  h = cfg.resolved_head_dim
  inv_freq = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if cfg.rope_scaling == "none":
    return inv_freq
  factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  original = jnp.float32(cfg.rope_original_max_len)
  wavelen = jnp.float32(2 * math.pi) / inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < original / high) & ~(wavelen > original / low)
  return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def rope_tables(positions_BL: jax.Array, inv_freq_H2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The rotation of each position as two [B, L, H] float32 tables, (cos, cos) and (-sin, sin) on the two halves;
  a forward pass computes them once for all its layers.

  The optimization barrier keeps XLA from fusing sin/cos back into every consumer (each head of q and k, in every
  layer, forward and backward).
  """
  angle_BLH2 = positions_BL[..., None].astype(jnp.float32) * inv_freq_H2
  sin_BLH2, cos_BLH2 = jnp.sin(angle_BLH2), jnp.cos(angle_BLH2)
  tables = jnp.concatenate([cos_BLH2, cos_BLH2], -1), jnp.concatenate([-sin_BLH2, sin_BLH2], -1)
  return jax.lax.optimization_barrier(tables)


def apply_rope(
  x_BLNH: jax.Array,
  positions_BL: jax.Array,
  inv_freq_H2: jax.Array,
  tables_BLH: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Rotary embedding, "rotate half" layout: dims (i, i + H/2) form the pair rotated by angle pos·inv_freq[i].

  Written as x·(cos, cos) + roll(x, H/2)·(-sin, sin), the same products and sums as (x1·cos - x2·sin,
  x2·cos + x1·sin): XLA:CPU emits the concatenation of the two halves as a slow per-element select (measured 3x the
  time of this form over forward and backward). Compiled, the two forms agree to float32 rounding, not bit for bit
  (XLA rounds sin/cos differently in different fusions: ~4e-7 relative in the `small` model's logits).
  `tables_BLH`: `rope_tables(positions_BL, inv_freq_H2)` if the caller has it.
  """
  cos_BLH, signed_sin_BLH = tables_BLH if tables_BLH is not None else rope_tables(positions_BL, inv_freq_H2)
  x_BLNH32 = x_BLNH.astype(jnp.float32)
  swapped_BLNH = jnp.roll(x_BLNH32, x_BLNH.shape[-1] // 2, axis=-1)
  return (x_BLNH32 * cos_BLH[:, :, None, :] + swapped_BLNH * signed_sin_BLH[:, :, None, :]).astype(x_BLNH.dtype)


def attention_mask(
  q_segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array, q_positions_BL: jax.Array, kv_positions_BS: jax.Array
) -> jax.Array:
  """Who may attend to whom, [B, 1, L, S]: same document (segment) and not in the future.

  Segment 0 is padding: it is never attended by a real token (its segment differs). Causality is judged on
  positions, which restart at 0 for each document of a packed row, so it holds across documents too.
  """
  same_doc = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
  causal = q_positions_BL[:, :, None] >= kv_positions_BS[:, None, :]
  return (same_doc & causal)[:, None, :, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for decoding, and what each of the S slots holds.

  All rows write the same slot (`index`); rows of different lengths are left-padded, and a slot whose
  segment id is 0 (padding, or not yet written) is never attended. Keys/values are stored heads-first,
  [layers, B, K, S, H]: each (row, kv head) is then a contiguous [S, H] matrix, the layout both attention
  matmuls want, so a decode step reads the cache in place instead of transposing a copy of it.
  """

  k_LBKSH: jax.Array
  v_LBKSH: jax.Array
  positions_BS: jax.Array  # Position of the token in each slot.
  segment_ids_BS: jax.Array  # 1: a token of the row; 0: padding or empty.
  index: jax.Array  # int32 scalar: the next slot to write.

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.resolved_head_dim)
    zeros = jnp.zeros(shape, dtype or cfg.dtype)
    return cls(
      zeros,
      zeros,
      jnp.zeros((batch, length), jnp.int32),
      jnp.zeros((batch, length), jnp.int32),
      jnp.zeros((), jnp.int32),
    )

  def pad_to(self, length: int) -> KVCache:
    """The same cache with empty slots (segment 0, never attended) appended up to `length` slots."""
    extra = length - self.segment_ids_BS.shape[1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
    return dataclasses.replace(
      self,
      k_LBKSH=pad(self.k_LBKSH, 3),
      v_LBKSH=pad(self.v_LBKSH, 3),
      positions_BS=pad(self.positions_BS, 1),
      segment_ids_BS=pad(self.segment_ids_BS, 1),
    )

  def add_tokens(self, positions_BL: jax.Array, segment_ids_BL: jax.Array) -> KVCache:
    """Records the positions and segments of L new tokens at `index` (before the layers write K/V)."""
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), self.index, axis=1)
    return dataclasses.replace(
      self,
      positions_BS=write(self.positions_BS, positions_BL),
      segment_ids_BS=write(self.segment_ids_BS, segment_ids_BL),
    )

  def write_layer(self, layer, k_BLKH: jax.Array, v_BLKH: jax.Array) -> KVCache:
    """Writes one layer's new keys/values in place (a dynamic-update-slice of the stacked buffers)."""
    start = (layer, 0, 0, self.index, 0)
    write = lambda buf, new_BLKH: jax.lax.dynamic_update_slice(
      buf, new_BLKH.transpose(0, 2, 1, 3)[None].astype(buf.dtype), start
    )
    return dataclasses.replace(self, k_LBKSH=write(self.k_LBKSH, k_BLKH), v_LBKSH=write(self.v_LBKSH, v_BLKH))


def attention(
  q_BLNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  mask_B1LS: jax.Array,
  *,
  kv_heads_first: bool = False,
  return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Masked softmax attention; K < N heads is grouped-query attention (each K/V head serves N/K queries).

  The same math as `jax.nn.dot_product_attention(implementation="xla")` (float32 softmax), written out because
  it is faster on CPU: q is scaled on [B, L, N, H] instead of the scores on [B, N, L, S], the mask is an
  additive bias, and the softmax is normalized after the value matmul (again on [B, L, N, H]).

  `kv_heads_first`: k and v are [B, K, S, H], the KV cache's layout (decoding). The queries are then grouped,
  [B, L, K, N/K, H], so each matmul reads the cache in place: no repeated K/V and no transposed copy of the
  cache per step. On [B, S, K, H] (training, prefill) the K/V heads are repeated to N instead: with long L
  that is faster on CPU (measured ~1.5x on the fwd+bwd for baby_char/tiny/small shapes).

  `return_probs` (inspection, [B, S, K, H] only): also return the attention weights, float32 [B, N, L, S].
  """
  b, l, n, h = q_BLNH.shape
  q_BLNH = q_BLNH * jnp.asarray(1 / math.sqrt(h), q_BLNH.dtype)
  bias = lambda mask: jnp.where(mask, 0.0, -0.7 * float(jnp.finfo(jnp.float32).max))
  if kv_heads_first:
    assert not return_probs, "attention weights are captured in full forward passes only (no KV cache)"
    k = k_BSKH.shape[1]
    q_BLKGH = q_BLNH.reshape(b, l, k, n // k, h)
    logits_BKGLS = jnp.einsum("blkgh,bksh->bkgls", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits_BKGLS = logits_BKGLS + bias(mask_B1LS[:, :, None])
    exp_BKGLS = jnp.exp(logits_BKGLS - jax.lax.stop_gradient(jnp.max(logits_BKGLS, axis=-1, keepdims=True)))
    out_BLKGH = jnp.einsum("bkgls,bksh->blkgh", exp_BKGLS.astype(v_BSKH.dtype), v_BSKH)
    sum_BLKG = jnp.einsum("bkgls->blkg", exp_BKGLS)
    return (out_BLKGH / sum_BLKG[..., None]).reshape(b, l, n, h).astype(v_BSKH.dtype)
  k = k_BSKH.shape[2]
  if k != n:
    k_BSKH, v_BSKH = jnp.repeat(k_BSKH, n // k, axis=2), jnp.repeat(v_BSKH, n // k, axis=2)
  logits_BNLS = jnp.einsum("blnh,bsnh->bnls", q_BLNH, k_BSKH, preferred_element_type=jnp.float32)
  logits_BNLS = logits_BNLS + bias(mask_B1LS)
  exp_BNLS = jnp.exp(logits_BNLS - jax.lax.stop_gradient(jnp.max(logits_BNLS, axis=-1, keepdims=True)))
  out_BLNH = jnp.einsum("bnls,bsnh->blnh", exp_BNLS.astype(v_BSKH.dtype), v_BSKH)
  sum_BLN = jnp.einsum("bnls->bln", exp_BNLS)
  out_BLNH = (out_BLNH / sum_BLN[..., None]).astype(v_BSKH.dtype)
  if return_probs:
    return out_BLNH, exp_BNLS / sum_BLN.transpose(0, 2, 1)[..., None]
  return out_BLNH


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    self.cfg, self.lora = cfg, lora
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2 residual scaling.
    self.wq_DNH = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, cfg.param_dtype)
    self.wk_DKH = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype)
    self.wv_DKH = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, cfg.param_dtype)
    self.wo_NHD = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, cfg.param_dtype)
    zeros = lambda shape, names: nnx.Param(jnp.zeros(shape, cfg.param_dtype), out_sharding=names, eager_sharding=False)
    if cfg.use_bias or cfg.qkv_bias:
      self.bias_q_NH = zeros((n, h), ("heads", "head_dim"))
      self.bias_k_KH = zeros((k, h), ("kv_heads", "head_dim"))
      self.bias_v_KH = zeros((k, h), ("kv_heads", "head_dim"))
    if cfg.use_bias:
      self.bias_o_D = zeros((d,), ("embed",))
    self.lora_q = _lora(lora, "q", self.wq_DNH, 1, rngs, cfg.dtype)
    self.lora_k = _lora(lora, "k", self.wk_DKH, 1, rngs, cfg.dtype)
    self.lora_v = _lora(lora, "v", self.wv_DKH, 1, rngs, cfg.dtype)
    self.lora_o = _lora(lora, "o", self.wo_NHD, 2, rngs, cfg.dtype)

  def __call__(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
    cache: KVCache | None = None,
    layer=0,
    capture: bool = False,
    rope_BLH: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Self-attention over the L new tokens, plus the cached ones when decoding with a `cache`.

    `capture` (a static switch, inspection only): the written-out `attention()` whatever `attention_impl`, and its
    weights [B, N, L, S] returned third. `rope_BLH`: the positions' `rope_tables`, shared by the layers;
    computed here if None.
    """
    cfg, dt = self.cfg, self.cfg.dtype
    b, l, d = x_BLD.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    # Projections as 2-D matmuls on [B·L, D] (reshapes are free): with 3-D weights ('bld,dnh->blnh') XLA's CPU
    # backend transposes activations for the weight gradients.
    x_TD = x_BLD.reshape(b * l, d)
    project = lambda w, adapter, out: _with_lora(x_TD @ w[...].astype(dt).reshape(d, out), x_TD, adapter, self.lora)
    q_BLNH = project(self.wq_DNH, self.lora_q, n * h).reshape(b, l, n, h)
    k_BLKH = project(self.wk_DKH, self.lora_k, k * h).reshape(b, l, k, h)
    v_BLKH = project(self.wv_DKH, self.lora_v, k * h).reshape(b, l, k, h)
    if cfg.use_bias or cfg.qkv_bias:
      q_BLNH, k_BLKH, v_BLKH = (
        q_BLNH + self.bias_q_NH[...].astype(dt),
        k_BLKH + self.bias_k_KH[...].astype(dt),
        v_BLKH + self.bias_v_KH[...].astype(dt),
      )
    if cfg.position == "rope":
      inv_freq_H2 = rope_frequencies(cfg)
      rope_BLH = rope_tables(positions_BL, inv_freq_H2) if rope_BLH is None else rope_BLH  # Once for q and k.
      q_BLNH = apply_rope(q_BLNH, positions_BL, inv_freq_H2, rope_BLH)
      k_BLKH = apply_rope(k_BLKH, positions_BL, inv_freq_H2, rope_BLH)
    if cache is not None:
      cache = cache.write_layer(layer, k_BLKH, v_BLKH)
    kv_heads_first = cache is not None and cache.segment_ids_BS.shape[1] != l
    if not kv_heads_first:
      # Training, or a prefill into a cache of exactly the prompt's length (it then holds just these tokens):
      # attend to the new keys/values themselves.
      # Context parallelism (mesh.sequence > 1): queries stay split along the sequence, keys/values and their
      # positions/segment ids are all-gathered (RoPE was applied shard-locally from each token's own position).
      q_BLNH = sequence_sharded(q_BLNH)
      k_BSKH, v_BSKH, kv_positions_BS, kv_segment_ids_BS = (
        sequence_gathered(x) for x in (k_BLKH, v_BLKH, positions_BL, segment_ids_BL)
      )
    else:  # Decoding: the cache's own heads-first layout, [B, K, S, H], read in place.
      k_BSKH, v_BSKH = cache.k_LBKSH[layer].astype(dt), cache.v_LBKSH[layer].astype(dt)
      kv_positions_BS, kv_segment_ids_BS = cache.positions_BS, cache.segment_ids_BS
    # Decided at trace time from the mesh's platform; the decode step reads the cache in place with attention().
    impl = "xla" if capture or kv_heads_first else attention_kernels.resolve(cfg.attention_impl, dt)
    if impl == "splash":  # Causal by index + segment ids: the same mask for real tokens (attention_kernels).
      out_BLNH = attention_kernels.splash_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
    else:
      mask = attention_mask(segment_ids_BL, kv_segment_ids_BS, positions_BL, kv_positions_BS)
      if capture:
        out_BLNH, probs_BNLS = attention(q_BLNH, k_BSKH, v_BSKH, mask, kv_heads_first=kv_heads_first, return_probs=True)
      elif impl == "xla":
        out_BLNH = attention(q_BLNH, k_BSKH, v_BSKH, mask, kv_heads_first=kv_heads_first)
      else:  # cuDNN's fused kernel on [B, S, K, H] with the dense mask.
        out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask, implementation="cudnn")
    out_TE = out_BLNH.reshape(b * l, n * h)
    out_BLD = _with_lora(out_TE @ self.wo_NHD[...].astype(dt).reshape(n * h, d), out_TE, self.lora_o, self.lora)
    out_BLD = out_BLD.reshape(b, l, d)
    if cfg.use_bias:
      out_BLD = out_BLD + self.bias_o_D[...].astype(dt)
    if capture:
      return out_BLD, cache, probs_BNLS
    return out_BLD, cache


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    self.cfg, self.lora = cfg, lora
    d, f = cfg.d_model, cfg.d_ff
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.w_in_DF = _param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype)
    if cfg.mlp == "swiglu":
      self.w_gate_DF = _param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype)
    self.w_out_FD = _param(rngs, (f, d), ("mlp", "embed"), out_std, cfg.param_dtype)
    if cfg.use_bias:
      self.bias_in_F = nnx.Param(jnp.zeros((f,), cfg.param_dtype), out_sharding=("mlp",), eager_sharding=False)
      if cfg.mlp == "swiglu":
        self.bias_gate_F = nnx.Param(jnp.zeros((f,), cfg.param_dtype), out_sharding=("mlp",), eager_sharding=False)
      self.bias_out_D = nnx.Param(jnp.zeros((d,), cfg.param_dtype), out_sharding=("embed",), eager_sharding=False)
    self.lora_mlp_in = _lora(lora, "mlp_in", self.w_in_DF, 1, rngs, cfg.dtype)
    self.lora_mlp_gate = _lora(lora, "mlp_gate", self.w_gate_DF, 1, rngs, cfg.dtype) if cfg.mlp == "swiglu" else None
    self.lora_mlp_out = _lora(lora, "mlp_out", self.w_out_FD, 1, rngs, cfg.dtype)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg, dt = self.cfg, self.cfg.dtype
    b, l, d = x_BLD.shape
    x_TD = x_BLD.reshape(b * l, d)  # 2-D matmuls: on CPU, 3-D ones cost a transposed copy in the backward pass.
    h_TF = _with_lora(x_TD @ self.w_in_DF[...].astype(dt), x_TD, self.lora_mlp_in, self.lora)
    if cfg.use_bias:
      h_TF = h_TF + self.bias_in_F[...].astype(dt)
    if cfg.mlp == "swiglu":
      gate_TF = _with_lora(x_TD @ self.w_gate_DF[...].astype(dt), x_TD, self.lora_mlp_gate, self.lora)
      if cfg.use_bias:
        gate_TF = gate_TF + self.bias_gate_F[...].astype(dt)
      h_TF = jax.nn.silu(gate_TF) * h_TF
    else:
      h_TF = jax.nn.gelu(h_TF, approximate=cfg.gelu_approximate)
    out_TD = _with_lora(h_TF @ self.w_out_FD[...].astype(dt), h_TF, self.lora_mlp_out, self.lora)
    if cfg.use_bias:
      out_TD = out_TD + self.bias_out_D[...].astype(dt)
    return out_TD.reshape(b, l, d)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs, lora=lora)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs, lora=lora)

  def __call__(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
    cache: KVCache | None = None,
    layer=0,
    capture: bool = False,
    rope_BLH: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """`capture`: the attention weights [B, N, L, S] returned third; `rope_BLH`: see `Attention`."""
    attn_BLD, cache, *probs = self.attn(
      self.attn_norm(x_BLD), positions_BL, segment_ids_BL, cache, layer, capture, rope_BLH
    )
    x_BLD = x_BLD + attn_BLD
    return x_BLD + self.mlp(self.mlp_norm(x_BLD)), cache, *probs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Internals:
  """What one forward pass computed on the way to its logits (`Transformer.forward_with_internals`)."""

  residual_stream: jax.Array  # [num_layers + 1, B, L, D]: the embeddings, then the stream after each block.
  attention_probs: jax.Array  # [num_layers, B, N, L, S] float32: each layer's attention weights (rows sum to 1).


_REMAT_POLICIES = {
  "full": None,  # Save nothing: recompute the whole block.
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Keep matmul outputs.
}


def _one_document(tokens_BL, positions_BL, segment_ids_BL):
  """Positions and segment ids; without them each row is one document (no padding)."""
  if positions_BL is None:
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  if segment_ids_BL is None:
    segment_ids_BL = jnp.ones_like(tokens_BL)
  return positions_BL, segment_ids_BL


def _tracing() -> bool:
  """Whether a transformation (jit, grad, vmap, scan, ...) is tracing the caller."""
  clean = getattr(jax._src.core, "trace_state_clean", None)  # No public equivalent; if it moves: always trace.
  return clean is None or not clean()


def _compiled_when_eager(method):
  """An eager call of a model method runs as one compiled call (cached per input shapes) instead of op by op.

  Op-by-op dispatch compiles each of a forward pass's hundreds of primitives again for every new input shape:
  seconds per call on a CPU (a 2-layer model's forward on a busy 2-core box: ~20 s eager, ~3 s compiled). Inside
  jit, grad, vmap or scan (the training and decoding steps) the method runs as written.
  """
  compiled = nnx.jit(method)

  @functools.wraps(method)
  def call(self, *args, **kwargs):
    return (method if _tracing() else compiled)(self, *args, **kwargs)

  return call


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    self.cfg, self.lora = cfg, lora
    embed_init = _logical(nnx.initializers.normal(cfg.init_std), ("vocab", "embed"))
    self.embed = nnx.Embed(
      cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=embed_init, rngs=rngs
    )
    if cfg.position == "learned":
      self.pos_embed = nnx.Embed(
        cfg.max_seq_len,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
        embedding_init=_logical(nnx.initializers.normal(cfg.init_std), (None, "embed")),
      )
    if cfg.scan_layers:
      # One Block whose parameters have a leading "layers" axis, created by vmapping the constructor.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_stacked_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs, lora=lora)

      self.blocks = make_stacked_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs, lora=lora) for _ in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head_DV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, cfg.param_dtype)

  @_compiled_when_eager
  def backbone(
    self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None
  ) -> jax.Array:
    """Final-norm hidden states [B, L, D]. Without segment ids the row is one document (no padding)."""
    return self._layers(tokens_BL, *_one_document(tokens_BL, positions_BL, segment_ids_BL), None)[0]

  @_compiled_when_eager
  def forward_with_internals(
    self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None
  ) -> tuple[jax.Array, Internals]:
    """`__call__`'s logits and, from the same forward pass, the residual stream and attention weights.

    For inspection (llm_jax/inference/inspection.py): training and decoding never capture, and their code is
    unchanged by it (a static switch). The written-out attention is used whatever `attention_impl`.
    """
    h_BLD, _, internals = self._layers(
      tokens_BL, *_one_document(tokens_BL, positions_BL, segment_ids_BL), None, capture=True
    )
    return self.logits(h_BLD), internals

  @_compiled_when_eager
  def backbone_with_cache(
    self, tokens_BL: jax.Array, positions_BL: jax.Array, segment_ids_BL: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, KVCache]:
    """Like `backbone`, for L new tokens that also attend to the cache's; writes their keys/values into it.

    Prefill is a call with the (left-padded) prompts, decoding one call per token with L = 1.
    """
    cache = cache.add_tokens(positions_BL, segment_ids_BL)
    h_BLD, cache = self._layers(tokens_BL, positions_BL, segment_ids_BL, cache)
    return h_BLD, dataclasses.replace(cache, index=cache.index + tokens_BL.shape[1])

  def _layers(self, tokens_BL, positions_BL, segment_ids_BL, cache, capture: bool = False):
    """(final-norm hidden states, cache), and `Internals` third when `capture`."""
    cfg = self.cfg
    x_BLD = self.embed(tokens_BL)
    if cfg.position == "learned":
      x_BLD = x_BLD + self.pos_embed(positions_BL)
    x_BLD = batch_sharded(x_BLD)
    embedded_BLD = x_BLD
    rope_BLH = rope_tables(positions_BL, rope_frequencies(cfg)) if cfg.position == "rope" else None

    def run_block(block: Block, x_BLD: jax.Array, cache, layer):
      return block(x_BLD, positions_BL, segment_ids_BL, cache, layer, capture, rope_BLH)

    if cfg.remat != "none" and cache is None:
      run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[cfg.remat])

    if cfg.scan_layers:
      # Per-layer outputs (stacked by the scan) only when capturing: (residual stream, attention weights).
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run_stack(block: Block, carry):
        x_BLD, cache, layer = carry
        x_BLD, cache, *probs = run_block(block, x_BLD, cache, layer)
        return (x_BLD, cache, layer + 1), ((x_BLD, *probs) if capture else ())

      (x_BLD, cache, _), per_layer = run_stack(self.blocks, (x_BLD, cache, jnp.int32(0)))
    else:
      outputs = []
      for layer, block in enumerate(self.blocks):
        x_BLD, cache, *probs = run_block(block, x_BLD, cache, layer)
        if capture:
          outputs.append((x_BLD, *probs))
      per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs) if capture else ()
    h_BLD = batch_sharded(self.final_norm(x_BLD))
    if not capture:
      return h_BLD, cache
    residual, probs = per_layer
    return h_BLD, cache, Internals(jnp.concatenate([embedded_BLD[None], residual]), probs)

  def logits(self, h_BLD: jax.Array) -> jax.Array:
    """The LM head: hidden states → float32 logits [B, L, V]."""
    if self.cfg.tie_embeddings:
      logits_BLV = self.embed.attend(h_BLD)
    else:
      logits_BLV = h_BLD @ self.lm_head_DV[...].astype(self.cfg.dtype)
    return batch_sharded(logits_BLV.astype(jnp.float32))

  @_compiled_when_eager
  def __call__(
    self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None
  ) -> jax.Array:
    return self.logits(self.backbone(tokens_BL, positions_BL, segment_ids_BL))
