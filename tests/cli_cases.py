"""Runs command-line tools as `python experiments/TOOL.py ARGS...` for many cases in one process.

    python tests/cli_cases.py '[["generate", ["--workdir=W", "--prompt=hi"]], ...]'

prints a JSON list of {tool, args, code, stdout, stderr}. The stack is imported once (~3 s); each case then runs in
a forked child, exactly as its own process would (fresh absl flags, sys.argv, exit status, output), in a fraction
of a second. Nothing has touched a JAX backend before the fork: each child starts its own. As for
`python experiments/TOOL.py`, experiments/ comes first on the import path before anything is imported, so the stack
meets experiments/inspect.py where it imports the standard library's `inspect`, as every tool's process does.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(cases):
  sys.path[0] = os.path.join(ROOT, "experiments")  # The script's folder, as `python experiments/TOOL.py` has it.
  import flax.nnx  # noqa: F401  (the slow imports, once: the children inherit them)
  import grain  # noqa: F401
  import jax  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401

  import llm_jax.evaluation  # noqa: F401
  import llm_jax.tasks.world_facts.end_to_end  # noqa: F401

  results = []
  for tool, args in cases:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      pid = os.fork()
      if pid == 0:  # The child: `python experiments/TOOL.py ARGS...`.
        code = 1
        try:
          os.dup2(err.fileno(), 2)
          os.dup2(out.fileno(), 1)
          path = os.path.join(ROOT, "experiments", f"{tool}.py")
          sys.argv = [path] + list(args)
          runpy.run_path(path, run_name="__main__")
          code = 0
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (a traceback is what the test looks for)
          traceback.print_exc()
        finally:
          sys.stdout.flush()
          sys.stderr.flush()
          os._exit(code)
      _, status = os.waitpid(pid, 0)
      out.seek(0)
      err.seek(0)
      results.append(
        {
          "tool": tool,
          "args": list(args),
          "code": os.waitstatus_to_exitcode(status),
          "stdout": out.read().decode(errors="replace"),
          "stderr": err.read().decode(errors="replace"),
        }
      )
  return results


if __name__ == "__main__":
  print(json.dumps(main(json.loads(sys.argv[1]))))
