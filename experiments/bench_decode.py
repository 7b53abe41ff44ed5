"""Benchmark generation: prefill, KV-cached decoding (the real `Sampler`), and a no-cache baseline; print a table.

  python experiments/bench_decode.py                      # small preset, vocab 2048, 128 + 128 tokens, batch 1,8,64
  python experiments/bench_decode.py --model=gpt2_char --vocab_size=320 --batch_sizes=1,8
  python experiments/bench_decode.py --no_cache_max_batch=64   # also run the (slow) baseline at batch 64

Per batch size B, with random-init parameters and random prompts of --prompt_len tokens (no padding):
  prefill   `Sampler.prefill` (jitted): B·prompt_len tokens / time.
  cached    `Sampler.decode` (jitted while_loop, greedy, stop_ids=() so every row makes all --max_new_tokens):
            B·max_new_tokens / time of the whole loop; ms/step = loop time / max_new_tokens.
  no cache  one jitted fori_loop that, per new token, runs the model's plain __call__ over the whole fixed-length
            [B, prompt_len + max_new_tokens] right-padded buffer and takes the argmax at the current position
            (causal attention: the padding to the right changes nothing). Same greedy tokens, no host round trip.
Compile time is measured separately (AOT lower + compile); times are the best of --repeats runs after a warmup
(no-cache: best of --repeats - 1, no warmup). The CPU is shared: figures move by up to ~2x between runs.
The cached greedy tokens must equal the no-cache ones (checked for every batch size run both ways).
On GPU/TPU each decode step must read the parameters and the KV cache once: (param + KV bytes) / --hbm_gbps is
the bandwidth bound on ms/step, shown next to the measured figure.
"""

import dataclasses
import resource
import time

from absl import app, flags

flags.DEFINE_string("model", "small", "Model preset (llm_jax.model.PRESETS).")
flags.DEFINE_integer("vocab_size", 2048, "Override the preset's vocabulary (0: keep the preset's).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("max_new_tokens", 128, "Generated tokens per row.")
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Batch sizes to measure.")
flags.DEFINE_integer("no_cache_max_batch", 8, "Skip the no-cache baseline above this batch (it is slow).")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the best is reported).")
flags.DEFINE_float("hbm_gbps", 4800.0, "Accelerator memory bandwidth, GB/s (H200: 4800), for the decode bound.")
flags.DEFINE_integer("seed", 0, "Parameter and prompt seed.")
FLAGS = flags.FLAGS


def _best(fn, repeats: int, warmup: bool = True) -> tuple[float, object]:
  """Best wall seconds of `fn()` (which blocks until its result is ready) over `repeats` runs, after a warmup."""
  out, times = fn() if warmup else None, []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


def _compile(jitted, *args, **static):
  start = time.perf_counter()
  compiled = jitted.lower(*args, **static).compile()
  return compiled, time.perf_counter() - start


def main(argv):
  del argv
  from llm_jax import cli

  cli.run(bench)


def bench():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from llm_jax import sharding
  from llm_jax.errors import UserError
  from llm_jax.inference.sampler import Sampler, SamplingConfig
  from llm_jax.model import PRESETS
  from llm_jax.modeling import init_params, lm_factory, model_spec

  if FLAGS.model not in PRESETS:
    raise UserError(f"--model={FLAGS.model}: unknown preset; choose one of {sorted(PRESETS)}")
  for name in ("prompt_len", "max_new_tokens", "repeats"):
    if FLAGS[name].value < 1:
      raise UserError(f"--{name}={FLAGS[name].value} must be >= 1")
  if FLAGS.vocab_size < 0:
    raise UserError(f"--vocab_size={FLAGS.vocab_size} must be >= 0 (0 keeps the preset's)")
  try:
    batch_sizes = [int(x) for x in FLAGS.batch_sizes]
  except ValueError:
    raise UserError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected integers, e.g. 1,8,64") from None
  if not batch_sizes or min(batch_sizes) < 1:
    raise UserError(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: each must be >= 1")
  cfg = PRESETS[FLAGS.model]
  if FLAGS.vocab_size:
    cfg = dataclasses.replace(cfg, vocab_size=FLAGS.vocab_size)
  p, n = FLAGS.prompt_len, FLAGS.max_new_tokens
  context = p + n
  if context > cfg.max_seq_len:
    raise UserError(f"--prompt_len + --max_new_tokens = {context} exceeds the model's max_seq_len {cfg.max_seq_len}")

  mesh = sharding.make_mesh()
  factory = lm_factory(cfg)
  state = model_spec(factory, mesh)
  params = init_params(factory, state, FLAGS.seed)
  sampler = Sampler(state.graphdef, params, mesh)
  prefill, decode = sampler._jitted
  greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_ids=())
  key = jax.random.key(FLAGS.seed)

  def no_cache_generate(params, tokens_BC):
    """Greedy decoding by re-running the full forward pass over the whole buffer for every new token."""
    model = nnx.merge(state.graphdef, params)

    def one_token(i, tokens_BC):
      logits_BCV = model(tokens_BC)  # Full forward pass, every position, every step.
      logits_BV = jax.lax.dynamic_index_in_dim(logits_BCV, p + i - 1, axis=1, keepdims=False)
      token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_index_in_dim(tokens_BC, token_B, p + i, axis=1)

    return jax.lax.fori_loop(0, n, one_token, tokens_BC)[:, p:]

  no_cache_jit = jax.jit(no_cache_generate)

  on_cpu = jax.devices()[0].platform == "cpu"
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  rng = np.random.default_rng(FLAGS.seed)
  rows, checks = [], []
  for b in batch_sizes:
    prompts = rng.integers(4, cfg.vocab_size, (b, p), dtype=np.int32)  # Ids 0-3 are pad/unk/bos/eos.
    tokens = jax.device_put(prompts, sharding.batch_sharding(mesh))
    segments = jax.device_put(np.ones((b, p), np.int32), sharding.batch_sharding(mesh))
    row = {"batch": b}

    # 1. Prefill.
    prefill_c, row["prefill compile s"] = _compile(prefill, params, tokens, segments, cache_length=context)
    prefill_s, _ = _best(lambda: jax.block_until_ready(prefill_c(params, tokens, segments)), FLAGS.repeats)
    row["prefill tok/s"] = b * p / prefill_s

    # 2. Cached decoding (the state is donated: each run starts from a fresh prefill, outside the timing).
    until = jnp.int32(context)
    decode_c, row["decode compile s"] = _compile(
      decode, params, prefill_c(params, tokens, segments), key, until, sampling=greedy
    )

    def run_decode():
      s = jax.block_until_ready(prefill_c(params, tokens, segments))
      start = time.perf_counter()
      s = jax.block_until_ready(decode_c(params, s, key, until))
      return time.perf_counter() - start, s

    run_decode()
    runs = [run_decode() for _ in range(FLAGS.repeats)]
    decode_s, final = min(runs, key=lambda r: r[0])
    cached_tokens = np.asarray(final.tokens_BN)
    assert int(final.step) == n and (np.asarray(final.lengths_B) == n).all(), "a row stopped early"
    row["decode tok/s"] = b * n / decode_s
    row["ms/step"] = 1000 * decode_s / n
    kv_bytes = final.cache.k_LBKSH.nbytes + final.cache.v_LBKSH.nbytes
    row["KV MiB"] = kv_bytes / 2**20
    if not on_cpu:
      row["HBM bound ms/step"] = 1000 * (param_bytes + kv_bytes) / (FLAGS.hbm_gbps * 1e9)

    # 3. No-cache baseline, 4. the ratio.
    if b <= FLAGS.no_cache_max_batch:
      buffer = jnp.asarray(np.concatenate([prompts, np.zeros((b, n), np.int32)], axis=1))  # Right-padded.
      nc_c, row["no-cache compile s"] = _compile(no_cache_jit, params, buffer)
      nc_s, nc_tokens = _best(
        lambda: jax.block_until_ready(nc_c(params, buffer)), max(1, FLAGS.repeats - 1), warmup=False
      )  # Already compiled; slow, so no warmup and one run fewer.
      row["no-cache tok/s"] = b * n / nc_s
      row["cached / no-cache"] = row["decode tok/s"] / row["no-cache tok/s"]
      same = (np.asarray(nc_tokens) == cached_tokens).all(axis=1)
      checks.append(f"batch {b}: {'OK' if same.all() else 'MISMATCH'} ({same.sum()}/{b} rows identical)")
      if not same.all():
        first = int(np.argmax(np.asarray(nc_tokens)[~same][0] != cached_tokens[~same][0]))
        checks[-1] += f", first differing token at step {first}"
    else:
      row["no-cache tok/s"] = row["cached / no-cache"] = row["no-cache compile s"] = "skipped"
    row["max RSS MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Process-wide, so far.
    rows.append(row)
    print(f"batch {b} done", flush=True)

  stats = None if on_cpu else jax.devices()[0].memory_stats()
  print(
    f"\nmodel      {FLAGS.model} ({cfg.num_layers} layers, d={cfg.d_model}, {cfg.num_heads} heads / "
    f"{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, {cfg.dtype}), {cfg.num_params():,} params, "
    f"{param_bytes / 2**20:.2f} MiB"
  )
  print(f"devices    {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
  print(f"context    {p} prompt + {n} new = {context} tokens; greedy, no stop ids; best of {FLAGS.repeats}")
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak mem   {stats['peak_bytes_in_use'] / 2**20:,.0f} MiB (device 0 peak_bytes_in_use)")
  print(f"peak mem   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB (process max RSS)\n")
  columns = list(rows[0])
  fmt = lambda v: (
    v if isinstance(v, str) else f"{v:,}" if isinstance(v, int) else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
  )
  widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(fmt(r[c]).rjust(w) for c, w in zip(columns, widths)))
  print("\ncached == no-cache greedy tokens:", "; ".join(checks) or "not checked (no batch ran both ways)")


if __name__ == "__main__":
  from llm_jax import cli

  app.run(main, flags_parser=cli.parse_flags)
