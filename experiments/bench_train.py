"""Benchmark the real training step (the one `llm_jax.train.loop` runs) on random tokens; print a table.

  python experiments/bench_train.py --model=baby_char --batch_size=12 --seq_len=64 --steps=50
  python experiments/bench_train.py --model=gpt2_char --batch_size=64 --seq_len=256 --steps=3 --warmup_steps=1
  python experiments/bench_train.py --compare_forward   # also time forward and forward+backward alone

Model FLOPs per token = 6·N + 12·L·d_attn·T (`ModelConfig.train_flops_per_token`: N parameters without the
position table, L layers, d_attn = heads·head_dim, T = seq_len). MFU = achieved FLOP/s over the measured f32
matmul peak of this machine (`llm_jax.perf.measured_matmul_flops`) on CPU, or the data-sheet peak on GPU/TPU.

CPU notes (2-core host, f32): big batches are memory-bound: gpt2_char at batch 64 runs ~1.8x faster with
--grad_accum=8 (2,048-token microbatches stay in cache; same update). Large activations are freshly mmapped and
page-faulted every step by glibc malloc; GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=68719476736 (or jemalloc with MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always)
removes most of that at grad_accum=1.
"""

import dataclasses
import resource
import statistics
import time

from absl import app, flags

flags.DEFINE_string("model", "baby_char", "Model preset (llm_jax.model.PRESETS).")
flags.DEFINE_integer("batch_size", 12, "Global batch (rows).")
flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after the compiling one.")
flags.DEFINE_integer("grad_accum", 1, "Microbatches per step.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Rematerialization of each block.")
flags.DEFINE_bool("scan_layers", None, "Override the preset's scan_layers.")
flags.DEFINE_integer("vocab_size", 0, "Override the preset's vocabulary (0: keep).")
flags.DEFINE_integer("data", -1, "Mesh axis sizes (-1: the rest of the devices).")
flags.DEFINE_integer("fsdp", 1, "")
flags.DEFINE_integer("tensor", 1, "")
flags.DEFINE_bool("compare_forward", False, "Also time the forward pass and forward+backward alone.")
FLAGS = flags.FLAGS


def _time(fn, steps: int) -> list[float]:
  """Wall seconds per call of `fn()` (which must block until its result is ready)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  from llm_jax import cli

  cli.run(bench)


def bench():
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from llm_jax import perf, sharding
  from llm_jax.config import validate_model_config
  from llm_jax.errors import UserError
  from llm_jax.model import PRESETS
  from llm_jax.modeling import init_params, lm_factory, model_spec
  from llm_jax.sequences import next_token_loss
  from llm_jax.train import loop

  if FLAGS.model not in PRESETS:
    raise UserError(f"--model={FLAGS.model}: unknown preset; choose one of {sorted(PRESETS)}")
  for name in ("batch_size", "seq_len", "steps", "grad_accum"):
    if FLAGS[name].value < 1:
      raise UserError(f"--{name}={FLAGS[name].value} must be >= 1")
  if FLAGS.warmup_steps < 0 or FLAGS.vocab_size < 0:
    raise UserError("--warmup_steps and --vocab_size must be >= 0")
  overrides = dict(dtype=FLAGS.dtype, remat=FLAGS.remat)
  if FLAGS.scan_layers is not None:
    overrides["scan_layers"] = FLAGS.scan_layers
  if FLAGS.vocab_size:
    overrides["vocab_size"] = FLAGS.vocab_size
  cfg = dataclasses.replace(PRESETS[FLAGS.model], **overrides)
  validate_model_config(cfg)
  b, t = FLAGS.batch_size, FLAGS.seq_len
  if t > cfg.max_seq_len:
    raise UserError(f"--seq_len={t} exceeds the model's max_seq_len={cfg.max_seq_len}")
  shape = sharding.mesh_shape(FLAGS.data, FLAGS.fsdp, FLAGS.tensor, jax.device_count())
  if b % (shape[0] * shape[1] * FLAGS.grad_accum):
    raise UserError(
      f"--batch_size={b} must be divisible by data*fsdp*grad_accum = {shape[0]}*{shape[1]}*{FLAGS.grad_accum}"
    )
  config = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-3,
      warmup_steps=10,
      steps=1000,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.99,
      grad_clip=1.0,
      seed=0,
      grad_accum=FLAGS.grad_accum,
    )
  )

  mesh = sharding.make_mesh(FLAGS.data, FLAGS.fsdp, FLAGS.tensor)
  factory = lm_factory(cfg)
  state = model_spec(factory, mesh)
  params = init_params(factory, state, config.seed)
  optimizer = loop.make_optimizer(config, state.abstract_params)
  opt_shardings = loop.opt_state_shardings(optimizer, state, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int32)
  local = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    "segment_ids": np.ones((b, t), np.int32),
    "loss_mask": np.ones((b, t), np.int32),
  }
  batch = sharding.global_batch(local, mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in local.items()}
  train_step = loop.make_train_step(
    state, next_token_loss, optimizer, mesh, opt_shardings, batch_shardings, config.grad_accum, config.seed
  )

  step_number = 0

  def run_step():
    nonlocal params, opt_state, step_number
    params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step_number))
    step_number += 1
    jax.block_until_ready(metrics)
    return metrics

  compile_s = _time(run_step, 1)[0]  # Compile + first run.
  _time(run_step, FLAGS.warmup_steps)
  times = _time(run_step, FLAGS.steps)
  loss = float(run_step()["loss"])

  rows = []
  if FLAGS.compare_forward:

    def loss_of(p):
      return next_token_loss(state.merge(p), batch, None)[0]

    forward = jax.jit(loss_of)
    forward_backward = jax.jit(jax.value_and_grad(loss_of))
    for name, fn in (("forward ms (median)", forward), ("forward+backward ms (median)", forward_backward)):
      jax.block_until_ready(fn(params))
      times_fn = _time(lambda: jax.block_until_ready(fn(params)), max(FLAGS.steps, 3))
      rows.append((name, f"{1000 * statistics.median(times_fn):.1f}"))

  on_cpu = jax.devices()[0].platform == "cpu"
  peak_1024 = perf.measured_matmul_flops()
  peak_2048 = perf.measured_matmul_flops(2048)
  peak = (max(peak_1024, peak_2048) if on_cpu else perf.peak_flops_per_device()) * mesh.size
  tokens_per_step = b * t
  flops_per_token = cfg.train_flops_per_token(t)
  mean_s, median_s = statistics.mean(times), statistics.median(times)
  tokens_per_s = tokens_per_step / median_s
  achieved = flops_per_token * tokens_per_s
  stats = jax.devices()[0].memory_stats() if not on_cpu else None
  if stats and "peak_bytes_in_use" in stats:
    memory = f"{stats['peak_bytes_in_use'] / 2**20:,.0f} MiB (device 0 peak_bytes_in_use)"
  else:
    memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB (process max RSS)"

  rows = [
    (
      "model",
      f"{FLAGS.model} ({cfg.num_layers} layers, d={cfg.d_model}, {cfg.num_heads} heads, "
      f"vocab {cfg.vocab_size}, {cfg.dtype}, remat={cfg.remat}, scan={cfg.scan_layers})",
    ),
    ("devices / mesh", f"{jax.device_count()} x {jax.devices()[0].device_kind}; {dict(mesh.shape)}"),
    ("params", f"{cfg.num_params():,}"),
    ("tokens/step", f"{tokens_per_step:,} ({b} x {t}, grad_accum {FLAGS.grad_accum})"),
    ("compile + first step s", f"{compile_s:.2f}"),
    ("step ms (mean / median)", f"{1000 * mean_s:.1f} / {1000 * median_s:.1f}  ({FLAGS.steps} steps)"),
    ("tokens/s (median)", f"{tokens_per_s:,.0f}"),
    ("model FLOPs/token", f"{flops_per_token / 1e6:.2f} M  (6N + 12·L·d_attn·T)"),
    ("achieved TFLOP/s", f"{achieved / 1e12:.4f}"),
    (
      "f32 matmul peak TFLOP/s",
      f"{peak_1024 / 1e12:.4f} (1024²), {peak_2048 / 1e12:.4f} (2048²)"
      if on_cpu
      else f"{peak / mesh.size / 1e12:.1f} per device (data sheet)",
    ),
    ("MFU", f"{100 * achieved / peak:.1f} %"),
    ("peak memory", memory),
    ("final loss", f"{loss:.4f}"),
  ] + rows
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
  from llm_jax import cli

  app.run(main, flags_parser=cli.parse_flags)
