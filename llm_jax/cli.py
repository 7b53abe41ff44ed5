"""What every absl main shares: distributed setup, quiet Orbax logs, and user errors as one line + exit 2."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

from absl import flags, logging

from llm_jax.errors import UserError
from llm_jax.flag_parsing import parse_flags  # noqa: F401  (re-exported: `app.run(main, flags_parser=cli.parse_flags)`)

flags.DEFINE_string(
  "coordinator_address",
  "",
  "host:port of process 0 for multi-process runs (or JAX_COORDINATOR_ADDRESS; TPU pods and SLURM are detected by JAX).",
)
flags.DEFINE_integer("num_processes", 0, "Number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's index (or JAX_PROCESS_ID).")
flags.DEFINE_integer(
  "cpu_devices",
  0,
  "CPU runs: split the host into this many XLA devices (the mesh's data axis then runs one per core) instead of "
  "one device that threads each op over every core. Small models' ops split badly over threads: nanoGPT's baby "
  "config trains 1.39x faster with 2 on 2 cores (experiments/bench_nanogpt.py). 0: JAX's default (one device). "
  "Batch sizes must then divide by the data axis. Ignored by GPU/TPU devices.",
)


def define_mesh_flags(what: str = "the batch and parameters") -> None:
  """--mesh_data/--mesh_fsdp/--mesh_sequence/--mesh_tensor for the tools that load a model (generate, convert_hf,
  lm_eval, inspect)."""
  flags.DEFINE_integer("mesh_data", -1, f"Mesh axes for {what} (-1 fills).")
  flags.DEFINE_integer("mesh_fsdp", 1, "")
  flags.DEFINE_integer(
    "mesh_sequence", 1, "Context parallelism: each row's tokens split over this axis (not for decoding tools)."
  )
  flags.DEFINE_integer("mesh_tensor", 1, "")


def mesh_flag_values(decodes: bool = False) -> tuple[int, int, int, int]:
  """(data, fsdp, tensor, sequence) from the flags. A tool that decodes refuses --mesh_sequence > 1: the KV-cache
  sampler never splits the sequence, so those chips would only repeat the others' work."""
  values = flags.FLAGS.mesh_data, flags.FLAGS.mesh_fsdp, flags.FLAGS.mesh_tensor, flags.FLAGS.mesh_sequence
  if decodes and values[3] != 1:
    raise UserError(
      f"--mesh_sequence={values[3]}: decoding does not split the sequence (context parallelism is for training); "
      "use --mesh_sequence=1"
    )
  return values


def mesh_from_flags(decodes: bool = False):
  from llm_jax import sharding  # Imports jax: after absl has parsed flags.

  data, fsdp, tensor, sequence = mesh_flag_values(decodes)
  return sharding.make_mesh(data, fsdp, tensor, sequence=sequence)


def run(main: Callable[[], object]) -> None:
  """Runs `main()`; a UserError becomes one line on stderr and exit status 2."""
  from llm_jax import sharding  # Imports jax: after absl has parsed flags.

  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per save.
  # What is imported by now (jax and its dependencies) lives as long as the process: full collections no longer
  # scan it (they took ~0.2 s of a 4-s tool run, ~5 %).
  gc.freeze()
  try:
    if flags.FLAGS.cpu_devices < 0:
      raise UserError(f"--cpu_devices={flags.FLAGS.cpu_devices} must be >= 0 (0: one CPU device)")
    if flags.FLAGS.cpu_devices:
      import jax  # noqa: PLC0415  (before any device is touched: the CPU client reads it when it starts)

      jax.config.update("jax_num_cpu_devices", flags.FLAGS.cpu_devices)
    sharding.maybe_initialize_distributed(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id
    )
    main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
