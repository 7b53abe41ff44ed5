"""What every absl main shares: distributed setup, quiet Orbax logs, and user errors as one line + exit 2."""

from __future__ import annotations

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


def define_mesh_flags(what: str = "the batch and parameters") -> None:
  """--mesh_data/--mesh_fsdp/--mesh_tensor for the tools that load a model (generate, convert_hf, lm_eval)."""
  flags.DEFINE_integer("mesh_data", -1, f"Mesh axes for {what} (-1 fills).")
  flags.DEFINE_integer("mesh_fsdp", 1, "")
  flags.DEFINE_integer("mesh_tensor", 1, "")


def mesh_from_flags():
  from llm_jax import sharding  # Imports jax: after absl has parsed flags.

  return sharding.make_mesh(flags.FLAGS.mesh_data, flags.FLAGS.mesh_fsdp, flags.FLAGS.mesh_tensor)


def run(main: Callable[[], object]) -> None:
  """Runs `main()`; a UserError becomes one line on stderr and exit status 2."""
  from llm_jax import sharding  # Imports jax: after absl has parsed flags.

  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per save.
  try:
    sharding.maybe_initialize_distributed(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id
    )
    main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
