"""Fused attention kernels (llm_jax/attention_kernels.py): Pallas splash attention, run in interpret mode on CPU,
against the written-out reference `model.attention`; and "auto" resolving to that reference on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm_jax import attention_kernels
from llm_jax import model as model_lib
from llm_jax.data import text
from llm_jax.model import PRESETS, Transformer
from llm_jax.sequences import next_token_loss

TINY = PRESETS["tiny"]  # GQA: 4 query heads, 2 K/V heads.


def packed_rows(lengths_per_row: list[list[int]], length: int):
  """Segment ids 1, 2, ... for documents of the given lengths, then padding (segment 0); positions restart at 0
  for each document (padding's stay 0: the clamped positions of prompts' padding)."""
  segments = np.zeros((len(lengths_per_row), length), np.int32)
  positions = np.zeros_like(segments)
  for row, lengths in enumerate(lengths_per_row):
    start = 0
    for doc, n in enumerate(lengths, 1):
      segments[row, start : start + n], positions[row, start : start + n] = doc, np.arange(n)
      start += n
  return jnp.asarray(segments), jnp.asarray(positions)


def qkv(b: int, length: int, n: int, k: int, h: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, length, heads, h)), jnp.float32) for heads in (n, k, k))


def loss_and_grads(attend, q, k, v, weights):
  """A scalar of the attention output and its gradients with respect to q, k and v."""
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)


def test_splash_equals_reference_attention_forward_and_gradients():
  # L = 200: not a multiple of the 128-token block, so the kernel's padding is exercised too.
  segments, positions = packed_rows([[70, 80, 30], [190], [200]], 200)
  q, k, v = qkv(3, 200, 4, 2, 16)
  mask = model_lib.attention_mask(segments, segments, positions, positions)
  reference = lambda q, k, v: model_lib.attention(q, k, v, mask)
  splash = lambda q, k, v: attention_kernels.splash_attention(q, k, v, segments)

  real = np.asarray(segments) > 0
  out = jax.jit(splash)(q, k, v)
  assert np.isfinite(np.asarray(out)).all()  # Padding rows too: every row attends at least to itself.
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(jax.jit(reference)(q, k, v))[real], atol=1e-5)

  # Gradients of a loss that, like the LM loss, ignores the outputs at padding.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real[:, :, None, None], jnp.float32)
  (loss, grads), (ref_loss, ref_grads) = (loss_and_grads(f, q, k, v, weights) for f in (splash, reference))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, atol=1e-5, err_msg=f"d{name}")
  assert float(jnp.abs(ref_grads[1]).max()) > 0.1  # The gradients are not trivially zero.


@pytest.mark.parametrize(
  "shape,names",
  [
    ((2, 1, 2, 2), ("data", "fsdp", "tensor", "sequence")),  # Queries split over a context-parallel axis.
    ((1, 2, 4), ("data", "fsdp", "tensor")),  # 4-way heads, 2 K/V heads: K/V repeated per query head.
  ],
)
def test_splash_under_a_mesh_equals_one_device(shape, names):
  segments, positions = packed_rows([[100, 156], [256], [30, 30, 30], [255]], 256)
  q, k, v = qkv(4, 256, 4, 2, 16)
  mask = model_lib.attention_mask(segments, segments, positions, positions)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * (np.asarray(segments) > 0)[..., None, None])
  ref_loss, ref_grads = loss_and_grads(lambda q, k, v: model_lib.attention(q, k, v, mask), q, k, v, weights)

  mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
  seq = "sequence" if "sequence" in names else None
  place = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "fsdp"), seq, *[None] * (x.ndim - 2))))
  with jax.set_mesh(mesh):
    loss, grads = loss_and_grads(
      lambda q, k, v: attention_kernels.splash_attention(q, k, v, place(segments)), *map(place, (q, k, v)), weights
    )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, atol=1e-5, err_msg=f"d{name}")


def test_auto_picks_splash_on_tpu_cudnn_on_gpu_and_the_written_out_attention_on_cpu():
  resolve = attention_kernels.resolve
  assert resolve("auto", "float32", "tpu") == "splash"
  assert resolve("auto", "bfloat16", "gpu") == "cudnn"
  assert resolve("auto", "float32", "gpu") == "xla"  # cuDNN refuses float32.
  assert resolve("auto", "bfloat16", "cpu") == "xla"
  assert resolve("splash", "float32", "cpu") == "splash"  # Forced: interpreted off TPU.
  assert attention_kernels.trace_platform() == "cpu"
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert jax.jit(lambda: jnp.int32(attention_kernels.trace_platform() == "cpu"))() == 1
  assert model_lib.ModelConfig().attention_impl == "auto"


def train_loss_fn(cfg, batch):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params):
    total, aux = next_token_loss(nnx.merge(graphdef, params), batch, None)
    return total / aux["weight"]

  return loss, params


def packed_batch(length: int = 128):
  rng = np.random.default_rng(0)
  docs = [rng.integers(8, 264, n).tolist() for n in (40, 90, 25, 70, 20)]
  return {k: jnp.asarray(v) for k, v in text.pack(docs, length, bos_id=None, eos_id=3).items()}


def test_auto_traces_the_same_train_step_as_xla_on_cpu():
  batch = packed_batch()
  jaxprs = []
  for impl in ("auto", "xla"):
    loss, params = train_loss_fn(dataclasses.replace(TINY, attention_impl=impl), batch)
    jaxprs.append(str(jax.make_jaxpr(jax.value_and_grad(loss))(params)))
  assert jaxprs[0] == jaxprs[1]
  assert "pallas_call" not in jaxprs[0]


def test_model_with_splash_equals_xla_loss_and_gradients():
  batch = packed_batch()  # 2 rows of 128: 5 packed documents, the last row padded (segment 0).
  assert (np.asarray(batch["segment_ids"]) == 0).any() and np.asarray(batch["segment_ids"]).max() > 1
  results = []
  for impl in ("splash", "xla"):
    loss, params = train_loss_fn(dataclasses.replace(TINY, attention_impl=impl), batch)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    results.append((value, optax.tree.norm(grads), grads))
  (loss_s, norm_s, grads_s), (loss_x, norm_x, grads_x) = results
  np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
  np.testing.assert_allclose(norm_s, norm_x, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads_s, grads_x)
