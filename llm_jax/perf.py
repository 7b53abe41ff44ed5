"""Peak-FLOP/s figures for MFU: a table for accelerators, a measurement for CPUs."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip (bf16 on accelerators), from the vendors' data sheets.
_ACCELERATOR_PEAKS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
  "NVIDIA L4": 121e12,
}


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted n×n float32 matmul on device 0: the practical peak of a CPU."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def datasheet_peak_flops(device_kind: str) -> float | None:
  """The data-sheet bf16 peak of an accelerator `device_kind` ("TPU v5", "NVIDIA H100 80GB HBM3"), else None."""
  for prefix, flops in _ACCELERATOR_PEAKS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def peak_flops_per_device() -> float:
  return datasheet_peak_flops(jax.local_devices()[0].device_kind) or measured_matmul_flops()
