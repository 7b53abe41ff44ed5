"""The training loop: learning, mesh invariance, gradient accumulation, exact resume, NaN stop, checkpoints, and
the optimizer's arithmetic (gradient normalization, learning-rate schedule, weight-decay mask)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import subprocess_env  # tests/conftest.py: the tools' environment.
from flax import nnx

from llm_jax import checkpoint as ckpt_lib
from llm_jax import modeling, sharding
from llm_jax.data import text
from llm_jax.errors import UserError
from llm_jax.metrics import read_metrics
from llm_jax.model import PRESETS, Transformer
from llm_jax.sequences import first_argmax, next_token_loss
from llm_jax.train import loop, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402  (configs/pretrain.py)


def tiny_config(corpus, **overrides):
  config = pretrain_config.get_config()
  config.model, config.data.path, config.data.tokenizer = "tiny", corpus, "char"
  config.steps, config.batch_size, config.seq_len = 10, 8, 32
  config.learning_rate, config.warmup_steps = 3e-3, 2
  config.log_every, config.eval_every, config.checkpoint_every = 1, 1000, 1000
  config.eval_batches = 2
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def losses(workdir, key="loss"):
  return {row["step"]: row[key] for row in read_metrics(workdir) if key in row}


def test_tiny_model_learns(corpus, tmp_path):
  config = tiny_config(corpus, steps=120, log_every=10, eval_every=120)
  result = pretrain.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  curve = losses(str(tmp_path / "run"))
  assert curve[10] > 3.0  # Starts near log(264) ≈ 5.6 and is still high after 10 steps.
  # Five sentences of ~25 bytes: a model that learned them predicts most bytes.
  assert result.last_eval["eval_loss"] < 0.9, result.last_eval
  assert result.last_eval["eval_accuracy"] > 0.7


def test_mesh_invariance_8_devices_equals_1(corpus, tmp_path):
  common = dict(steps=3, **{"model_overrides.num_kv_heads": 2})
  one = tiny_config(corpus, **common)
  eight = tiny_config(corpus, **common, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  pretrain.run(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  pretrain.run(eight, str(tmp_path / "eight"))
  for key in ("loss", "grad_norm"):
    a, b = losses(str(tmp_path / "one"), key), losses(str(tmp_path / "eight"), key)
    assert len(a) == 3
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
  """Single sentences (23–26 characters + BOS/EOS) packed into rows of 32: every row holds several documents."""
  from conftest import SENTENCES

  path = tmp_path_factory.mktemp("short_documents") / "corpus.jsonl"
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(300):
      f.write(json.dumps({"text": str(rng.choice(SENTENCES))}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def one_device_run(short_documents, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_device"))
  pretrain.run(tiny_config(short_documents, steps=3), workdir, devices=jax.devices()[:1])
  return workdir


@pytest.mark.parametrize(
  "mesh", [{"mesh.data": 2, "mesh.sequence": 4}, {"mesh.fsdp": 2, "mesh.sequence": 2, "mesh.tensor": 2}]
)
def test_context_parallelism_equals_1_device(short_documents, one_device_run, tmp_path, mesh):
  """mesh.sequence splits each 32-token row into 8- or 16-token shards (RoPE, GQA, packed documents crossing
  shard boundaries): the same losses and gradient norms as one device."""
  workdir = str(tmp_path / "run")
  result = pretrain.run(tiny_config(short_documents, steps=3, **{"mesh.data": 1, **mesh}), workdir)
  assert result.mesh.shape["sequence"] == mesh["mesh.sequence"]
  for key in ("loss", "grad_norm"):
    a, b = losses(one_device_run, key), losses(workdir, key)
    assert len(a) == 3
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5, err_msg=key)


def test_seq_len_not_divisible_by_mesh_sequence_is_a_user_error(corpus, tmp_path):
  config = tiny_config(corpus, seq_len=36, **{"mesh.sequence": 8})
  with pytest.raises(UserError, match=r"^seq_len=36 must be divisible by mesh.sequence=8 "):
    pretrain.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # Refused before anything was written.


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
  pretrain.run(tiny_config(corpus, steps=3), str(tmp_path / "a"), devices=jax.devices()[:2])
  pretrain.run(tiny_config(corpus, steps=3, grad_accum=4), str(tmp_path / "b"), devices=jax.devices()[:2])
  a, b = losses(str(tmp_path / "a")), losses(str(tmp_path / "b"))
  np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-5)


def test_resume_continues_exactly(corpus, tmp_path):
  config = tiny_config(corpus, steps=10, checkpoint_every=5)
  pretrain.run(config, str(tmp_path / "straight"), devices=jax.devices()[:4])
  pretrain.run(config, str(tmp_path / "resumed"), devices=jax.devices()[:4], stop_after=5)
  assert sorted(losses(str(tmp_path / "resumed"))) == [1, 2, 3, 4, 5]
  pretrain.run(config, str(tmp_path / "resumed"), devices=jax.devices()[:4])
  straight, resumed = losses(str(tmp_path / "straight")), losses(str(tmp_path / "resumed"))
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_array_equal([resumed[s] for s in range(1, 11)], [straight[s] for s in range(1, 11)])


@pytest.mark.default_codegen  # Bit for bit is a claim about XLA:CPU's default code generator (conftest).
def test_steps_per_call_logs_evaluates_saves_and_resumes_as_step_by_step(corpus, tmp_path, monkeypatch):
  # Calls of 3 updates where no boundary (log, eval, checkpoint, stop) falls inside one: 1-3 and 4-6, then 7 alone
  # (the interrupted run stops there), and after resuming 8-10, then 11 alone. Every logged, evaluated and saved
  # value equals the step-by-step run's.
  cadence = dict(steps=11, log_every=6, eval_every=6, checkpoint_every=6)
  devices = jax.devices()[:2]
  plain = pretrain.run(tiny_config(corpus, **cadence), str(tmp_path / "plain"), devices=devices)
  calls = []
  update_many = loop.Trainer.update_many
  monkeypatch.setattr(loop.Trainer, "update_many", lambda self, b, i: calls.append(i) or update_many(self, b, i))
  config = tiny_config(corpus, steps_per_call=3, **cadence)
  pretrain.run(config, str(tmp_path / "stacked"), devices=devices, stop_after=7)
  assert sorted(losses(str(tmp_path / "stacked"))) == [6, 7]
  stacked = pretrain.run(config, str(tmp_path / "stacked"), devices=devices)
  assert calls == [0, 3, 7]  # Update indices (step - 1) of each call's first update.

  def rows(name):
    timing = ("step_seconds", "tokens_per_second", "mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(str(tmp_path / name))]

  assert [r for r in rows("stacked") if r["step"] != 7] == rows("plain")  # 7: the interrupted run's last row.
  assert [r["step"] for r in rows("plain") if "loss" in r] == [6, 11]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(stacked.params), jax.device_get(plain.params))
  assert sorted(int(d) for d in os.listdir(tmp_path / "stacked" / "checkpoints") if d.isdigit()) == [6, 7, 11]


def test_first_argmax_equals_numpy_argmax_with_ties():
  """The loss's accuracy uses `first_argmax` (two plain reductions, fast on XLA:CPU): it must pick what
  np.argmax picks, the first index of the maximum, also when several entries tie (a row of equal logits)."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, (3, 7, 11)).astype(np.float32)  # Small integers: most rows have tied maxima.
  x[0, 0] = 1.0  # Every entry ties.
  x[1, 1] = -np.inf
  np.testing.assert_array_equal(jax.jit(first_argmax)(x), np.argmax(x, axis=-1))
  x = rng.normal(size=(5, 13)).astype(np.float32)
  np.testing.assert_array_equal(first_argmax(x), np.argmax(x, axis=-1))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step_gradient_is_the_loss_sum_gradient_over_the_total_weight(grad_accum):
  """The update divides the summed gradient by the whole batch's weight, not by the microbatch count."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  factory = modeling.lm_factory(PRESETS["tiny"])
  state = modeling.model_spec(factory, mesh)
  optimizer = loop.make_optimizer(pretrain_config.get_config(), state.abstract_params)
  rows = text.pack([list(range(8, 60)), list(range(100, 150))] * 2, 16, bos_id=2, eos_id=3)
  batch = {k: v[:4] for k, v in rows.items()}
  # Microbatch j takes rows j, j + A, ...: with A = 2 the microbatches weigh 3 + 5 and 16 + 16 tokens.
  mask = np.zeros((4, 16), np.float32)
  mask[0, :3], mask[2, :5], mask[1], mask[3] = 1, 1, 1, 1
  batch["loss_mask"] = mask
  params = modeling.init_params(factory, state, 0)
  weight = mask.sum()
  expected_loss, expected_grads = jax.jit(
    jax.value_and_grad(lambda p: next_token_loss(state.merge(p), batch, None)[0] / weight)
  )(params)
  expected_norm = float(optax.tree.norm(expected_grads))
  shardings = {k: sharding.batch_sharding(mesh, 2) for k in batch}
  step = loop.make_train_step(
    state, next_token_loss, optimizer, mesh, loop.opt_state_shardings(optimizer, state, mesh), shardings, grad_accum, 0
  )
  _, _, metrics = step(params, jax.jit(optimizer.init)(params), sharding.global_batch(batch, mesh), 0)
  assert float(metrics["weight"]) == weight == 40
  np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), expected_norm, rtol=1e-5)


def test_a_seed_sweep_shares_one_compiled_step_and_each_seed_reaches_its_step():
  """The seed is an argument of the compiled step, not a constant: steps of two seeds lower to the same program
  (the persistent compilation cache serves the second), and each still draws its own randomness."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  factory = modeling.lm_factory(PRESETS["tiny"])
  state = modeling.model_spec(factory, mesh)
  optimizer = loop.make_optimizer(pretrain_config.get_config(), state.abstract_params)
  batch = {k: v[:2] for k, v in text.pack([list(range(8, 60))] * 2, 16, bos_id=2, eos_id=3).items()}

  def noisy_loss(model, batch, rng):  # A loss that uses the step's rng (as dropout would).
    loss_sum, sums = next_token_loss(model, batch, rng)
    return loss_sum + jax.random.uniform(rng), sums

  shardings = {k: sharding.batch_sharding(mesh, 2) for k in batch}
  opt_shardings = loop.opt_state_shardings(optimizer, state, mesh)
  losses, programs = [], []
  for seed in (0, 1):
    step = loop.make_train_step(state, noisy_loss, optimizer, mesh, opt_shardings, shardings, 1, seed)
    params = modeling.init_params(factory, state, 0)  # (A step donates its parameters.)
    args = (params, jax.jit(optimizer.init)(params), sharding.global_batch(batch, mesh), 0)
    programs.append(step.lower(*args).as_text())
    losses.append(float(step(*args)[2]["loss"]))
  assert programs[0] == programs[1]
  assert losses[0] != losses[1]


def expected_learning_rates(peak: float, warmup: int, steps: int, min_lr_ratio: float) -> list[float]:
  """loop.learning_rate_schedule's convention written out: the rate of update k = 1 .. steps."""
  end, warmup = peak * min_lr_ratio, max(warmup, 1)
  return [
    peak * k / warmup
    if k <= warmup
    else end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (k - warmup) / (steps - warmup)))
    for k in range(1, steps + 1)
  ]


@pytest.mark.parametrize("warmup_steps", [4, 0])
def test_adam_update_k_uses_the_schedule_value_at_step_k(warmup_steps):
  """A loss linear in the parameters has a constant gradient g: Adam's m̂ = g and v̂ = g², so (no clipping, no
  weight decay) update k is exactly -lr_k·sign(g) and shows the rate the optimizer used."""
  config = pretrain_config.get_config()
  config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio = 10, warmup_steps, 1e-2, 0.1
  config.grad_clip, config.weight_decay = 0.0, 0.0
  c = jnp.array([[1.0, -2.0], [0.5, -0.25]])  # |g| >> eps = 1e-8.
  loss = lambda p: jnp.sum(c * p["w"]) + jnp.sum(c[0] * p["b"])
  params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
  optimizer = loop.make_optimizer(config, params)
  opt_state = optimizer.init(params)
  expected = expected_learning_rates(1e-2, warmup_steps, 10, 0.1)
  assert expected[0] == (1e-2 / 4 if warmup_steps else 1e-2) and expected[-1] == pytest.approx(1e-3)
  sizes = []
  for _ in range(10):
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
    np.testing.assert_allclose(updates["w"] / -np.sign(c), updates["w"][0, 0] / -1.0, rtol=1e-6)
    sizes.append(-float(updates["w"][0, 0]))
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(sizes, expected, rtol=1e-5)
  # The one schedule function (also what the loop logs) gives the same rates.
  np.testing.assert_allclose([float(loop.learning_rate_schedule(config)(k)) for k in range(1, 11)], expected, rtol=1e-6)


def test_logged_learning_rate_is_the_rate_each_update_used(corpus, tmp_path):
  config = tiny_config(corpus, steps=6, warmup_steps=3)
  pretrain.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  logged = losses(str(tmp_path / "run"), "learning_rate")
  assert sorted(logged) == list(range(1, 7))
  expected = expected_learning_rates(config.learning_rate, 3, 6, config.min_lr_ratio)
  np.testing.assert_allclose([logged[k] for k in range(1, 7)], expected, rtol=1e-6)


def is_norm_or_bias(path) -> bool:
  """From the module structure (a norm layer's parameters, or a bias), independently of the mask's own rule."""
  names = [str(getattr(p, "key", p)) for p in path]
  return any(n.endswith("norm") for n in names[:-1]) or names[-1].startswith("bias")


@pytest.mark.parametrize("preset", ["tiny", "baby_char", "gpt2_124m", "llama_7b"])
def test_weight_decay_mask_excludes_exactly_norms_and_biases(preset):
  """RMSNorm (tiny), LayerNorm (baby_char), biases (gpt2_124m), stacked scanned layers (llama_7b); abstract."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(PRESETS[preset], rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract))
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  mask = jax.tree.leaves(loop.weight_decay_mask(params))
  assert len(mask) == len(leaves)
  excluded = [jax.tree_util.keystr(path) for (path, _), decays in zip(leaves, mask) if not decays]
  assert excluded == [jax.tree_util.keystr(path) for path, _ in leaves if is_norm_or_bias(path)]
  assert excluded and len(excluded) < len(leaves)
  for (path, leaf), decays in zip(leaves, mask):
    if decays:  # Matrices and embeddings (stacked layers add a leading axis).
      assert leaf.ndim >= (3 if "blocks" in str(path) and PRESETS[preset].scan_layers else 2), path
  if preset == "gpt2_124m":
    assert any("bias_q" in name for name in excluded) and any("norm']['bias" in name for name in excluded)


@pytest.mark.parametrize("use_bias", [False, True])
def test_weight_decay_shrinks_matrices_and_leaves_norms_and_biases(use_bias):
  """Zero gradient, weight decay on: update 1 (at the peak rate, warmup_steps=0) multiplies every decayed
  parameter by exactly 1 − lr·wd and leaves norm scales and biases as they were."""
  config = pretrain_config.get_config()
  config.learning_rate, config.weight_decay, config.warmup_steps = 1e-2, 0.1, 0
  cfg = dataclasses.replace(PRESETS["tiny"], use_bias=use_bias, norm="layernorm" if use_bias else "rmsnorm")
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda p: p + 0.5, params)  # Nonzero biases: their decay would show.
  optimizer = loop.make_optimizer(config, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new)):
    if is_norm_or_bias(path):
      np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(after, before * (1 - 1e-2 * 0.1), rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_cpu_checkpoints_save_a_replicated_array_whole_and_restore_it(tmp_path):
  """On CPU one replica writes a replicated array: no program per replica slice (Orbax's replica-parallel save
  compiles one per slice shape at the first save, which CPU devices sharing one host gain nothing from)."""
  replicated = jax.sharding.NamedSharding(sharding.make_mesh(devices=jax.devices()), jax.sharding.PartitionSpec())
  params = {"w": jax.device_put(np.arange(16 * 1231, dtype=np.float32).reshape(16, 1231), replicated)}  # A new shape.
  compiles = []

  def listener(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    checkpointer.save(1, params, None, None, {"step": 1})
    checkpointer.manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  abstract = {"w": jax.ShapeDtypeStruct((16, 1231), np.float32, sharding=replicated)}
  np.testing.assert_array_equal(checkpointer.restore(1, abstract)["params"]["w"], np.asarray(params["w"]))


def test_checkpoint_restores_onto_other_meshes(corpus, tmp_path):
  config = tiny_config(corpus, steps=2, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  result = pretrain.run(config, str(tmp_path / "run"))
  expected = jax.device_get(result.params)
  for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (1, 4, 2)), (jax.devices()[:4], (2, 1, 2))):
    mesh = sharding.make_mesh(*shape, devices=devices)
    state = modeling.model_spec(modeling.lm_factory(result.state.merge(result.params).cfg), mesh)
    params, meta = ckpt_lib.restore_params(str(tmp_path / "run"), state.abstract_params)
    assert meta["step"] == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)
    leaf = params["blocks"][0]["mlp"]["w_in_DF"]
    assert leaf.sharding.mesh.shape == mesh.shape


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  # An absurd learning rate without clipping blows the parameters up within a few steps.
  config = tiny_config(corpus, steps=30, learning_rate=1e12, warmup_steps=0, grad_clip=0.0, checkpoint_every=1)
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss .* at step (\d+)") as error:
    pretrain.run(config, workdir, devices=jax.devices()[:1])
  bad_step = int(str(error.value).split("at step ")[1].split(";")[0])
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == bad_step - 1
  checkpointer.close()
  assert all(np.isfinite(v) for v in losses(workdir).values())


def test_truncated_checkpoint_is_a_clear_error(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  result = pretrain.run(tiny_config(corpus, steps=1, warmup_steps=0), workdir, devices=jax.devices()[:1])
  params_dir = os.path.join(workdir, "checkpoints", "1", "params")
  for root, _, files in os.walk(params_dir):
    for name in files:
      if not name.startswith("_"):
        os.remove(os.path.join(root, name))
  # The only checkpoint: nothing to fall back to; one line naming the checkpoint and the damaged item
  # (tests/test_checkpoint_faults.py covers falling back to an earlier checkpoint).
  with pytest.raises(
    UserError,
    match=r"no checkpoint in .*/checkpoints restores \(nothing was deleted\): "
    r"1: .*/checkpoints/1/params: ValueError: NOT_FOUND",
  ):
    ckpt_lib.restore_params(workdir, result.state.abstract_params)
  with pytest.raises(UserError, match=r"checkpoint .*/checkpoints/1 does not restore: .*/checkpoints/1/params: "):
    ckpt_lib.restore_params(workdir, result.state.abstract_params, step=1)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))


@pytest.mark.parametrize(
  "override, message",
  [
    ("model_overrides.num_heads=5", "num_heads=5 must divide model.d_model=64"),
    ("model_overrides.num_kv_heads=3", "num_kv_heads=3 must divide model.num_heads=4"),
    ("mesh.data=3", "mesh: data.fsdp.sequence.tensor = 3 but there are 8 devices"),
    ("mesh.sequence=3", r"mesh: .* cannot fill 8 devices \(8 is not a multiple of 3\)"),
    ("seq_len=4096", "seq_len=4096 exceeds model.max_seq_len=128"),
    ("batch_size=12", "batch_size=12 must be divisible by mesh.data.mesh.fsdp.grad_accum = 8.1"),
    ("model=gpt5", "model='gpt5': unknown preset"),
    ("data.tokenizer=words", "data.tokenizer='words' must be 'char' or 'spm'"),
  ],
)
def test_config_errors_are_one_line(corpus, tmp_path, override, message):
  key, value = override.split("=")
  config = tiny_config(corpus)
  with config.unlocked():
    parent = config
    *parents, leaf = key.split(".")
    for p in parents:
      parent = parent[p]
    parent[leaf] = type(parent[leaf])(value) if parent[leaf] is not None else int(value)
  with pytest.raises(UserError, match=message):
    pretrain.run(config, str(tmp_path / "run"))


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(corpus, tmp_path):
  workdir = tmp_path / "run"
  args = [
    sys.executable,
    os.path.join(ROOT, "experiments", "pretrain.py"),
    f"--workdir={workdir}",
    f"--config.data.path={corpus}",
    "--config.steps=100000",
    "--config.model=tiny",
    "--config.data.tokenizer=char",
    "--config.warmup_steps=0",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.log_every=1",
    "--config.eval_every=100000",
    "--config.checkpoint_every=100000",
    "--sample_tokens=0",
  ]
  env = subprocess_env()
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:  # Wait until training is under way.
    if line.startswith("step") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 3:
      break
  proc.send_signal(subprocess.signal.SIGTERM)
  proc.communicate(timeout=120)
  assert proc.returncode == 0
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert len(saved) == 1 and saved[0] >= 3
  logged = losses(str(workdir))
  assert max(logged) == saved[0]  # Stopped at the step it saved.
  rerun = subprocess.run(
    args[:4] + [f"--config.steps={saved[0] + 2}"] + args[5:], env=env, capture_output=True, text=True, timeout=300
  )
  assert rerun.returncode == 0, rerun.stderr
  assert f"resuming from step {saved[0]}" in rerun.stdout
  assert max(losses(str(workdir))) == saved[0] + 2
