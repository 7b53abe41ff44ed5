"""Ahead-of-time compilation: the real train, prefill and decode steps compiled for a TPU topology (libtpu), and
the same code path on this machine's CPU devices (always runs)."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from conftest import subprocess_env  # tests/conftest.py: the tools' environment.

from llm_jax import aot
from llm_jax.errors import UserError
from llm_jax.model import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402  (configs/pretrain.py)

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
  not HAVE_LIBTPU,
  reason="libtpu is not installed (pip install -e '.[tpu]'): "
  "TPU topologies are unavailable, so only the CPU-device AOT test runs",
)


def config(model="tiny", batch=8, seq=64, mesh=(2, 2, 2), sequence=1, **overrides):
  c = pretrain_config.get_config()
  c.model, c.batch_size, c.seq_len = model, batch, seq
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.mesh.sequence = sequence
  for key, value in overrides.items():
    c.model_overrides[key] = value
  return c


# One mesh with every axis above 1 (context parallelism included): each AOT compile costs tens of seconds.
@pytest.mark.parametrize("mesh, sequence", [((1, 2, 2), 2)])
def test_aot_on_cpu_devices_reports_memory(mesh, sequence):
  report = aot.compile_for_topology(config(mesh=mesh, sequence=sequence), "cpu", devices=jax.devices(), hbm_gib=1)
  assert [s.name for s in report.steps] == ["train", "prefill", "decode"]
  train = report.steps[0]
  assert train.argument_bytes > 0 and train.peak_bytes > 0
  assert all(report.fits(s) for s in report.steps)
  table = report.table()
  data, fsdp, tensor = mesh
  shown = f"mesh {{'data': {data}, 'fsdp': {fsdp}, 'sequence': {sequence}, 'tensor': {tensor}}}"
  assert "FITS: every step fits" in table and shown in table
  assert "attention xla" in report.description  # "auto" on CPU devices.
  # FLOPs: XLA's per-device count of the compiled step, and the model estimate for the global batch.
  model_cfg = PRESETS["tiny"]
  assert report.model_flops_per_step == model_cfg.train_flops_per_token(64) * 8 * 64
  assert 0.2 < train.xla_flops * report.num_devices / report.model_flops_per_step < 5, table
  assert "train FLOPs per step: XLA" in table


def test_expected_step_time_at_an_mfu_is_model_flops_over_the_chips_peak():
  step = aot.StepReport("train", 1.0, 1, 1, 0, 1, 1, xla_flops=2e12)
  report = aot.Report("v5p:2x2x1", "TPU v5", 4, 1, 95 * aot.GiB, {}, "m", 1, "", [step], 8e15, 459e12)
  assert report.flops_lines() == [
    "train FLOPs per step: XLA 2e+12 per device × 4 = 8e+12 (without FLOPs inside Pallas kernels: splash declares "
    "none); model (6·N + 12·layers·N_heads·H·seq per token) 8e+15",
    "expected step time at 40 % / 50 % MFU: 10.9 s / 8.71 s (459 TFLOP/s bf16 per device × 4)",
  ]


def as_training_compiles():
  """conftest.py sets "highest" matmul precision (exact CPU comparisons); training does not, and splash's bf16
  Mosaic matmuls reject fp32 contract precision ("Bad lhs type"): compile for a TPU what training compiles."""
  return jax.default_matmul_precision("default")


@needs_libtpu
def test_aot_tiny_for_v5p_topology():
  with as_training_compiles():
    report = aot.compile_for_topology(config(), "v5p:2x2x2")
  assert report.num_devices == 8 and report.num_processes == 2 and report.device_kind.startswith("TPU")
  assert report.hbm_bytes == 95 * aot.GiB
  assert [s.name for s in report.steps] == ["train", "prefill", "decode"]
  assert all(report.fits(s) and s.argument_bytes > 0 for s in report.steps), report.table()
  assert "attention splash" in report.description  # "auto" for TPU devices, though this machine has none.
  print(report.table())


@needs_libtpu
def test_aot_llama_1b_for_v5p_topology():
  # The real llama_1b shape (16 layers × 2048, vocab 128k): parameters + AdamW state fully sharded on 8 chips.
  # A short sequence and a scanned stack keep the compile quick on 2 CPU cores.
  c = config("llama_1b", batch=8, seq=128, mesh=(1, 8, 1), scan_layers=True)
  with as_training_compiles():
    report = aot.compile_for_topology(c, "v5p:2x2x2", decode=False)
  train = report.steps[0]
  params_and_adam = 3 * 4 * report.num_params / 8  # f32 params + 2 moments, each sharded 8 ways.
  assert params_and_adam <= train.argument_bytes < 1.5 * params_and_adam, report.table()
  assert report.fits(train)
  # On a chip with less HBM than the step needs, the report says so.
  small = dataclasses.replace(report, hbm_bytes=train.peak_bytes - 1)
  assert not small.fits(train) and "DOES NOT FIT: train needs more than" in small.table()


@needs_libtpu
def test_mesh_not_matching_the_topology_is_a_user_error():
  with pytest.raises(UserError, match="data.fsdp.sequence.tensor = 4 but there are 8 devices"):
    aot.compile_for_topology(config(mesh=(1, 4, 1)), "v5p:2x2x2")


def test_cli_bad_input_is_one_line_exit_2():
  env = subprocess_env(devices=None)
  cases = [(["--topology=v5p"], "expected e.g. 'v5p:4x4x4'")]
  if HAVE_LIBTPU:
    cases.append((["--topology=v5p:2x2x2", "--config.mesh.data=3"], "mesh: "))
  for args, message in cases:
    proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "aot_compile.py"), "--config.model=tiny", *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
