"""Multi-process runs through jax.distributed: 2 processes × 4 CPU devices ≡ 1 process × 8 devices.

The processes are started by experiments/launch_local.py exactly as a user would (gloo collectives over
loopback); each reads only its own rows of every global batch, process 0 alone writes metrics.jsonl, and Orbax
saves and restores checkpoints collectively.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import run_tools, subprocess_env  # tests/conftest.py: the tools' environment.

from llm_jax.metrics import read_metrics
from llm_jax.train import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402  (configs/pretrain.py)

# The schedule must not depend on `steps` (min_lr_ratio=1: constant after warmup), so a 3-step run resumed to
# 6 steps is the same computation as one 6-step run.
OVERRIDES = {
  "model": "tiny",
  "data.tokenizer": "char",
  "batch_size": 8,
  "seq_len": 32,
  "learning_rate": 3e-3,
  "warmup_steps": 2,
  "min_lr_ratio": 1.0,
  "log_every": 1,
  "eval_every": 1000,
  "checkpoint_every": 1000,
  "eval_batches": 2,
  "model_overrides.num_kv_heads": 2,
  "mesh.data": 2,
  "mesh.fsdp": 2,
  "mesh.tensor": 2,
}


def env():
  """The tools' environment with no device count (the launcher gives each process 4)."""
  e = subprocess_env(devices=None)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(name, None)
  return e


def launcher_args(workdir, corpus, steps, *extra, launcher_flags=()):
  return [
    sys.executable,
    os.path.join(ROOT, "experiments", "launch_local.py"),
    "--num_processes=2",
    "--devices_per_process=4",
    "--grace_seconds=5",
    *launcher_flags,
    "--",
    os.path.join(ROOT, "experiments", "pretrain.py"),
    f"--workdir={workdir}",
    f"--config.data.path={corpus}",
    f"--config.steps={steps}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
    *extra,
  ]


def losses(workdir, key="loss"):
  return {row["step"]: row[key] for row in read_metrics(workdir) if key in row}


def test_two_processes_equal_one_and_resume_exactly(corpus, tmp_path):
  one = pretrain_config.get_config()
  one.data.path, one.steps = corpus, 6
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split(".")
    target = one
    for p in parents:
      target = target[p]
    target[leaf] = value
  pretrain.run(one, str(tmp_path / "one"), devices=jax.devices())  # 1 process × 8 devices.

  workdir = tmp_path / "two"
  first = subprocess.run(
    launcher_args(workdir, corpus, 3, "--sample_tokens=0"), env=env(), capture_output=True, text=True, timeout=300
  )
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2}" in first.stdout
  assert sorted(losses(str(workdir))) == [1, 2, 3]
  # Resumed: both processes restore step 3 (and their own data iterators), then sample after training.
  second = subprocess.run(
    launcher_args(workdir, corpus, 6, "--sample_tokens=4"), env=env(), capture_output=True, text=True, timeout=300
  )
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert "resuming from step 3" in second.stdout
  assert second.stdout.count("sample: ") == 2  # Process 0 prints; process 1's output is only in its log.

  for key in ("loss", "grad_norm"):
    a, b = losses(str(tmp_path / "one"), key), losses(str(workdir), key)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6], (a, b)
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5, err_msg=key)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_a_killed_process_stops_the_launcher(corpus, tmp_path):
  args = launcher_args(
    tmp_path / "run", corpus, 100000, "--sample_tokens=0", launcher_flags=[f"--logs={tmp_path}/logs"]
  )
  proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pids = None
  try:
    for line in proc.stdout:
      if line.startswith("launch_local: process ids"):
        pids = json.loads(line.split("process ids", 1)[1])
      if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 2:
        break  # Training is under way in both processes.
    assert pids and len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - killed
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGKILL, stderr
  assert "process 1 failed (killed by SIGKILL)" in stderr
  assert elapsed < 30, elapsed  # Detected at once; the survivor gets SIGTERM, then SIGKILL after 5 s.
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)  # The survivor is gone too.


def test_processes_that_reach_a_new_workdir_apart_agree_on_it(tmp_path):
  """Process 1 checks the workdir 2 s after process 0 (tests/multiprocess_workdir_check.py): both find no
  checkpoints, then make the checkpoint directory together, instead of waiting for each other forever."""
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "launch_local.py"),
      "--num_processes=2",
      "--devices_per_process=1",
      "--timeout_seconds=60",
      f"--logs={tmp_path}/logs",
      "--",
      os.path.join(ROOT, "tests", "multiprocess_workdir_check.py"),
      str(tmp_path / "run"),
    ],
    env=env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "process 0: checkpoints before: None" in proc.stdout
  assert "process 1: checkpoints before: None" in (tmp_path / "logs" / "process_1.log").read_text()


def test_bad_process_id_is_one_line_exit_2(tmp_path):
  cases = [
    (["--num_processes=2", "--process_id=2"], "process_id=2 must be in [0, num_processes=2)"),
    (["--num_processes=2", "--process_id=-1"], "process_id=-1 must be in [0, num_processes=2)"),
  ]
  common = [f"--workdir={tmp_path}/w", "--coordinator_address=127.0.0.1:1"]
  for (_, message), result in zip(cases, run_tools([("pretrain", [*common, *args]) for args, _ in cases])):
    assert result["code"] == 2, result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert lines == [f"error: {message}"], result["stderr"]


def test_launcher_bad_input_is_one_line_exit_2(tmp_path):
  for args, message in (
    (["--num_processes=0", "--", "experiments/pretrain.py"], "num_processes=0 must be >= 1"),
    (["--num_processes=2"], "no command to launch"),
    (["--", f"{tmp_path}/missing.py"], "missing.py: no such script"),
  ):
    proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "launch_local.py"), *args],
      env=env(),
      capture_output=True,
      text=True,
      timeout=60,
      cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_batch_shards_must_split_across_processes():
  from llm_jax import config as config_lib
  from llm_jax.errors import UserError

  config = pretrain_config.get_config()
  config.model, config.batch_size = "tiny", 8
  # The batch is not split over devices, so 2 processes could not each feed their own rows.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 8
  with pytest.raises(UserError, match="mesh.data.mesh.fsdp = 1 must be a multiple of the process count 2"):
    config_lib.validate_training_config(config, 8, process_count=2)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config_lib.validate_training_config(config, 8, process_count=2)
