"""Time and peak memory of Hugging Face import and export at the `llama_1b` shape (bf16 files, ~2.5 GB).

  python experiments/bench_convert.py [--preset=llama_1b] [--dir=/tmp/bench_convert]

Writes a random checkpoint of the preset's shape (Llama 3.2 1B: one 2.47 GB model.safetensors), then runs
`convert_hf.py` import and export each in a fresh process and prints seconds and the process's peak RSS
next to the file size and the RSS of a process that only imported jax. Uses ~3x the file size of disk.
The tokenizer is the tiny llama3 test fixture's (the model's vocabulary is the preset's).
"""

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import types

import numpy as np
from absl import app, flags

flags.DEFINE_string("preset", "llama_1b", "A model preset (llm_jax.model.PRESETS) of Llama shape.")
flags.DEFINE_string("dir", "/tmp/bench_convert", "Scratch directory (removed first).")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama3")


def write_random_checkpoint(hf_dir: str, preset: str) -> int:
  """A random bf16 checkpoint of the preset's shape, one tensor in memory at a time per file."""
  import ml_dtypes
  import safetensors.numpy
  from flax import nnx

  from llm_jax import hf, modeling
  from llm_jax.model import PRESETS

  cfg = dataclasses.replace(PRESETS[preset], param_dtype="bfloat16", scan_layers=False, remat="none")
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: modeling.build_model(cfg, nnx.Rngs(0)))))
  flat = hf._flatten(abstract)
  rng = np.random.default_rng(0)
  tensors = {}
  for rule in hf.tensor_rules(cfg, hf.architecture_for(cfg)):
    ours = [(0.02 * rng.standard_normal(flat[p].shape, np.float32)).astype(ml_dtypes.bfloat16) for p in rule.ours]
    tensors.update(zip(rule.hf, rule.to_hf(*ours)))
  os.makedirs(hf_dir)
  safetensors.numpy.save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
  for name in os.listdir(FIXTURE):
    if name.startswith("tokenizer") or name.startswith("chat_template") or name == "generation_config.json":
      shutil.copy(os.path.join(FIXTURE, name), hf_dir)
  fixture_tokenizer = types.SimpleNamespace(bos_id=379, stop_ids=(380, 383))  # The llama3 fixture's ids.
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf.hf_config_from_model(cfg, "LlamaForCausalLM", fixture_tokenizer), f)
  return os.path.getsize(os.path.join(hf_dir, "model.safetensors"))


def timed(args: list[str]) -> tuple[float, float]:
  """(seconds, peak RSS in GB) of a fresh Python process running `args`."""
  start = time.perf_counter()
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ}
  )
  seconds = time.perf_counter() - start
  if child.returncode:
    raise SystemExit(f"{args}: exit {child.returncode}\n{child.stderr[-3000:]}")
  return seconds, float(child.stdout.strip().splitlines()[-1]) / 2**20


# Runs a script (or nothing) in-process and prints its peak RSS in KB as the last line: VmHWM, this process's
# own high-water mark (getrusage's ru_maxrss would include the parent's RSS at fork time).
_CHILD = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
if script == "-":
  import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()
else:
  try:
    runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    if e.code: raise
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def main(argv):
  del argv
  shutil.rmtree(FLAGS.dir, ignore_errors=True)
  hf_dir, workdir, export_dir = (os.path.join(FLAGS.dir, n) for n in ("hf", "workdir", "export"))
  file_bytes = write_random_checkpoint(hf_dir, FLAGS.preset)
  print(f"{FLAGS.preset}: model.safetensors {file_bytes / 2**30:.2f} GiB (bf16)", flush=True)
  _, base_gb = timed(["-"])
  script = os.path.join(ROOT, "experiments", "convert_hf.py")
  import_s, import_gb = timed([script, f"--hf_dir={hf_dir}", f"--workdir={workdir}"])
  export_s, export_gb = timed([script, f"--workdir={workdir}", f"--export_dir={export_dir}"])
  out_bytes = sum(os.path.getsize(os.path.join(export_dir, n)) for n in os.listdir(export_dir) if "safetensors" in n)
  print(f"baseline (python + jax): peak RSS {base_gb:.2f} GiB")
  print(f"import: {import_s:.1f} s, peak RSS {import_gb:.2f} GiB ({import_gb / (file_bytes / 2**30):.2f}x the file)")
  print(f"export: {export_s:.1f} s, peak RSS {export_gb:.2f} GiB, wrote {out_bytes / 2**30:.2f} GiB")
  file_gb = file_bytes / 2**30
  print(f"peak RSS in file sizes: import {import_gb / file_gb:.2f}x, export {export_gb / file_gb:.2f}x")
  shutil.rmtree(FLAGS.dir, ignore_errors=True)


if __name__ == "__main__":
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  app.run(main)
