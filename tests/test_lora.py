"""LoRA: flax's nnx.LoRA adapters in the model, training only them, checkpoints of adapters that name their base,
and every loader seeing the merged model."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint as ckpt_lib
from llm_jax import hf, lora, modeling, sharding
from llm_jax.errors import UserError
from llm_jax.model import LORA_TARGETS, PRESETS, LoraConfig
from llm_jax.sequences import next_token_loss
from llm_jax.tokenizer import ByteTokenizer
from llm_jax.train import loop, rlhf, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import rlhf as rlhf_config  # noqa: E402
import sft as sft_config  # noqa: E402

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=320, max_seq_len=64)
ALL = LoraConfig(4, 8.0, tuple(LORA_TARGETS))
TOKENS = np.array([list(range(8, 40)), list(range(50, 82))], np.int32)


def one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def spec_and_params(cfg, adapters, seed=0, random_b=False):
  """A model's spec and parameters: base weights from seed 0 whatever the adapters; B random if `random_b`."""
  mesh = one_device_mesh()
  base_spec = modeling.model_spec(modeling.lm_factory(cfg), mesh)
  base = modeling.init_params(modeling.lm_factory(cfg), base_spec, 0)
  if adapters is None:
    return base_spec, base, base
  factory = modeling.lm_factory(cfg, adapters)
  spec = modeling.model_spec(factory, mesh)
  trainable = modeling.init_params(factory, spec, seed, trainable_only=True)
  if random_b:
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))
    flat = lora.flatten(trainable)
    trainable = lora.unflatten(
      {p: 0.3 * jax.random.normal(next(keys), v.shape) if p[-1] == "lora_b" else v for p, v in flat.items()}
    )
  return spec, spec.join(trainable, lora.place_base(base, spec.frozen, spec.lora_prefixes)), base


@pytest.mark.parametrize("scan", [False, True])
def test_lora_at_init_equals_the_base_model_exactly(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  base_spec, base, _ = spec_and_params(cfg, None)
  spec, params, _ = spec_and_params(cfg, ALL)
  adapters = [p for p in lora.flatten(params) if p[-1] in ("lora_a", "lora_b")]
  assert len(adapters) == 2 * 7 * (1 if scan else cfg.num_layers)  # Every target, every layer.
  assert not set(adapters) & spec.frozen and len(spec.frozen) == len(lora.flatten(base))
  np.testing.assert_array_equal(np.asarray(spec.merge(params)(TOKENS)), np.asarray(base_spec.merge(base)(TOKENS)))


@pytest.mark.parametrize("scan", [False, True])
def test_merged_weights_equal_the_adapter_model_in_forward_and_kv_cache_decoding(scan):
  from llm_jax.inference.sampler import Sampler, SamplingConfig

  cfg = dataclasses.replace(CFG, scan_layers=scan)
  adapters = LoraConfig(2, 3.0, ("q", "v", "mlp_out"))
  base_spec, _, base = spec_and_params(cfg, None)
  spec, params, _ = spec_and_params(cfg, adapters, random_b=True)
  merged = lora.merge(params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  # By hand for one weight: W + (alpha/rank)·A·B, reshaped to [D, N, H].
  a, b = (params["blocks"][0] if not scan else jax.tree.map(lambda x: x[0], params["blocks"]))["attn"][
    "lora_q"
  ].values()
  w = (base["blocks"][0] if not scan else jax.tree.map(lambda x: x[0], base["blocks"]))["attn"]["wq_DNH"]
  got = (merged["blocks"][0] if not scan else jax.tree.map(lambda x: x[0], merged["blocks"]))["attn"]["wq_DNH"]
  np.testing.assert_allclose(got, w + 1.5 * (np.asarray(a) @ np.asarray(b)).reshape(w.shape), rtol=1e-6, atol=1e-7)
  lora_logits, merged_logits = spec.merge(params)(TOKENS), base_spec.merge(merged)(TOKENS)
  assert float(jnp.max(jnp.abs(lora_logits - base_spec.merge(base)(TOKENS)))) > 1e-2  # The adapters matter.
  np.testing.assert_allclose(np.asarray(lora_logits), np.asarray(merged_logits), atol=2e-5)
  # Decoding through the adapters (prefill + KV-cache steps) samples what the merged model samples.
  prompts = [list(range(8, 20)), list(range(30, 35))]
  sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
  runs = [
    Sampler(s.graphdef, p, one_device_mesh(), model_cfg=cfg).generate(prompts, sampling, jax.random.key(0)).tokens
    for s, p in ((spec, params), (base_spec, merged))
  ]
  assert runs[0] == runs[1]


def test_targets_parse_and_bad_lora_fields_are_one_line_errors():
  assert lora.parse_targets("attention") == ("q", "k", "v", "o")
  assert lora.parse_targets("mlp_out, q,attention") == ("q", "k", "v", "o", "mlp_out")
  config = sft_config.get_config()
  assert lora.from_config(config) is None  # rank 0: full fine-tuning.
  config.lora.rank = 8
  assert lora.from_config(config) == LoraConfig(8, 16.0, tuple(LORA_TARGETS))
  for field, value, message in [
    ("targets", "q,wq", "unknown target 'wq'"),
    ("rank", -1, ">= 0"),
    ("alpha", 0.0, "positive"),
  ]:
    config = sft_config.get_config()
    config.lora.rank = 8
    config.lora[field] = value
    with pytest.raises(UserError, match=message):
      lora.from_config(config)


def test_an_8_device_mesh_gives_the_1_device_lora_step():
  """The same LoRA update on fsdp=4 × tensor=2 and on one device (adapters sharded like their weights)."""
  rows = {
    k: np.asarray(v)
    for k, v in __import__("llm_jax.data.text", fromlist=["pack"])
    .pack([list(range(8, 70))] * 8, 16, bos_id=2, eos_id=3)
    .items()
  }
  batch = {k: v[:8] for k, v in rows.items()}
  config = sft_config.get_config()
  results = []
  for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices()[:8], (1, 4, 2))):
    mesh = sharding.make_mesh(*shape, devices)
    factory = modeling.lm_factory(CFG, ALL)
    spec = modeling.model_spec(factory, mesh)
    base = modeling.init_params(modeling.lm_factory(CFG), modeling.model_spec(modeling.lm_factory(CFG), mesh), 0)
    trainable = modeling.init_params(factory, spec, 0, trainable_only=True)
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B ≠ 0: gradients reach A too.
    frozen = lora.place_base(base, spec.frozen, spec.lora_prefixes)
    shardings = {k: sharding.batch_sharding(mesh, 2) for k in batch}
    opt = loop.make_optimization(config, spec, next_token_loss, mesh, shardings)
    opt_state = jax.jit(opt.optimizer.init, out_shardings=opt.opt_shardings)(trainable)
    new, _, metrics = opt.train_step(trainable, opt_state, sharding.global_batch(batch, mesh), 0, frozen)
    results.append((jax.device_get(new), jax.device_get(metrics)))
  (new1, m1), (new8, m8) = results
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), new8, new1)


# ----------------------------------------------------------------------------------------------------------
# Stages: a base workdir, SFT with LoRA, what it saves, resume, loading, export, RL's reference.


def base_workdir(directory) -> str:
  """A workdir as pretraining leaves it (config.json, tokenizer, one checkpoint) with random weights."""
  from llm_jax.files import write_atomically

  workdir = str(directory / "base")
  os.makedirs(workdir)
  record = {"config": {}, "model": dataclasses.asdict(CFG)}
  write_atomically(os.path.join(workdir, "config.json"), json.dumps(record))
  ByteTokenizer().save(workdir)
  _, _, params = spec_and_params(CFG, None)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(5, params, None, None, {"step": 5, "stage": "pretrain", "model": dataclasses.asdict(CFG)})
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
  rows = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}."} for a in range(6) for b in range(6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def lora_sft_config(base, chats, steps=12):
  config = sft_config.get_config()
  config.init_from, config.data.path = base, chats
  config.steps, config.batch_size, config.seq_len, config.warmup_steps = steps, 8, 32, 2
  config.log_every, config.eval_every, config.checkpoint_every, config.learning_rate = 4, steps, 4, 1e-2
  config.exact_match_examples, config.max_answer_tokens = 2, 4
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 8.0, "all"
  return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, chats):
  tmp = tmp_path_factory.mktemp("lora_sft")
  base = base_workdir(tmp)
  result = sft.run(lora_sft_config(base, chats), str(tmp / "sft"), devices=jax.devices()[:1])
  return base, str(tmp / "sft"), result


def test_sft_with_lora_trains_only_the_adapters_and_lowers_the_loss(lora_run):
  from llm_jax.metrics import read_metrics

  base, workdir, result = lora_run
  eval_losses = [row["eval_loss"] for row in read_metrics(workdir) if "eval_loss" in row]
  assert len(eval_losses) == 2 and eval_losses[1] < 0.9 * eval_losses[0], eval_losses  # Measured: 5.84 → 4.96.
  # The base weights the model ran with are the base checkpoint's, bit for bit.
  _, base_params, _ = modeling.load_model(base, one_device_mesh())
  spec = result.state
  trainable, frozen = spec.split(result.params)
  assert jax.tree.structure(frozen) == jax.tree.structure(base_params)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), frozen, base_params)
  assert all(p[-1] in ("lora_a", "lora_b") for p in lora.flatten(trainable))
  assert any(float(jnp.max(jnp.abs(v))) > 0 for p, v in lora.flatten(trainable).items() if p[-1] == "lora_b")
  # The checkpoint: adapters only, Adam moments of adapter shapes only, and the meta naming the base.
  checkpoint = os.path.join(workdir, "checkpoints", "12")
  restored = ckpt_lib.Checkpointer(workdir, create=False)
  meta = restored.read_meta(12)
  restored.close()
  assert meta["lora"]["base"] == os.path.abspath(base) and meta["lora"]["base_step"] == 5
  assert (meta["lora"]["rank"], meta["lora"]["alpha"], meta["lora"]["targets"]) == (4, 8.0, list(LORA_TARGETS))
  adapter_shapes = {v.shape for v in jax.tree.leaves(trainable)}
  opt = loop.make_optimization(lora_sft_config(base, ""), spec, next_token_loss, one_device_mesh(), {})
  moments = [x for x in jax.tree.leaves(opt.abstract_opt_state) if x.ndim > 0]
  assert moments and {x.shape for x in moments} <= adapter_shapes
  saved_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(checkpoint + "/params") for f in fs)
  base_bytes = sum(x.size * 4 for x in jax.tree.leaves(base_params))
  assert saved_bytes < base_bytes / 4, (saved_bytes, base_bytes)


def test_loading_a_lora_workdir_merges_its_adapters_into_the_base(lora_run, tmp_path):
  base, workdir, result = lora_run
  spec, params, meta = modeling.load_model(workdir, one_device_mesh())
  assert meta["step"] == 12 and not spec.frozen
  expected = lora.merge(result.params, LoraConfig(4, 8.0, tuple(LORA_TARGETS)))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), params, expected)
  np.testing.assert_allclose(spec.merge(params)(TOKENS), result.state.merge(result.params)(TOKENS), atol=2e-5)
  # generate.py's loader and the HF export see the same merged model.
  from llm_jax.inference.loading import load_sampler

  sampler, _, _ = load_sampler(workdir, one_device_mesh())
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), sampler.params, params)
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "hf"), one_device_mesh())
  _, cfg_back, _, params_back = hf.read_params(exported, one_device_mesh())
  back_spec = modeling.model_spec(modeling.lm_factory(cfg_back), one_device_mesh())
  np.testing.assert_allclose(back_spec.merge(params_back)(TOKENS), spec.merge(params)(TOKENS), atol=2e-5)


def test_a_missing_or_replaced_base_is_one_line(lora_run, tmp_path):
  import shutil

  base, workdir, _ = lora_run
  copy = str(tmp_path / "sft")
  shutil.copytree(workdir, copy)
  moved = str(tmp_path / "moved_base")
  shutil.move(base, moved)
  try:
    with pytest.raises(UserError, match="missing") as e:
      modeling.load_model(copy, one_device_mesh())
    assert "\n" not in str(e.value)
  finally:
    shutil.move(moved, base)
  # The base's checkpoint holding other weights than the adapters were trained on: the fingerprint says so.
  record_path = os.path.join(copy, "checkpoints", "12", "meta", "metadata")
  with open(record_path) as f:
    record = json.load(f)
  record["lora"]["base_fingerprint"] *= 1.01
  with open(record_path, "w") as f:
    json.dump(record, f)
  with pytest.raises(UserError, match="was the base replaced"):
    modeling.load_model(copy, one_device_mesh(), step=12)


def preempted_copy(workdir: str, copy: str, keep_step: int) -> str:
  """`workdir` as a run preempted just after its checkpoint `keep_step` leaves it: later checkpoints gone, no
  metrics (so every row read afterwards was written by the resumed run). One rerun instead of an interrupted
  run plus its resumption."""
  import shutil

  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
  checkpoints = os.path.join(copy, ckpt_lib.CHECKPOINT_DIR)
  later = [d for d in os.listdir(checkpoints) if d.isdigit() and int(d) > keep_step]
  assert later and os.path.isdir(os.path.join(checkpoints, str(keep_step)))
  for d in later:
    shutil.rmtree(os.path.join(checkpoints, d))
  return copy


def test_a_resumed_lora_run_equals_an_uninterrupted_one(lora_run, chats, tmp_path):
  """Resumed from step 4's checkpoint (the base from init_from, the adapters and optimizer from the checkpoint):
  steps 5-12 give the uninterrupted run's losses."""
  from llm_jax.metrics import read_metrics

  base, workdir, _ = lora_run
  resumed_dir = preempted_copy(workdir, str(tmp_path / "interrupted"), keep_step=4)
  sft.run(lora_sft_config(base, chats), resumed_dir, devices=jax.devices()[:1])
  loss = lambda w: {r["step"]: r["loss"] for r in read_metrics(w) if "loss" in r and r["step"] > 0}
  uninterrupted, resumed = loss(workdir), loss(resumed_dir)
  assert list(uninterrupted) == [4, 8, 12] and resumed == {8: uninterrupted[8], 12: uninterrupted[12]}
  # Full fine-tuning into a LoRA workdir is refused (the trees differ), not mistaken for damaged checkpoints.
  config = lora_sft_config(base, chats)
  config.lora.rank = 0
  with pytest.raises(UserError, match="holds LoRA adapters"):
    sft.run(config, resumed_dir, devices=jax.devices()[:1])


def test_rl_with_lora_uses_the_base_as_reference_and_saves_adapters(lora_run, tmp_path):
  """At iteration 1 the policy is its base (B = 0): the KL to the reference (the base without adapters) is 0."""
  base, _, _ = lora_run
  config = rlhf_config.get_config()
  config.init_from, config.algorithm, config.value_init = base, "grpo", "policy_head"
  config.iterations, config.max_new_tokens, config.ppo_epochs = 2, 4, 1
  config.prompts_per_iteration, config.group_size, config.minibatch_size = 4, 2, 8
  config.lora.rank = 4
  history = rlhf.run(
    config,
    str(tmp_path / "rl"),
    devices=jax.devices()[:1],
    prompts=[[2] + ByteTokenizer().encode(w) for w in ["hi", "what", "a", "ok"]],
    reward_fn=lambda response: float(response[0] if response else 0) / 320,  # Differs within each group.
  )
  # Zero up to float32 rounding: the policy's program (with the adapters' matmuls) and the reference's (without)
  # round alike under XLA:CPU's default code generator, 1 ulp apart under the tests' faster one (conftest).
  assert abs(history[0]["kl_k1"]) < 1e-6 and abs(history[0]["kl_k3"]) < 1e-6
  assert history[1]["kl_k3"] > 0  # The adapters moved the policy away from its base.
  spec, params, meta = modeling.load_model(str(tmp_path / "rl"), one_device_mesh())
  assert meta["lora"]["base"] == os.path.abspath(base) and not spec.frozen
