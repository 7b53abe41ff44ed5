"""The training loop: learning, mesh invariance, gradient accumulation, exact resume, NaN stop, checkpoints."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm_jax import checkpoint as ckpt_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.metrics import read_metrics
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


def test_checkpoint_restores_onto_other_meshes(corpus, tmp_path):
  config = tiny_config(corpus, steps=2, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  result = pretrain.run(config, str(tmp_path / "run"))
  expected = jax.device_get(result.params)
  for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (1, 4, 2)), (jax.devices()[:4], (2, 1, 2))):
    mesh = sharding.make_mesh(*shape, devices=devices)
    state = loop.model_state(lambda rngs: pretrain.Transformer(result.state.merge(result.params).cfg, rngs=rngs),
                             mesh)
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
  with pytest.raises(UserError, match=r"no checkpoint in .*/checkpoints restores \(nothing was deleted\): "
                                      r"1: .*/checkpoints/1/params: ValueError: NOT_FOUND"):
    ckpt_lib.restore_params(workdir, result.state.abstract_params)
  with pytest.raises(UserError, match=r"checkpoint .*/checkpoints/1 does not restore: .*/checkpoints/1/params: "):
    ckpt_lib.restore_params(workdir, result.state.abstract_params, step=1)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))


@pytest.mark.parametrize("override, message", [
    ("model_overrides.num_heads=5", "num_heads=5 must divide model.d_model=64"),
    ("model_overrides.num_kv_heads=3", "num_kv_heads=3 must divide model.num_heads=4"),
    ("mesh.data=3", "mesh: data.fsdp.tensor = 3 but there are 8 devices"),
    ("seq_len=4096", "seq_len=4096 exceeds model.max_seq_len=128"),
    ("batch_size=12", "batch_size=12 must be divisible by mesh.data.mesh.fsdp.grad_accum = 8.1"),
    ("model=gpt5", "model='gpt5': unknown preset"),
    ("data.tokenizer=words", "data.tokenizer='words' must be 'char' or 'spm'"),
])
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
  args = [sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"), f"--workdir={workdir}",
          f"--config.data.path={corpus}", "--config.steps=100000", "--config.model=tiny",
          "--config.data.tokenizer=char", "--config.warmup_steps=0",
          "--config.batch_size=8", "--config.seq_len=32", "--config.log_every=1", "--config.eval_every=100000",
          "--config.checkpoint_every=100000", "--sample_tokens=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="")
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
  rerun = subprocess.run(args[:4] + ["--config.steps=%d" % (saved[0] + 2)] + args[5:], env=env,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert f"resuming from step {saved[0]}" in rerun.stdout
  assert max(losses(str(workdir))) == saved[0] + 2
