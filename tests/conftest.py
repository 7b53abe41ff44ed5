"""Test setup: 8 simulated CPU devices (so sharding is exercised), cheap compilation, a persistent compilation
cache, absl flags; `subprocess_env()` for the tools the tests launch."""

import gc
import os
import subprocess
import sys

# Tests compile hundreds of tiny programs and run each a few times, so compile time dominates (XLA:CPU's backend
# compile was ~40 % of the suite). Two cuts, neither of which changes the HLO or reassociates floats (no fast math):
# - skip the backend's LLVM optimisation passes;
# - XLA:CPU's older fusion emitter (FAST_CODEGEN): ~2.5x less compile time per program (the new one builds an MLIR
#   module per fusion). It rounds some fusions differently from the default emitter, so a program and its scanned
#   twin can differ in the last bit; a test whose claim is "bit for bit" under the default code generator is marked
#   `default_codegen` and runs in a child pytest without it (`pytest_collection_modifyitems` below).
# FAST_CODEGEN is probed once (an XLA that no longer knows a flag aborts the process): workers inherit the answer.
FAST_CODEGEN = "--xla_cpu_use_fusion_emitters=false"
DEFAULT_CODEGEN = os.environ.get("LLM_JAX_TEST_CODEGEN") == "default"
if "LLM_JAX_TEST_FAST_CODEGEN" not in os.environ:
  probe = [sys.executable, "-c", "import jax; jax.devices()"]
  known = subprocess.run(probe, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_CODEGEN), capture_output=True)
  os.environ["LLM_JAX_TEST_FAST_CODEGEN"] = "1" if known.returncode == 0 else "0"
USE_FAST_CODEGEN = os.environ["LLM_JAX_TEST_FAST_CODEGEN"] == "1" and not DEFAULT_CODEGEN
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" + (
  f" {FAST_CODEGEN}" if USE_FAST_CODEGEN else ""
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int | None = 1) -> dict[str, str]:
  """The environment for a tool a test launches: CPU, the tests' compile flags, `devices` simulated CPU devices
  (None: no device flag, for the launcher that sets its own), the repository on PYTHONPATH."""
  xla_flags = COMPILE_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)


def run_tools(cases: list[tuple[str, list[str]]], devices: int | None = 1) -> list[dict]:
  """`python experiments/TOOL.py ARGS...` for each (tool, args), in order → [{tool, args, code, stdout, stderr}]:
  each case runs in a child forked from one process that imported the stack once (tests/cli_cases.py), which saves
  a test ~2 s of imports per command after the first."""
  import json
  import subprocess
  import sys

  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "cli_cases.py"), json.dumps(cases)],
    capture_output=True,
    text=True,
    env=subprocess_env(devices),
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


_inherited_flags = os.environ.get("XLA_FLAGS", "").replace(FAST_CODEGEN, "")  # A default_codegen child drops it.
os.environ["XLA_FLAGS"] = " ".join(
  [_inherited_flags, COMPILE_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
# Only programs that took >= 0.1 s to compile are written: 1,800 of the suite's 2,100 compile faster, and for them
# a cache write (serialise + compress, ~5 ms) cost a fresh clone's run ~10 s of worker time while a later hit
# (~15 ms to read back) saves about what it costs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import json  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
flags.FLAGS.mark_as_parsed()

# A full garbage collection (Python's generation 2) scans every live object, and a test worker holds millions (JAX
# keeps the programs it traced and compiled): with the default thresholds, 45 of them took 16 s of the suite's
# worker time (~0.4 s each). Ten times fewer: 4 s, and the same peak memory (~3 GB per worker).
gc.set_threshold(*gc.get_threshold()[:2], 100)


SENTENCES = [
  "the cat sat on the mat.",
  "a dog ran in the park.",
  "birds sing in the morning.",
  "the sun is warm today.",
  "we walk to the old bridge.",
]


@pytest.fixture
def corpus(tmp_path):
  """A small JSONL corpus of five sentences in random triples (tiny-model training tests)."""
  path = tmp_path / "corpus.jsonl"
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(200):
      f.write(json.dumps({"text": " ".join(rng.choice(SENTENCES, 3))}) + "\n")
  return str(path)


# The longest modules first, longest to shortest (as measured on 2 cores): `--dist loadfile` gives each module to one
# worker, in collection order as workers free up (setup.cfg turns off xdist's reordering by test count), so a long
# module started last would keep one worker busy after the other is done.
_LONGEST_MODULES = (
  "test_end_to_end.py",
  "test_rlhf.py",
  "test_train.py",
  "test_multiprocess.py",
  "test_inference.py",
  "test_prepared_data.py",
  "test_lora.py",
  "test_lm_eval.py",
  "test_hf.py",
  "test_aot.py",  # ~20 s with the tpu extra (libtpu: real TPU compiles), ~5 s without.
  "test_dpo.py",
  "test_sft.py",
  "test_inspect.py",
  "test_model.py",
)


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "default_codegen: a bit-for-bit claim of XLA:CPU's default code generator; runs in a child pytest"
  )


def pytest_collection_modifyitems(items):
  first = lambda item: next((i for i, m in enumerate(_LONGEST_MODULES) if item.path.name == m), len(_LONGEST_MODULES))
  items.sort(key=first)  # Stable: a module's tests keep their order.
  for item in items:
    if USE_FAST_CODEGEN and item.get_closest_marker("default_codegen"):
      item.obj = _in_default_codegen_child(item.nodeid)


def _in_default_codegen_child(nodeid: str):
  def run(**fixtures):  # The parent's fixtures go unused: the child builds its own.
    env = dict(os.environ, LLM_JAX_TEST_CODEGEN="default")
    cmd = [sys.executable, "-m", "pytest", "-q", nodeid]
    child = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, (
      f"{nodeid} under the default code generator:\n{child.stdout[-6000:]}{child.stderr[-2000:]}"
    )

  return run
