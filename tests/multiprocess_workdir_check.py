"""Run as 2 processes by tests/test_multiprocess.py: process 1 reaches a new workdir's check 2 s after process 0,
which by then could have made the checkpoint directory that a run creates next. Both must see the same workdir (no
checkpoints) and go on together; deciding apart sent them into different collectives, where both waited forever.

    python experiments/launch_local.py --num_processes=2 -- tests/multiprocess_workdir_check.py WORKDIR
"""

import sys
import time

import jax

from llm_jax import checkpoint as ckpt_lib
from llm_jax import sharding

sharding.maybe_initialize_distributed()
workdir = sys.argv[1]
if jax.process_index() == 1:
  time.sleep(2)
meta = ckpt_lib.workdir_meta(workdir)  # What a stage checks first...
checkpointer = ckpt_lib.Checkpointer(workdir)  # ...then its trainer makes the checkpoint directory.
checkpointer.close()
print(f"process {jax.process_index()}: checkpoints before: {meta}", flush=True)
