"""Local multi-process launcher: N copies of one command on loopback, as the hosts of a pod slice would run it.

Each process gets the standard JAX multi-process environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), which `llm_jax.sharding.maybe_initialize_distributed` passes to `jax.distributed.initialize`.
Process 0's output is streamed; all output also goes to `process_<i>.log`. The first process to fail (non-zero
exit or a signal) stops the rest: SIGTERM to each process group, SIGKILL after a grace period. No jax import
here: the launcher never touches devices.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from llm_jax.errors import UserError


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict[str, str], coordinator: str, num_processes: int, process_id: int, devices_per_process: int
) -> dict[str, str]:
  env = dict(
    base,
    JAX_COORDINATOR_ADDRESS=coordinator,
    JAX_NUM_PROCESSES=str(num_processes),
    JAX_PROCESS_ID=str(process_id),
    PYTHONUNBUFFERED="1",
  )
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def _exit_code(returncode: int) -> int:
  """subprocess gives -N for a signal; report it the way a shell does (128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"killed by signal {-returncode}"
  return f"exit status {returncode}"


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def _stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
  """SIGTERM every live process group, then SIGKILL whatever is left after `grace_seconds`."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + grace_seconds
  for p in live:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      pass
  for p in live:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _checked_command(command: Sequence[str], num_processes: int, devices_per_process: int, port: int) -> list[str]:
  command = list(command)
  if not command:
    raise UserError("no command to launch: put it after `--`, e.g. `-- experiments/pretrain.py --workdir=...`")
  if num_processes < 1:
    raise UserError(f"num_processes={num_processes} must be >= 1")
  if devices_per_process < 0:
    raise UserError(f"devices_per_process={devices_per_process} must be >= 0")
  if not 0 <= port < 65536:
    raise UserError(f"port={port} must be in [0, 65536)")
  if command[0].endswith(".py"):
    if not os.path.exists(command[0]):
      raise UserError(f"{command[0]}: no such script")
    command = [sys.executable] + command
  return command


def _wait(
  procs: list[subprocess.Popen],
  threads: list[threading.Thread],
  logs: list[str],
  grace_seconds: float,
  timeout_seconds: float,
  poll_seconds: float,
) -> int:
  """Until every process succeeded (0), one failed (its status; the others are stopped) or the timeout (124)."""
  start = time.monotonic()
  while True:
    codes = [p.poll() for p in procs]
    failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i = failed[0]
      _stop(procs, grace_seconds)
      for t in threads:
        t.join(timeout=5)
      print(
        f"launch_local: process {i} failed ({_describe(codes[i])}); stopped the other processes. "
        f"End of {logs[i]}:\n{_tail(logs[i])}",
        file=sys.stderr,
        flush=True,
      )
      return _exit_code(codes[i]) or 1
    if all(c == 0 for c in codes):
      for t in threads:
        t.join(timeout=5)
      return 0
    if timeout_seconds and time.monotonic() - start > timeout_seconds:
      _stop(procs, grace_seconds)
      print(
        f"launch_local: timed out after {timeout_seconds:.0f} s; stopped all processes", file=sys.stderr, flush=True
      )
      return 124
    time.sleep(poll_seconds)


def _raise_sigterm(*_):
  raise SystemExit(128 + signal.SIGTERM)


def launch(
  command: Sequence[str],
  num_processes: int = 2,
  devices_per_process: int = 0,
  port: int = 0,
  log_dir: str = "",
  grace_seconds: float = 10.0,
  timeout_seconds: float = 0.0,
  poll_seconds: float = 0.1,
  out=None,
) -> int:
  """Runs `command` as `num_processes` cooperating processes; returns the exit status (0: all succeeded)."""
  out = out or sys.stdout
  command = _checked_command(command, num_processes, devices_per_process, port)
  log_dir = log_dir or tempfile.mkdtemp(prefix="launch_local_")
  os.makedirs(log_dir, exist_ok=True)
  coordinator = f"127.0.0.1:{port or free_port()}"
  print(f"launch_local: {num_processes} processes, coordinator {coordinator}, logs in {log_dir}", file=out, flush=True)

  previous_handler = None
  if threading.current_thread() is threading.main_thread():  # SIGTERM here: stop the processes, then exit.
    previous_handler = signal.signal(signal.SIGTERM, _raise_sigterm)
  procs: list[subprocess.Popen] = []
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(num_processes)]
  threads = []
  try:
    for i in range(num_processes):
      env = process_env(dict(os.environ), coordinator, num_processes, i, devices_per_process)
      log = open(logs[i], "w")
      if i == 0:  # Stream process 0 and keep a copy in its log.
        proc = subprocess.Popen(
          command,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          start_new_session=True,
          text=True,
          errors="replace",
        )

        def pump(stream=proc.stdout, log=log):
          for line in stream:
            out.write(line)
            out.flush()
            log.write(line)
          log.close()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        threads.append(thread)
      else:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
      procs.append(proc)
    print(f"launch_local: process ids {[p.pid for p in procs]}", file=out, flush=True)

    return _wait(procs, threads, logs, grace_seconds, timeout_seconds, poll_seconds)
  except BaseException:  # Ctrl-C, SIGTERM or a bug here: never leave processes behind.
    _stop(procs, grace_seconds)
    raise
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
