"""Test setup: 8 simulated CPU devices (so sharding is exercised), a persistent compilation cache, absl flags."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after XLA_FLAGS)
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
flags.FLAGS.mark_as_parsed()
