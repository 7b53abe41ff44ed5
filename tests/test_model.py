"""Model correctness: causality, document masking, GQA, RoPE, a NumPy reference forward pass, scan/remat
equivalence, parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax import model as model_lib
from llm_jax.model import PRESETS, ModelConfig, Transformer

TINY = PRESETS["tiny"]  # Llama-style: RoPE, RMSNorm, SwiGLU, GQA.
TINY_GPT2 = dataclasses.replace(
  TINY, position="learned", norm="layernorm", mlp="gelu", num_kv_heads=4, tie_embeddings=True, use_bias=True
)
VARIANTS = {"llama": TINY, "gpt2": TINY_GPT2}


def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
  model = make(VARIANTS[name])
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 264)
  logits = model(tokens)
  for t in (0, 7, 23):
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 17) % 264)
    np.testing.assert_allclose(model(changed)[:, : t + 1], logits[:, : t + 1], atol=1e-6)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 264)
  assert not np.allclose(model(changed)[:, 5:], logits[:, 5:])  # The test can see a change.


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_document_equals_document_alone(name):
  model = make(VARIANTS[name])
  rng = np.random.default_rng(0)
  doc_a, doc_b, doc_c = (rng.integers(8, 264, n) for n in (9, 14, 5))
  packed = np.concatenate([doc_a, doc_b, doc_c, np.zeros(4, int)])[None]
  segments = np.concatenate([np.full(9, 1), np.full(14, 2), np.full(5, 3), np.zeros(4, int)])[None]
  positions = np.concatenate([np.arange(9), np.arange(14), np.arange(5), np.arange(4)])[None]
  logits = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  for doc, start in ((doc_a, 0), (doc_b, 9), (doc_c, 23)):
    alone = model(jnp.asarray(doc[None]))
    np.testing.assert_allclose(logits[:, start : start + len(doc)], alone, atol=1e-5)


@pytest.mark.parametrize("mesh_axes", [dict(data=2, sequence=4), dict(fsdp=2, sequence=2, tensor=2)])
def test_context_parallel_forward_splits_tokens_and_equals_one_device(mesh_axes):
  """mesh.sequence > 1: logits come out split along the sequence, keys/values are all-gathered (the compiled
  forward has an all-gather), and packed documents that cross shard boundaries see exactly their own past."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from llm_jax import sharding

  mesh = sharding.make_mesh(**{"data": 1, **mesh_axes})
  model = make(TINY)
  rng = np.random.default_rng(0)
  lengths = [(9, 14, 5, 4), (3, 11, 7, 11)]  # 32 tokens a row; shards of 8 or 16 cut every document but one.
  tokens = rng.integers(8, 264, (4, 32))
  segments = np.stack([np.repeat(np.arange(1, 5), n) for n in lengths * 2])
  segments[0, -4:] = 0  # Padding.
  positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in lengths * 2])
  expected = model(*map(jnp.asarray, (tokens, positions, segments)))
  placed = [jax.device_put(x, sharding.token_sharding(mesh, x.shape)) for x in (tokens, positions, segments)]
  forward = jax.jit(lambda m, t, p, s: m(t, p, s))
  with jax.set_mesh(mesh):
    logits = forward(model, *placed)
    hlo = forward.lower(model, *placed).compile().as_text()
  assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "sequence", None)), 3)
  assert not logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)
  assert "all-gather" in hlo
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def reference_attention(x, wq, wk, wv, wo, mask):
  """Plain multi-head attention in NumPy (one K/V head per query head)."""
  q, k, v = (np.einsum("bld,dnh->bnlh", x, w) for w in (wq, wk, wv))
  scores = np.einsum("bnlh,bnsh->bnls", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnls,bnsh,nhd->bld", probs, v, wo)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_numpy_multi_head_reference(num_kv_heads):
  cfg = dataclasses.replace(TINY, num_kv_heads=num_kv_heads, position="learned")  # No RoPE: plain MHA.
  attn = model_lib.Attention(cfg, rngs=nnx.Rngs(3))
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 10, cfg.d_model)))
  positions = np.broadcast_to(np.arange(10), (2, 10))
  segments = np.ones((2, 10), int)
  out, _ = attn(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(segments))
  group = cfg.num_heads // num_kv_heads
  # GQA ≡ MHA whose K/V heads are repeated for each group of query heads.
  wk = np.repeat(np.asarray(attn.wk_DKH[...]), group, axis=1)
  wv = np.repeat(np.asarray(attn.wv_DKH[...]), group, axis=1)
  mask = np.tril(np.ones((10, 10), bool))[None, None]
  expected = reference_attention(x, np.asarray(attn.wq_DNH[...]), wk, wv, np.asarray(attn.wo_NHD[...]), mask)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_depends_on_relative_offset():
  x = jax.random.normal(jax.random.key(0), (1, 1, 1, 32))
  y = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))
  inv_freq = model_lib.rope_frequencies(dataclasses.replace(TINY, head_dim=32, rope_theta=10_000.0))
  rotate = lambda v, p: model_lib.apply_rope(v, jnp.array([[p]]), inv_freq)
  for p in (0, 3, 100):
    np.testing.assert_allclose(jnp.linalg.norm(rotate(x, p)), jnp.linalg.norm(x), rtol=1e-5)
  dot = lambda pq, pk: float(jnp.sum(rotate(x, pq) * rotate(y, pk)))
  np.testing.assert_allclose(dot(5, 2), dot(103, 100), rtol=1e-4)
  np.testing.assert_allclose(dot(7, 7), float(jnp.sum(x * y)), rtol=1e-4)
  assert abs(dot(5, 2) - dot(5, 4)) > 1e-3  # A different offset gives a different score.


def numpy_rope(x, positions, theta):
  """Hugging Face Llama's RoPE: x·cos + rotate_half(x)·sin with inv_freq = 1 / θ^(2i/H), in float64."""
  h = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
  angle = np.asarray(positions, np.float64)[..., None] * inv_freq
  cos, sin = (f(np.concatenate([angle, angle], -1))[:, :, None, :] for f in (np.cos, np.sin))
  rotate_half = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
  return x * cos + rotate_half * sin


def test_rope_matches_the_hugging_face_formula():
  """The rotation's direction and frequencies, at positions ≥ 300 too (position 0 hides RoPE errors)."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 3, 16)))
  positions = np.stack([np.arange(6), 300 + 37 * np.arange(6)])
  inv_freq = model_lib.rope_frequencies(dataclasses.replace(TINY, head_dim=16, rope_theta=10_000.0))
  got = model_lib.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq)
  np.testing.assert_allclose(got, numpy_rope(x.astype(np.float64), positions, 10_000.0), atol=2e-4)


def numpy_forward(model: Transformer, tokens: np.ndarray) -> np.ndarray:
  """The Llama-style tiny model written out in NumPy (float64): embed → pre-norm blocks (RMSNorm, RoPE, GQA
  attention with 1/√H scores, SwiGLU) with residuals → RMSNorm → untied head."""
  cfg = model.cfg
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
  rms = lambda x, scale: x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * scale
  b, l = tokens.shape
  positions = np.broadcast_to(np.arange(l), (b, l))
  x = p["embed"]["embedding"][tokens]
  for i in range(cfg.num_layers):
    block = p["blocks"][i]
    h = rms(x, block["attn_norm"]["scale"])
    q, k, v = (np.einsum("bld,dnh->blnh", h, block["attn"][w]) for w in ("wq_DNH", "wk_DKH", "wv_DKH"))
    q, k = numpy_rope(q, positions, cfg.rope_theta), numpy_rope(k, positions, cfg.rope_theta)
    group = cfg.num_heads // cfg.num_kv_heads  # Query head j uses K/V head j // group.
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("blnh,bsnh->bnls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((l, l), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bnls,bsnh,nhd->bld", probs, v, block["attn"]["wo_NHD"])
    h = rms(x, block["mlp_norm"]["scale"])
    gate = h @ block["mlp"]["w_gate_DF"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ block["mlp"]["w_in_DF"])) @ block["mlp"]["w_out_FD"]
  return rms(x, p["final_norm"]["scale"]) @ p["lm_head_DV"]


def test_forward_matches_a_numpy_reference():
  model = make(TINY)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  # Larger weights than the init (peaked attention) and norm scales ≠ 1, so every piece shows in the logits.
  params = jax.tree.map(
    lambda a: a * 4.0 if a.ndim > 1 else a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype), nnx.to_pure_dict(state)
  )
  model = nnx.merge(graphdef, params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 20), 0, 264))
  expected = numpy_forward(model, tokens)
  np.testing.assert_allclose(model(jnp.asarray(tokens)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", VARIANTS)
def test_scanned_layers_and_remat_equal_plain_layers(name):
  cfg = VARIANTS[name]
  plain = make(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 264)
  expected = plain(tokens)
  # Copy the plain model's per-layer parameters into the stacked layout of the scanned model.
  scanned = make(dataclasses.replace(cfg, scan_layers=True, remat="full"))
  plain_params = nnx.to_pure_dict(nnx.state(plain))
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *plain_params["blocks"].values())
  params = dict(plain_params, blocks=stacked)
  graphdef, _ = nnx.split(scanned)
  scanned = nnx.merge(graphdef, params)
  np.testing.assert_allclose(scanned(tokens), expected, rtol=1e-5, atol=1e-5)
  loss = lambda m: jnp.mean(m(tokens) ** 2)
  grad = nnx.jit(nnx.grad(loss))  # Compiled: eager grads dispatch (and compile) op by op.
  g_plain = nnx.to_pure_dict(grad(plain))
  g_scan = nnx.to_pure_dict(grad(scanned))
  np.testing.assert_allclose(
    g_scan["blocks"]["mlp"]["w_in_DF"][1], g_plain["blocks"][1]["mlp"]["w_in_DF"], rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize("preset", ["tiny", "baby_char", "gpt2_char"])
def test_num_params_matches_the_model(preset):
  cfg = PRESETS[preset]
  abstract = nnx.eval_shape(lambda: make(cfg))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))
  assert count == cfg.num_params()
  assert count == dataclasses.replace(cfg, use_bias=True).num_params() - (
    dataclasses.replace(cfg, use_bias=True).num_params() - cfg.num_params()
  )


def test_large_presets_have_their_published_sizes():
  sizes = {name: PRESETS[name].num_params() for name in ("gpt2_124m", "llama_1b", "llama_7b")}
  assert 123e6 < sizes["gpt2_124m"] < 126e6
  assert 1.2e9 < sizes["llama_1b"] < 1.3e9
  assert 6.6e9 < sizes["llama_7b"] < 6.8e9


def test_parameters_carry_logical_axis_names():
  abstract = nnx.eval_shape(lambda: make(TINY))
  specs = jax.tree.leaves(
    nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract))),
    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", None}
  for spec in specs:
    assert len(spec) > 0 and set(spec) <= allowed, spec


def test_model_spec_is_built_once_per_model_and_mesh():
  """Every stage, loader and sampler asks for its model's spec: a language model is built (abstractly) once per
  mesh, and another model or mesh gets its own."""
  from llm_jax import modeling, sharding

  one, two = sharding.make_mesh(devices=jax.devices()[:1]), sharding.make_mesh(devices=jax.devices()[:2])
  spec = modeling.model_spec(modeling.lm_factory(TINY), one)
  assert modeling.model_spec(modeling.lm_factory(TINY), one) is spec
  assert modeling.model_spec(modeling.lm_factory(TINY), two) is not spec
  assert modeling.model_spec(modeling.lm_factory(TINY_GPT2), one) is not spec


def test_init_params_equal_flax_rngs_and_trace_once():
  """init_params counts its keys with its own stream (`modeling._Stream`): the values are those of flax's own
  nnx.Rngs, bit for bit; and a second init of the same model and mesh reuses the traced program."""
  from llm_jax import modeling, sharding

  cfg = dataclasses.replace(TINY, d_ff=96)  # A model no other test initialises: the first init here traces.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  factory = modeling.lm_factory(cfg)
  spec = modeling.model_spec(factory, mesh)
  traces = []
  listener = lambda event, duration, **kw: traces.append(kw.get("fun_name")) if event.endswith("trace_duration") else 0
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    params = modeling.init_params(factory, spec, seed=3)
    assert "init" in traces
    traces.clear()
    again = modeling.init_params(factory, spec, seed=3)
    assert "init" not in traces
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  flax_params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(3))))))()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(flax_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))
