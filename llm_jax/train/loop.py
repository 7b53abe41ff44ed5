"""The one training loop, shared by every stage.

A stage contributes a model factory, a loss function, its data and the number of tokens in a step; the loop
does the rest: sharded initialization (or initialization from an earlier stage's parameters), AdamW with
warmup + cosine decay, global-norm clipping and a weight-decay mask, gradient accumulation inside one jitted
step with donated state, periodic evaluation, progress lines, metrics, NaN stops, Orbax checkpoints (every N
steps, at the end, on SIGTERM) and exact resumption.

A loss function has the signature `loss_fn(model, batch, rng) -> (loss_sum, metric_sums)`: the loss summed
over the batch's examples (tokens, pairs, ...) and a dict of summed metrics that includes "weight", the
number of examples counted. The loop divides by the total weight of the whole (accumulated) batch, so a batch
split into microbatches gives the same update, and a batch with zero weight adds zero loss.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_jax import checkpoint as ckpt_lib
from llm_jax import perf, sharding
from llm_jax.errors import UserError
from llm_jax.metrics import MetricWriter

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteLossError(UserError):
  """The loss became NaN or Inf; the run stopped and the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------
# Model state: sharded init, abstract shapes for restoring.


@dataclasses.dataclass
class ModelState:
  """A model split into its static graph and a pure dict of parameters, with their shardings."""
  graphdef: Any
  abstract_params: Any  # ShapeDtypeStructs carrying the target shardings.
  param_shardings: Any
  logical_names: Any  # PartitionSpecs of logical axis names, one per parameter.

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)


def model_state(model_factory: Callable[[nnx.Rngs], nnx.Module], mesh: Mesh) -> ModelState:
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  logical_names = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  abstract = nnx.to_pure_dict(abstract_state)
  shardings = sharding.tree_shardings(abstract, logical_names, mesh)
  return ModelState(graphdef, ckpt_lib.abstract_with_shardings(abstract, shardings), shardings, logical_names)


def init_params(model_factory: Callable[[nnx.Rngs], nnx.Module], state: ModelState, seed: int):
  """Initializes directly into the target shardings: no device ever holds the whole model."""
  def init():
    with nnx.use_eager_sharding(False):
      return nnx.to_pure_dict(nnx.state(model_factory(nnx.Rngs(seed))))
  return jax.jit(init, out_shardings=state.param_shardings)()


# ----------------------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of the update made at step k = 1, 2, ..., config.steps (as logged at step k).

  Linear warmup from 0 that skips the 0 itself, so no step is wasted: lr_k = peak·k/warmup_steps, the peak
  reached at step warmup_steps; then cosine decay to peak·min_lr_ratio at the final step, config.steps.
  warmup_steps=0 behaves as 1: the first update is at the peak. optax counts the updates already made (k - 1
  at step k): `make_optimizer` shifts its count by one, so the optimizer and the logged value are this one
  function.
  """
  warmup = max(config.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.learning_rate * config.min_lr_ratio)


def weight_decay_mask(params) -> Any:
  """Decay weight matrices and embeddings; not biases or norm scales (their names say which they are)."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.startswith("bias"))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """AdamW (weight decay masked) after global-norm clipping; update k uses `learning_rate_schedule(config)(k)`."""
  schedule = learning_rate_schedule(config)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
      optax.adamw(lambda count: schedule(count + 1), b1=config.b1, b2=config.b2, eps=1e-8,
                  weight_decay=config.weight_decay, mask=weight_decay_mask(params)))


def opt_state_shardings(optimizer: optax.GradientTransformation, state: ModelState, mesh: Mesh):
  """Optimizer moments take their parameter's sharding; counters are replicated."""
  abstract_opt = jax.eval_shape(optimizer.init, state.abstract_params)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, state.param_shardings,
                               transform_non_params=lambda _: sharding.replicated(mesh))


# ----------------------------------------------------------------------------------------------------------
# The jitted steps.


class OnMesh:
  """A jitted function traced under `jax.set_mesh(mesh)`, so the model can pin activations to the batch axes."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def make_train_step(state: ModelState, loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                    opt_shardings, batch_shardings, grad_accum: int, seed: int):
  """One optimizer update on a global batch, split into `grad_accum` microbatches scanned inside the jit."""

  def sum_grads(params, batch, rng):
    def loss_of(p):
      return loss_fn(state.merge(p), batch, rng)
    (loss_sum, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return grads, {"loss": loss_sum, **sums}

  def step(params, opt_state, batch, step_number):
    rng = jax.random.fold_in(jax.random.key(seed), step_number)
    if grad_accum == 1:
      grads, sums = sum_grads(params, batch, rng)
    else:
      # Microbatch j takes rows j, j+A, j+2A, ...: each device keeps its own rows (no data movement).
      def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))))
      micro = jax.tree.map(split, batch)

      def accumulate(carry, xs):
        index, microbatch = xs
        grads, sums = sum_grads(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sum_grads, params, jax.tree.map(lambda x: x[0], micro),
                                                          rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    weight = sums["weight"]
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {k: v / jnp.maximum(weight, 1.0) for k, v in sums.items() if k != "weight"}
    metrics["weight"] = weight
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return OnMesh(jax.jit(step, donate_argnums=(0, 1),
                        in_shardings=(state.param_shardings, opt_shardings, batch_shardings,
                                      sharding.replicated(mesh)),
                        out_shardings=(state.param_shardings, opt_shardings, sharding.replicated(mesh))), mesh)


def make_eval_step(state: ModelState, loss_fn: LossFn, mesh: Mesh, batch_shardings):
  def step(params, batch):
    loss_sum, sums = loss_fn(state.merge(params), batch, jax.random.key(0))
    return {"loss": loss_sum, **sums}
  return OnMesh(jax.jit(step, in_shardings=(state.param_shardings, batch_shardings),
                        out_shardings=sharding.replicated(mesh)), mesh)


def evaluate(eval_step, params, batches: list[dict[str, np.ndarray]], mesh: Mesh) -> dict[str, float]:
  """Weighted means over all evaluation batches, plus perplexity."""
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(eval_step(params, sharding.global_batch(batch, mesh))).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  weight = max(totals.pop("weight", 0.0), 1.0)
  out = {f"eval_{k}": v / weight for k, v in totals.items()}
  out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
  return out


# ----------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
  state: ModelState
  mesh: Mesh
  params: Any
  step: int
  last_metrics: dict[str, float]
  last_eval: dict[str, float]


class _SigtermFlag:
  """Turns SIGTERM into "save a checkpoint and stop" at the next step boundary."""

  def __init__(self):
    self.raised = False

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, *_):
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh,
          model_factory: Callable[[nnx.Rngs], nnx.Module], loss_fn: LossFn, train_data: grain.MapDataset,
          eval_data: list[dict[str, np.ndarray]], tokens_per_step: int, flops_per_token: float,
          initial_params: Callable[[ModelState], Any] | None = None, meta: dict[str, Any] | None = None,
          extra_eval: Callable[[Any], dict[str, float]] | None = None, eval_at_start: bool = False,
          stop_after: int | None = None) -> TrainResult:
  """Trains `config.steps` steps (resuming from the workdir's latest checkpoint if there is one).

  `initial_params(state)` returns starting parameters (e.g. an earlier stage's) instead of a fresh init.
  `extra_eval(params)` adds a stage's own evaluation (e.g. generation accuracy) to each evaluation;
  `eval_at_start` also evaluates the initial parameters (logged as step 0) on a fresh start.
  `stop_after` stops early after that many steps, as a preemption would (used by the resume tests).
  """
  state = model_state(model_factory, mesh)
  optimizer = make_optimizer(config, state.abstract_params)
  opt_shardings = opt_state_shardings(optimizer, state, mesh)
  example = train_data[0]
  batch_shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
  train_step = make_train_step(state, loss_fn, optimizer, mesh, opt_shardings, batch_shardings,
                               config.grad_accum, config.seed)
  eval_step = make_eval_step(state, loss_fn, mesh, batch_shardings)
  data_iter = iter(train_data.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads,
                                                                 prefetch_buffer_size=config.data.prefetch)))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = MetricWriter(workdir)
  meta = dict(meta or {})

  # The newest checkpoint that restores; newer unreadable ones are moved aside (this run saves those steps again).
  abstract_opt = ckpt_lib.abstract_with_shardings(jax.eval_shape(optimizer.init, state.abstract_params),
                                                  opt_shardings)
  start, restored = checkpointer.restore_latest(state.abstract_params, abstract_opt, data_iter, move_aside=True)
  if start is not None:
    params, opt_state = restored["params"], restored["opt_state"]
    logging.info("resumed from %s/%d", checkpointer.directory, start)
    print(f"resuming from step {start} ({checkpointer.directory})", flush=True)
  else:
    start = 0
    params = initial_params(state) if initial_params else init_params(model_factory, state, config.seed)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)

  def run_eval(step: int) -> dict[str, float]:
    results = evaluate(eval_step, params, eval_data, mesh)
    if extra_eval is not None:
      results.update(extra_eval(params))
    writer.write(step, results)
    if jax.process_index() == 0:
      print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
    return results

  if eval_at_start and start == 0:
    run_eval(0)
  peak = perf.peak_flops_per_device() * mesh.size
  end = config.steps if stop_after is None else min(config.steps, start + stop_after)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  empty_steps = 0  # Steps whose batch had nothing to train on (weight 0): they add zero loss.
  window_start, window_steps = time.perf_counter(), 0
  compile_seconds = None

  def flush_metrics() -> None:
    """Fetches the pending steps' metrics; stops the run at the first non-finite loss."""
    nonlocal last_metrics, window_start, window_steps, empty_steps
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    seconds_per_step = (now - window_start) / max(window_steps, 1)
    for (step, _), values in zip(pending, fetched):
      values = {k: float(v) for k, v in values.items()}
      if not math.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"non-finite loss ({values['loss']}) at step {step}; stopped. The last good checkpoint is in "
            f"{checkpointer.directory} (step {checkpointer.latest_step()})")
      values["learning_rate"] = float(learning_rate_schedule(config)(step))  # The rate this step's update used.
      empty_steps += values["weight"] == 0
      values["empty_steps"] = empty_steps
      last_metrics = values
    step = pending[-1][0]
    speed = ""
    if window_steps:  # The compiling first step is not a throughput sample.
      tokens_per_second = tokens_per_step / seconds_per_step
      last_metrics.update(tokens_per_second=tokens_per_second, step_seconds=seconds_per_step,
                          mfu=flops_per_token * tokens_per_second / peak)
      speed = (f"  {tokens_per_second:,.0f} tok/s  step {1000 * seconds_per_step:.1f} ms  "
               f"MFU {100 * last_metrics['mfu']:.1f}%  ETA {_format_seconds(seconds_per_step * (end - step))}")
    writer.write(step, last_metrics)
    if jax.process_index() == 0:
      print(f"step {step:>6}/{config.steps}  loss {last_metrics['loss']:.4f}  lr {last_metrics['learning_rate']:.2e}"
            f"  grad_norm {last_metrics['grad_norm']:.3f}{speed}", flush=True)
    pending.clear()
    window_start, window_steps = time.perf_counter(), 0

  def save(step: int) -> None:
    flush_metrics()  # Never checkpoint a state whose loss was not checked.
    checkpointer.save(step, params, opt_state, data_iter,
                      {**meta, "step": step, "config": config.to_dict()})

  try:
    with _SigtermFlag() as sigterm:
      for step in range(start + 1, end + 1):
        local = next(data_iter)
        batch = sharding.global_batch(local, mesh)
        if compile_seconds is None:
          t0 = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step - 1))
        if compile_seconds is None:
          jax.block_until_ready(metrics)
          compile_seconds = time.perf_counter() - t0
          logging.info("first step (compile + run): %.1f s", compile_seconds)
          window_start = time.perf_counter()  # Throughput excludes compilation.
        else:
          window_steps += 1
        pending.append((step, metrics))
        if step % config.log_every == 0 or step == end:
          flush_metrics()
        if step % config.eval_every == 0 or step == config.steps:
          flush_metrics()
          last_eval = run_eval(step)
          window_start = time.perf_counter()  # Throughput counts training steps only.
        if step % config.checkpoint_every == 0 or step == end or sigterm.raised:
          save(step)
          window_start = time.perf_counter()
        if sigterm.raised:
          break
    checkpointer.wait()
  finally:
    checkpointer.close()
    writer.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  return TrainResult(state=state, mesh=mesh, params=params, step=step if end > start else start,
                     last_metrics=last_metrics, last_eval=last_eval)


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
