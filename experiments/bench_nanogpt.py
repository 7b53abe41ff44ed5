"""Side by side with real nanoGPT on its own shakespeare_char CPU configs: training tokens/s of nanoGPT's `train.py`
(PyTorch eager, --device=cpu --compile=False) and of `experiments/pretrain.py`, run one after the other in this one
invocation (the box is shared and noisy: only the ratio of one run means much).

  git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT      # any checkout; needs torch, numpy, requests
  python experiments/bench_nanogpt.py --nanogpt=/tmp/nanoGPT                 # "baby": ~2 min on a 2-core CPU
  python experiments/bench_nanogpt.py --nanogpt=/tmp/nanoGPT --preset=full --steps=20 --rounds=1

baby: 4 layers × 128 wide, 4 heads, block 64, batch 12, lr 1e-3 (nanoGPT's README CPU run). full: nanoGPT's
train_shakespeare_char.py (6 × 384, 6 heads, block 256, batch 64); llm_jax adds --config.grad_accum=8 there
(configs/pretrain.py's docstring: same update, 2,048-token microbatches stay in cache).
Both read ../shared/data/tinyshakespeare.txt (or --text) as characters. Throughput is the median over each run's
steady-state steps: nanoGPT's per-iteration times (iterations 10+; it evaluates only at iteration 0 here),
llm_jax's progress-log windows after the compiling step (its evaluation and checkpoint time excluded as well).
Not used by tests or CI.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

flags.DEFINE_string("nanogpt", None, "Path to a nanoGPT checkout (its train.py and config/ are used).", required=True)
flags.DEFINE_enum("preset", "baby", ["baby", "full"], "Which shakespeare_char configuration.")
flags.DEFINE_integer("steps", 300, "Training steps (iterations) of each run.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds (nanoGPT, llm_jax, nanoGPT, ...); medians over rounds.")
flags.DEFINE_string("text", os.path.join(_ROOT, "..", "shared", "data", "tinyshakespeare.txt"), "The corpus.")
flags.DEFINE_string("python", sys.executable, "Python that runs nanoGPT (needs torch and numpy).")
flags.DEFINE_multi_string("llm_jax_flag", [], "Extra flags for experiments/pretrain.py (e.g. --config.grad_accum=4).")
FLAGS = flags.FLAGS

PRESETS = {
  "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, model="baby_char", grad_accum=1),
  "full": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, model="gpt2_char", grad_accum=8),
}


def _run(cmd: list[str], cwd: str) -> str:
  proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
  return proc.stdout + proc.stderr


def prepare_nanogpt_data(nanogpt: str) -> None:
  """nanoGPT's own char-level prepare.py, fed our copy of the corpus (it downloads only when input.txt is missing)."""
  folder = os.path.join(nanogpt, "data", "shakespeare_char")
  if os.path.exists(os.path.join(folder, "train.bin")):
    return
  shutil.copy(FLAGS.text, os.path.join(folder, "input.txt"))
  _run([FLAGS.python, "prepare.py"], folder)


def nanogpt_tokens_per_second(p: dict, out_dir: str) -> float:
  steps = FLAGS.steps
  log = _run(
    [
      FLAGS.python,
      "train.py",
      "config/train_shakespeare_char.py",
      "--device=cpu",
      "--compile=False",
      "--dtype=float32",
      f"--out_dir={out_dir}",
      "--eval_iters=20",
      f"--eval_interval={steps + 1}",
      "--log_interval=1",
      "--always_save_checkpoint=False",
      f"--block_size={p['block_size']}",
      f"--batch_size={p['batch_size']}",
      f"--n_layer={p['n_layer']}",
      f"--n_head={p['n_head']}",
      f"--n_embd={p['n_embd']}",
      f"--max_iters={steps}",
      f"--lr_decay_iters={steps}",
      "--dropout=0.0",
      "--learning_rate=1e-3",
    ],
    FLAGS.nanogpt,
  )
  times_ms = [
    float(m.group(2)) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log) if int(m.group(1)) >= 10
  ]
  if not times_ms:
    sys.exit(f"no iteration times in nanoGPT's output:\n{log[-2000:]}")
  return p["batch_size"] * p["block_size"] / (statistics.median(times_ms) / 1000)


def llm_jax_tokens_per_second(p: dict, workdir: str) -> float:
  steps = FLAGS.steps
  # At most configs/pretrain.py's steps_per_call (50; jitted calls stop at log boundaries), and ≥ 2 windows.
  log_every = max(1, min(50, steps // 6))
  log = _run(
    [
      sys.executable,
      os.path.join(_ROOT, "experiments", "pretrain.py"),
      f"--workdir={workdir}",
      f"--config.model={p['model']}",
      f"--config.data.path={FLAGS.text}",
      "--config.data.tokenizer=char",
      f"--config.seq_len={p['block_size']}",
      f"--config.batch_size={p['batch_size']}",
      f"--config.grad_accum={p['grad_accum']}",
      f"--config.steps={steps}",
      "--config.learning_rate=1e-3",
      f"--config.warmup_steps={min(100, steps // 3)}",
      "--config.weight_decay=0.1",
      "--config.b2=0.99",
      f"--config.eval_every={steps}",
      f"--config.checkpoint_every={steps}",
      f"--config.log_every={log_every}",
      "--sample_tokens=0",
      *FLAGS.llm_jax_flag,
    ],
    _ROOT,
  )
  rates = [float(m.group(1).replace(",", "")) for m in re.finditer(r"  ([\d,]+) tok/s", log)]
  if len(rates) < 2:
    sys.exit(f"too few progress lines in pretrain.py's output:\n{log[-2000:]}")
  return statistics.median(rates[1:])  # The first window holds the compiling step's neighbours.


def main(argv):
  del argv
  p = PRESETS[FLAGS.preset]
  if not os.path.exists(os.path.join(FLAGS.nanogpt, "train.py")):
    sys.exit(f"--nanogpt={FLAGS.nanogpt}: no train.py there")
  prepare_nanogpt_data(FLAGS.nanogpt)
  nano, ours = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(FLAGS.rounds):
      nano.append(nanogpt_tokens_per_second(p, os.path.join(tmp, f"nanogpt_{r}")))
      ours.append(llm_jax_tokens_per_second(p, os.path.join(tmp, f"llm_jax_{r}")))
      print(f"round {r + 1}: nanoGPT {nano[-1]:,.0f} tok/s, llm_jax {ours[-1]:,.0f} tok/s ({ours[-1] / nano[-1]:.2f}x)")
  n, o = statistics.median(nano), statistics.median(ours)
  print(
    f"\n{FLAGS.preset} ({p['n_layer']} layers × {p['n_embd']}, block {p['block_size']}, batch {p['batch_size']}), "
    f"{FLAGS.steps} steps, {FLAGS.rounds} round(s), {os.cpu_count()} CPUs"
  )
  print(f"nanoGPT (PyTorch eager)  {n:>10,.0f} tokens/s")
  print(f"llm_jax pretrain.py      {o:>10,.0f} tokens/s   {o / n:.2f}x nanoGPT")


if __name__ == "__main__":
  app.run(main)
