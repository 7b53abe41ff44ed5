"""Test setup: 8 simulated CPU devices (so sharding is exercised), cheap compilation, a persistent compilation
cache, absl flags; `subprocess_env()` for the tools the tests launch."""

import os

# Tests compile hundreds of tiny programs and run each a few times, so compile time dominates: skip XLA's backend
# (LLVM) optimisation passes. The HLO is unchanged and floats are not reassociated (no fast math); every tolerance and
# bit-exactness test passes with them. (XLA:CPU's older fusion emitter, --xla_cpu_use_fusion_emitters=false, compiles
# ~1/3 faster still, but a scanned step then rounds differently from a single one: the bit-exactness tests fail.)
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
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


os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), COMPILE_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import json  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
flags.FLAGS.mark_as_parsed()


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


# The longest modules first. `--dist loadfile` gives each module to one worker, in collection order as workers free
# up; started last, the end-to-end module alone (~2 min) would keep one worker busy long after the other is done.
_LONGEST_MODULES = ("test_end_to_end.py", "test_multiprocess.py", "test_prepared_data.py", "test_rlhf.py")


def pytest_collection_modifyitems(items):
  first = lambda item: next((i for i, m in enumerate(_LONGEST_MODULES) if item.path.name == m), len(_LONGEST_MODULES))
  items.sort(key=first)  # Stable: a module's tests keep their order.
