"""KV-cache decoding: cache ≡ full forward, greedy ≡ argmax, sampling filters, batch and mesh invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_tools  # tests/conftest.py: tools run from one process.

from llm_jax import modeling, sharding
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler, SamplingConfig, left_pad, sample_logits
from llm_jax.model import PRESETS

TINY = PRESETS["tiny"]  # RoPE, RMSNorm, SwiGLU, 4 heads / 2 kv heads.
VARIANTS = {
  "llama_gqa": TINY,
  "gpt2": dataclasses.replace(
    TINY, position="learned", norm="layernorm", mlp="gelu", num_kv_heads=4, tie_embeddings=True, use_bias=True
  ),
  "llama_scan": dataclasses.replace(TINY, scan_layers=True, num_kv_heads=1),
}
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=())


def make_sampler(cfg, devices=None, mesh_shape=(-1, 1, 1)):
  data, fsdp, tensor, *sequence = mesh_shape  # (data, fsdp, tensor[, sequence])
  mesh = sharding.make_mesh(data, fsdp, tensor, devices or jax.devices()[:1], sequence=sequence[0] if sequence else 1)
  factory = modeling.lm_factory(cfg)
  state = modeling.model_spec(factory, mesh)
  params = modeling.init_params(factory, state, seed=0)
  # Larger weights than the init: random models then have peaked, prompt-dependent predictions.
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)
  return Sampler(state.graphdef, params, mesh), state.merge(params)


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(8, 264, n).tolist() for n in lengths]


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_full_forward_at_every_step(name):
  sampler, model = make_sampler(VARIANTS[name])
  rows = prompts([3, 9, 6])
  continuation = prompts([5, 5, 5], seed=1)
  tokens, segments = left_pad(rows, 10)
  state = sampler.prefill(sampler.params, jnp.asarray(tokens), jnp.asarray(segments), cache_length=16)
  cache, logits = state.cache, state.logits_BV
  positions = np.array([len(r) for r in rows])
  for step in range(5):
    for b, row in enumerate(rows):
      prefix = row + continuation[b][:step]
      full = model(jnp.asarray([prefix]))[0, -1]
      np.testing.assert_allclose(logits[b], full, rtol=1e-5, atol=1e-5, err_msg=f"step {step} row {b}")
    fed = jnp.asarray([[c[step]] for c in continuation])
    h, cache = model.backbone_with_cache(fed, jnp.asarray(positions[:, None] + step), jnp.ones_like(fed), cache)
    logits = model.logits(h)[:, 0]


def test_greedy_equals_iterated_argmax_of_the_full_forward():
  sampler, model = make_sampler(TINY)
  prompt = prompts([7])[0]
  out = sampler.generate([prompt], GREEDY, jax.random.key(0))
  sequence = list(prompt)
  for _ in range(GREEDY.max_new_tokens):
    sequence.append(int(jnp.argmax(model(jnp.asarray([sequence]))[0, -1])))
  assert out.tokens[0] == sequence[len(prompt) :]
  assert len(set(out.tokens[0])) > 1  # Not a degenerate constant output.


def test_sampling_limits_equal_greedy_and_plain_sampling():
  sampler, _ = make_sampler(TINY)
  rows = prompts([4, 11])
  key = jax.random.key(3)
  generate = lambda **kw: sampler.generate(rows, dataclasses.replace(GREEDY, **kw), key).tokens
  greedy = generate()
  assert generate(temperature=1.0, top_k=1) == greedy
  assert generate(temperature=1e-6) == greedy
  plain = generate(temperature=1.0)
  assert generate(temperature=1.0, top_p=1.0, top_k=TINY.vocab_size) == plain
  assert generate(temperature=1.0) == plain  # Same key, same tokens.
  assert sampler.generate(rows, dataclasses.replace(GREEDY, temperature=1.0), jax.random.key(4)).tokens != plain


def chi_square(counts, probs):
  expected = probs * counts.sum()
  return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_the_softmax():
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  draw = lambda **kw: np.asarray(sample_logits(jnp.broadcast_to(logits, (n, 5)), keys, **kw)[0])
  # Critical values at p = 0.001: 18.47 (4 degrees of freedom), 13.82 (2).
  probs = np.asarray(jax.nn.softmax(logits))
  assert chi_square(np.bincount(draw(temperature=1.0, top_k=0, top_p=1.0), minlength=5), probs) < 18.47
  probs_t = np.asarray(jax.nn.softmax(logits / 2.0))
  assert chi_square(np.bincount(draw(temperature=2.0, top_k=0, top_p=1.0), minlength=5), probs_t) < 18.47
  top3 = np.bincount(draw(temperature=1.0, top_k=3, top_p=1.0), minlength=5)
  assert top3[3:].sum() == 0 and chi_square(top3[:3], probs[:3] / probs[:3].sum()) < 13.82
  # top_p = 0.8: the first two tokens hold 0.70 of the mass, so the third (crossing 0.8) is kept too.
  nucleus = np.bincount(draw(temperature=1.0, top_k=0, top_p=0.8), minlength=5)
  assert nucleus[3:].sum() == 0 and chi_square(nucleus[:3], probs[:3] / probs[:3].sum()) < 13.82
  # A wrong distribution is rejected: the test can fail.
  assert chi_square(np.bincount(draw(temperature=1.0, top_k=0, top_p=1.0), minlength=5), probs_t) > 18.47


def test_top_p_keeps_no_more_tokens_once_their_mass_reaches_top_p():
  """top_p equal to the two most likely tokens' mass (as float32 computes it): the third is not needed; a hair
  more and it is kept (it crosses top_p)."""
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
  probs = jax.nn.softmax(logits)
  mass_before = np.asarray(jnp.cumsum(probs) - probs)
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = lambda top_p: np.bincount(
    np.asarray(sample_logits(jnp.broadcast_to(logits, (2000, 5)), keys, 1.0, 0, top_p)[0]), minlength=5
  )
  exact = draw(float(mass_before[2]))
  assert exact[2:].sum() == 0 and exact[:2].min() > 0
  above = draw(float(np.nextafter(mass_before[2], np.float32(1))))
  assert above[3:].sum() == 0 and above[:3].min() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_log_probs_equal_a_fresh_forward_pass(temperature):
  """The log-probs are those of the distribution sampled from: log_softmax(logits / temperature)."""
  sampler, model = make_sampler(TINY)
  rows = prompts([5, 8])
  sampling = SamplingConfig(max_new_tokens=8, temperature=temperature, stop_ids=())
  out = sampler.generate(rows, sampling, jax.random.key(1))
  for prompt, tokens, log_probs in zip(rows, out.tokens, out.log_probs):
    assert len(tokens) == 8
    full = jax.nn.log_softmax(model(jnp.asarray([prompt + tokens]))[0] / temperature)
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]
    np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)


def test_a_prompt_decodes_the_same_alone_and_in_a_mixed_batch():
  sampler, _ = make_sampler(TINY)
  target, short, long = prompts([6, 2, 30])
  alone = sampler.generate([target], GREEDY, jax.random.key(0))
  batched = sampler.generate([short, target, long], GREEDY, jax.random.key(0))
  assert batched.tokens[1] == alone.tokens[0]
  np.testing.assert_allclose(batched.log_probs[1], alone.log_probs[0], rtol=1e-5, atol=1e-5)


def test_rows_stop_at_their_stop_token_and_are_padded_after():
  sampler, _ = make_sampler(TINY)
  rows = prompts([4, 7, 5])
  free = sampler.generate(rows, GREEDY, jax.random.key(0)).tokens
  stop = free[1][3]  # Make row 1's fourth greedy token a stop token.
  stopped = sampler.generate(rows, dataclasses.replace(GREEDY, stop_ids=(stop,)), jax.random.key(0)).tokens
  for free_row, stopped_row in zip(free, stopped):
    cut = free_row.index(stop) + 1 if stop in free_row else len(free_row)
    assert stopped_row == free_row[:cut]
  assert len(stopped[1]) <= 4


# (2, 1, 2, 2): a training mesh with context parallelism; the sampler runs replicated over its sequence axis.
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (2, 1, 2, 2)])
def test_sharded_decode_equals_one_device(mesh_shape):
  cfg = dataclasses.replace(TINY, num_kv_heads=2)
  one, _ = make_sampler(cfg)
  eight, _ = make_sampler(cfg, devices=jax.devices(), mesh_shape=mesh_shape)
  rows = prompts([3, 12, 7])
  sampling = dataclasses.replace(GREEDY, temperature=1.0, top_k=20)
  a, b = one.generate(rows, sampling, jax.random.key(5)), eight.generate(rows, sampling, jax.random.key(5))
  assert a.tokens == b.tokens
  for x, y in zip(a.log_probs, b.log_probs):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_streaming_yields_the_same_tokens():
  sampler, _ = make_sampler(TINY)
  prompt = prompts([5])[0]
  streamed = []
  out = sampler.generate([prompt], GREEDY, jax.random.key(0), stream=streamed.extend, stream_chunk=3)
  assert streamed == out.tokens[0] == sampler.generate([prompt], GREEDY, jax.random.key(0)).tokens[0]


def test_bad_prompts_are_user_errors():
  sampler, _ = make_sampler(TINY)
  with pytest.raises(UserError, match="prompt 1 is empty"):
    sampler.generate([[9], []], GREEDY, jax.random.key(0))
  with pytest.raises(UserError, match="prompt 0 has 128 tokens; the model's context is 128"):
    sampler.generate([[9] * 128], GREEDY, jax.random.key(0))
  with pytest.raises(UserError, match="top_p"):
    sampler.generate([[9]], dataclasses.replace(GREEDY, top_p=0.0), jax.random.key(0))


def test_generate_cli_and_its_bad_inputs(tmp_path):
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import pretrain as pretrain_config

  from llm_jax.train import pretrain

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the cat sat on the mat. " * 200)
  config = pretrain_config.get_config()
  config.model, config.data.path, config.data.tokenizer = "tiny", str(corpus), "char"
  config.steps, config.warmup_steps, config.batch_size, config.seq_len = 2, 0, 8, 32
  workdir = str(tmp_path / "run")
  pretrain.run(config, workdir, devices=jax.devices()[:1])
  (tmp_path / "no_checkpoint").mkdir()
  (tmp_path / "no_checkpoint" / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  (tmp_path / "no_checkpoint" / "tokenizer.json").write_text('{"kind": "char"}')

  bad = [
    ([f"--workdir={workdir}", "--prompt= "], "prompt 0 is empty"),
    ([f"--workdir={workdir}", "--prompt=" + "x" * 200], "prompt 0 has 201 tokens"),
    ([f"--workdir={tmp_path}/no_checkpoint", "--prompt=hi"], "no readable checkpoint in"),
    ([f"--checkpoint={workdir}/checkpoints/7", "--prompt=hi"], "checkpoints/7: no such checkpoint; the checkpoints in"),
  ]
  good = [f"--workdir={workdir}", "--prompt=the cat", "--prompt=a", "--max_new_tokens=5", "--temperature=0"]
  ok, *failed = run_tools([("generate", good)] + [("generate", args) for args, _ in bad])
  assert ok["code"] == 0, ok["stderr"]
  lines = ok["stdout"].splitlines()
  assert len(lines) == 2 and lines[0].startswith("the cat") and lines[1].startswith("a")
  for (args, message), proc in zip(bad, failed):
    errors = [line for line in proc["stderr"].splitlines() if line.strip()]
    assert proc["code"] == 2 and len(errors) == 1 and message in errors[0], (args, proc["stderr"])


def test_prompts_in_the_same_bucket_reuse_the_compiled_loop():
  sampler, _ = make_sampler(TINY)
  prefill, decode = sampler._jitted
  sampler.generate(prompts([3, 9]), GREEDY, jax.random.key(0))
  sizes = (prefill._cache_size(), decode._cache_size())
  sampler.generate(prompts([12, 5], seed=2), GREEDY, jax.random.key(1))  # Same 16-token bucket.
  assert (prefill._cache_size(), decode._cache_size()) == sizes
  sampler.generate(prompts([20]), GREEDY, jax.random.key(0))  # Next bucket: one new compilation.
  assert prefill._cache_size() == sizes[0] + 1


def test_scanned_layers_decode_like_unrolled_layers():
  plain, _ = make_sampler(TINY)
  scanned_cfg = dataclasses.replace(TINY, scan_layers=True)
  mesh = plain.mesh
  state = modeling.model_spec(modeling.lm_factory(scanned_cfg), mesh)
  stacked = dict(plain.params, blocks=jax.tree.map(lambda *layers: jnp.stack(layers), *plain.params["blocks"].values()))
  scanned = Sampler(state.graphdef, stacked, mesh)
  rows = prompts([4, 9])
  a, b = plain.generate(rows, GREEDY, jax.random.key(0)), scanned.generate(rows, GREEDY, jax.random.key(0))
  assert a.tokens == b.tokens
  np.testing.assert_allclose(np.concatenate(a.log_probs), np.concatenate(b.log_probs), rtol=1e-5, atol=1e-5)


def test_every_requested_token_is_generated_when_prompt_and_budget_fit():
  """The power-of-two bucket of a 70-token prompt is 128 = the whole context: it must shrink, not the budget."""
  sampler, _ = make_sampler(TINY)  # Context 128.
  budget = dataclasses.replace(GREEDY, max_new_tokens=32)
  for rows in (prompts([70]), prompts([70, 5, 33]), prompts([96])):
    out = sampler.generate(rows, budget, jax.random.key(0))
    assert [len(t) for t in out.tokens] == [32] * len(rows) and out.new_token_budget == 32
    assert out.cut_by_context == 0
  # Too long for the budget: one clear error, or (evaluation loops) a counted, smaller budget.
  with pytest.raises(UserError, match="prompt 1 has 100 tokens: with max_new_tokens=32 it does not fit"):
    sampler.generate(prompts([5, 100]), budget, jax.random.key(0))
  out = sampler.generate(prompts([5, 100]), budget, jax.random.key(0), allow_context_cut=True)
  assert out.cut_by_context == 1 and out.new_token_budget == 28 and [len(t) for t in out.tokens] == [28, 28]


def test_banned_ids_are_never_sampled_and_log_probs_exclude_them():
  logits = jnp.asarray([[0.0, 5.0, 4.0, 1.0, 0.5]] * 2000)
  keys = jax.random.split(jax.random.key(0), 2000)
  tokens, log_probs = sample_logits(logits, keys, 1.0, 0, 1.0, banned_ids=(1, 2))
  assert set(np.unique(tokens).tolist()) == {0, 3, 4}
  allowed = np.array([0.0, 1.0, 0.5])
  np.testing.assert_allclose(
    log_probs[:3], (allowed - np.log(np.exp(allowed).sum()))[np.searchsorted([0, 3, 4], tokens[:3])], rtol=1e-5
  )
  greedy, _ = sample_logits(logits[:1], keys[:1], 0.0, 0, 1.0, banned_ids=(1, 2))
  assert int(greedy[0]) == 3
  # Through the decode loop: only the allowed ids ever come out.
  sampler, _ = make_sampler(TINY)
  allowed_ids = {10, 11, 12}
  banned = tuple(i for i in range(TINY.vocab_size) if i not in allowed_ids)
  sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, stop_ids=(), banned_ids=banned)
  out = sampler.generate(prompts([4, 9]), sampling, jax.random.key(3))
  assert all(set(t) <= allowed_ids and len(t) == 16 for t in out.tokens)


def test_chat_sampling_bans_role_and_control_tokens_and_stops_at_end():
  from llm_jax import chat
  from llm_jax.tokenizer import ByteTokenizer

  sampling = chat.chat_sampling(SamplingConfig(temperature=1.0), ByteTokenizer())
  assert set(sampling.stop_ids) == {7, 3}  # <|end|>, <eos>.
  assert set(sampling.banned_ids) == {0, 1, 2, 4, 5, 6}  # <pad> <unk> <bos> and the three role tokens.


def test_samplers_of_one_model_share_their_compiled_functions():
  """RL and evaluation build a Sampler per call: the second of the same graph and mesh traces nothing again."""
  from flax import nnx

  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=96)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, params = nnx.split(modeling.build_model(cfg, nnx.Rngs(0)))
  first, second = Sampler(graphdef, params, mesh), Sampler(graphdef, params, mesh)
  assert first._jitted is second._jitted
  assert Sampler(graphdef, params, sharding.make_mesh(devices=jax.devices()[:2]))._jitted is not first._jitted
