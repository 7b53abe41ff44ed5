"""Run one experiment as several cooperating processes on this machine, exactly as on a multi-host pod slice.

  python experiments/launch_local.py --num_processes=2 --devices_per_process=4 -- \
    experiments/pretrain.py --workdir=/tmp/mp --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

Starts `--num_processes` copies of `python <command...>` with the standard JAX multi-process environment
(JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES, JAX_PROCESS_ID), which every llm_jax experiment
passes to `jax.distributed.initialize` (on CPU the processes talk through gloo over loopback). Process 0's
output streams here; every process's output is also written to `--logs/process_<i>.log`.

If any process exits with a non-zero status (or is killed), the launcher stops the others (SIGTERM, then
SIGKILL after `--grace_seconds`), prints which process failed and the end of its log, and exits with that
process's status (128 + signal number for a killed one). A dead peer therefore never leaves the run hanging.
`--timeout_seconds` (0: none) bounds the whole run the same way.
"""

import sys

from absl import app, flags

from llm_jax.flag_parsing import parse_flags

flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer(
  "devices_per_process",
  0,
  "CPU devices per process via XLA_FLAGS=--xla_force_host_platform_device_count (0: leave XLA_FLAGS alone).",
)
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
flags.DEFINE_string("logs", "", "Directory for process_<i>.log (default: a new temporary directory).")
flags.DEFINE_float("grace_seconds", 10.0, "After a failure: seconds between SIGTERM and SIGKILL for the rest.")
flags.DEFINE_float("timeout_seconds", 0.0, "Stop every process after this long (0: no limit).")
FLAGS = flags.FLAGS


def main(argv):
  from llm_jax import launch  # No jax import: the launcher itself never touches devices.
  from llm_jax.errors import UserError

  try:
    code = launch.launch(
      argv[1:],
      num_processes=FLAGS.num_processes,
      devices_per_process=FLAGS.devices_per_process,
      port=FLAGS.port,
      log_dir=FLAGS.logs,
      grace_seconds=FLAGS.grace_seconds,
      timeout_seconds=FLAGS.timeout_seconds,
    )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    code = 2
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
