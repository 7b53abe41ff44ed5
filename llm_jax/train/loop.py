"""The one training loop, shared by every stage.

A stage contributes a model factory, a loss function, its data and the number of tokens in a step; the loop
does the rest: sharded initialization (or initialization from an earlier stage's parameters), AdamW with
warmup + cosine decay, global-norm clipping and a weight-decay mask, gradient accumulation inside one jitted
step with donated state, periodic evaluation, progress lines, metrics, NaN stops, Orbax checkpoints (every N
steps, at the end, on SIGTERM) and exact resumption.

LoRA (llm_jax/lora.py): a model spec with frozen parameters (a transformer's base weights) is trained on its
trainable part only: the step differentiates, clips and updates the adapters (and any head) alone, the optimizer
state holds only their moments, and the frozen base is a separate argument of the jitted step that is never
donated or copied. Checkpoints hold the trainable part; the base is the stage's to provide (its `initial_params`),
on a fresh start and on resume alike.

A loss function has the signature `loss_fn(model, batch, rng) -> (loss_sum, metric_sums)`: the loss summed
over the batch's examples (tokens, pairs, ...) and a dict of summed metrics that includes "weight", the
number of examples counted. The loop divides by the total weight of the whole (accumulated) batch, so a batch
split into microbatches gives the same update, and a batch with zero weight adds zero loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax import checkpoint as ckpt_lib
from llm_jax import lora as lora_lib
from llm_jax import perf, sharding
from llm_jax.data import prepared as prepared_data
from llm_jax.errors import UserError
from llm_jax.metrics import MetricWriter
from llm_jax.modeling import ModelFactory, ModelSpec, init_params, model_spec

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteLossError(UserError):
  """The loss became NaN or Inf; the run stopped and the last good checkpoint is kept."""


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
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(config.steps, warmup + 1),
    end_value=config.learning_rate * config.min_lr_ratio,
  )


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
    optax.adamw(
      lambda count: schedule(count + 1),
      b1=config.b1,
      b2=config.b2,
      eps=1e-8,
      weight_decay=config.weight_decay,
      mask=weight_decay_mask(params),
    ),
  )


def opt_state_shardings(optimizer: optax.GradientTransformation, state: ModelSpec, mesh: Mesh):
  """Optimizer moments take their (trainable) parameter's sharding; counters are replicated."""
  abstract_opt = jax.eval_shape(optimizer.init, state.split(state.abstract_params)[0])
  return optax.tree_map_params(
    optimizer,
    lambda _, s: s,
    abstract_opt,
    state.split(state.param_shardings)[0],
    transform_non_params=lambda _: sharding.replicated(mesh),
  )


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


class TrainStep(OnMesh):
  """`step(params, opt_state, batch, step_number, frozen={})`: `params` are the trainable parameters, `frozen`
  the rest (a LoRA model's base; {} when everything trains).

  `step.many(params, opt_state, batches, first_step_number, frozen={})` (built with `steps_per_call` > 1): that
  many consecutive updates in one call, `batches` stacked on a leading axis (`sharding.stacked_global_batch`);
  each update is the same function of its batch and step number as a single call, and the metrics come back
  stacked, one row per update.

  The seed is an argument of the compiled program, not a constant in it: runs that differ only in their seed (a
  seed sweep) share one program (the persistent compilation cache finds it)."""

  def __init__(self, jitted, mesh: Mesh, seed: int, many=None):
    super().__init__(jitted, mesh)
    self.many_jitted, self.seed = many, np.int32(seed)

  def __call__(self, params, opt_state, batch, step_number, frozen=None):
    return super().__call__(params, opt_state, batch, step_number, {} if frozen is None else frozen, self.seed)

  def lower(self, params, opt_state, batch, step_number, frozen=None):
    return super().lower(params, opt_state, batch, step_number, {} if frozen is None else frozen, self.seed)

  def many(self, params, opt_state, batches, first_step_number, frozen=None):
    with jax.set_mesh(self.mesh):
      frozen = {} if frozen is None else frozen
      return self.many_jitted(params, opt_state, batches, first_step_number, frozen, self.seed)


def make_train_step(
  state: ModelSpec,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  opt_shardings,
  batch_shardings,
  grad_accum: int,
  seed: int,
  steps_per_call: int = 1,
):
  """One optimizer update on a global batch, split into `grad_accum` microbatches scanned inside the jit; with
  `steps_per_call` > 1 also `TrainStep.many`, that many updates scanned inside one jit (small models on CPU
  spend a good part of each step on dispatch and host round trips).

  Gradients, clipping and the update concern the trainable parameters only (`state.split`); the frozen ones
  are the step's last argument, not donated."""
  trainable_shardings, frozen_shardings = state.split(state.param_shardings)

  def step(params, opt_state, batch, step_number, frozen, seed):
    def sum_grads(params, batch, rng):
      def loss_of(p):
        return loss_fn(state.merge(state.join(p, frozen)), batch, rng)

      (loss_sum, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      return grads, {"loss": loss_sum, **sums}

    rng = jax.random.fold_in(jax.random.key(seed), step_number)  # (`seed` is traced: see TrainStep.)
    if grad_accum == 1:
      grads, sums = sum_grads(params, batch, rng)
    else:
      # Microbatch j takes rows j, j+A, j+2A, ...: each device keeps its own rows and tokens (no data movement).
      def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, P(None, *sharding.token_spec(mesh, x.shape[1:])))
        )

      micro = jax.tree.map(split, batch)

      def accumulate(carry, xs):
        index, microbatch = xs
        grads, sums = sum_grads(params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sum_grads, params, jax.tree.map(lambda x: x[0], micro), rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    weight = sums["weight"]
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {k: v / jnp.maximum(weight, 1.0) for k, v in sums.items() if k != "weight"}
    metrics["weight"] = weight
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  def many(params, opt_state, batches, first_step_number, frozen, seed):
    def one(carry, xs):
      index, batch = xs
      params, opt_state, metrics = step(*carry, batch, first_step_number + index, frozen, seed)
      return (params, opt_state), metrics

    count = jax.tree.leaves(batches)[0].shape[0]
    (params, opt_state), metrics = jax.lax.scan(one, (params, opt_state), (jnp.arange(count), batches))
    return params, opt_state, metrics

  replicated = sharding.replicated(mesh)
  jit = lambda fn, batch_in: jax.jit(
    fn,
    donate_argnums=(0, 1),
    in_shardings=(trainable_shardings, opt_shardings, batch_in, replicated, frozen_shardings, replicated),
    out_shardings=(trainable_shardings, opt_shardings, replicated),
  )
  stacked_shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), batch_shardings)
  return TrainStep(jit(step, batch_shardings), mesh, seed, jit(many, stacked_shardings) if steps_per_call > 1 else None)


def make_eval_step(state: ModelSpec, loss_fn: LossFn, mesh: Mesh, batch_shardings):
  def step(params, batch):
    loss_sum, sums = loss_fn(state.merge(params), batch, jax.random.key(0))
    return {"loss": loss_sum, **sums}

  return OnMesh(
    jax.jit(step, in_shardings=(state.param_shardings, batch_shardings), out_shardings=sharding.replicated(mesh)), mesh
  )


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
  state: ModelSpec
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


@dataclasses.dataclass
class Optimization:
  """AdamW for a model spec, its state's shardings and the jitted update: what training and AOT compile."""

  optimizer: optax.GradientTransformation
  opt_shardings: Any
  abstract_opt_state: Any  # ShapeDtypeStructs carrying the shardings (for restoring and AOT compilation).
  train_step: TrainStep


def make_optimization(
  config: ml_collections.ConfigDict, spec: ModelSpec, loss_fn: LossFn, mesh: Mesh, batch_shardings
) -> Optimization:
  trainable = spec.split(spec.abstract_params)[0]
  optimizer = make_optimizer(config, trainable)
  opt_shardings = opt_state_shardings(optimizer, spec, mesh)
  abstract_opt = ckpt_lib.abstract_with_shardings(jax.eval_shape(optimizer.init, trainable), opt_shardings)
  train_step = make_train_step(
    spec,
    loss_fn,
    optimizer,
    mesh,
    opt_shardings,
    batch_shardings,
    config.grad_accum,
    config.seed,
    config.get("steps_per_call", 1),
  )
  return Optimization(optimizer, opt_shardings, abstract_opt, train_step)


StepFn = Callable[[int], dict[str, Any]]  # One step of a stage: its metrics (device arrays or floats).


class Trainer:
  """One run of a stage: the model on the mesh, the optimizer and its jitted update, resume, metrics, evaluation,
  checkpoints (every `checkpoint_every` steps, at the end, on SIGTERM) and NaN stops.

  A stage builds a Trainer and calls `run(step_fn, num_steps)`. `step_fn(step)` does one step's work through
  `update(batch, update_index)` (supervised stages: one update on the next batch; RLHF: a rollout and its
  minibatch updates) and returns the step's metrics. The trainer's state is `params`, `opt_state`, the data
  iterator's position and `stage_state` (a JSON dict a stage keeps across restarts, e.g. RLHF's β).
  With `params_key`, checkpoints hold `params[params_key]` as their `params` item (what later stages and
  generation load) and the rest of the tree as `extra` (RLHF: the policy, and its value function beside it).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh,
    model_factory: ModelFactory,
    loss_fn: LossFn,
    batch_shardings,
    meta: dict[str, Any],
    data_iter=None,
    initial_params: Callable[[ModelSpec], Any] | None = None,
    params_key: str | None = None,
    stage_state: dict[str, Any] | None = None,
  ):
    self.config, self.mesh, self.data_iter, self.params_key = config, mesh, data_iter, params_key
    self.meta = dict(meta)
    self.spec = model_spec(model_factory, mesh)
    self.optimization = make_optimization(config, self.spec, loss_fn, mesh, batch_shardings)
    self.schedule = learning_rate_schedule(config)
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    self.writer = MetricWriter(workdir)
    self.stage_state = dict(stage_state or {})
    if self.spec.frozen and initial_params is None:
      raise ValueError("a model with frozen (LoRA base) parameters needs `initial_params` to provide them")
    self.initial_params = initial_params
    self.frozen: Any = {}  # The parameters that are not trained (a LoRA model's base); {} without LoRA.
    # Prepared data keeps one global position (in the checkpoint's meta) instead of per-process Grain states.
    self._global_data_state = hasattr(data_iter, "global_state")
    self.start = self._restore()
    if self.start is None:
      self.start = 0
      params = initial_params(self.spec) if initial_params else init_params(model_factory, self.spec, config.seed)
      self.trainable, self.frozen = self.spec.split(jax.device_put(params, self.spec.param_shardings))
      self.opt_state = jax.jit(self.optimization.optimizer.init, out_shardings=self.optimization.opt_shardings)(
        self.trainable
      )
    self.last_update = -1  # Index of the latest optimizer update (its learning rate is logged).

  @property
  def params(self):
    """All the model's parameters: the trained ones and the frozen base (the same arrays, not copies)."""
    return self.spec.join(self.trainable, self.frozen)

  def _split(self, tree):
    if self.params_key is None:
      return tree, {}
    return tree[self.params_key], {k: v for k, v in tree.items() if k != self.params_key}

  def _restore(self) -> int | None:
    """Resumes from the newest checkpoint that restores (newer unreadable ones are moved aside: this run saves
    those steps again); None on a fresh start."""
    self._check_lora_checkpoints()
    abstract_params, abstract_extra = self._split(self.spec.split(self.spec.abstract_params)[0])
    start, restored = self.checkpointer.restore_latest(
      abstract_params,
      self.optimization.abstract_opt_state,
      data_iter=None if self._global_data_state else self.data_iter,
      abstract_extra=abstract_extra,
      move_aside=True,
    )
    if start is None:
      return None
    if self._global_data_state:  # The global row position: any process count continues the same order.
      if "data_state" not in restored["meta"]:
        raise UserError(
          f"{self.checkpointer.directory}/{start}: this checkpoint holds no prepared-data position (it was "
          "trained on other data); use a new workdir"
        )
      self.data_iter.set_global_state(restored["meta"]["data_state"])
    self.trainable = restored["params"]
    if self.params_key is not None:
      self.trainable = {self.params_key: self.trainable, **restored.get("extra", {})}
    if self.spec.frozen:  # The base is not in the checkpoint: the stage provides it, as on a fresh start.
      lora_lib.check_same_base(self.checkpointer.directory, restored["meta"]["lora"], self.meta["lora"])
      params = jax.device_put(self.initial_params(self.spec), self.spec.param_shardings)
      self.frozen = self.spec.split(params)[1]
    self.opt_state = restored["opt_state"]
    self.stage_state.update(restored["meta"].get("stage_state", {}))
    logging.info("resumed from %s/%d", self.checkpointer.directory, start)
    print(f"resuming from step {start} ({self.checkpointer.directory})", flush=True)
    return start

  def _check_lora_checkpoints(self) -> None:
    """A workdir's checkpoints and this run agree on LoRA (else their trees differ, and a restore would take
    every checkpoint for damaged)."""
    meta = ckpt_lib.workdir_meta(os.path.dirname(self.checkpointer.directory))
    if meta is None or bool(meta.get("lora")) == bool(self.spec.frozen):
      return
    saved = "LoRA adapters" if meta.get("lora") else "fully fine-tuned parameters"
    wanted = "LoRA (lora.rank > 0)" if self.spec.frozen else "full fine-tuning (lora.rank = 0)"
    raise UserError(f"{self.checkpointer.directory} holds {saved}, and this run is {wanted}: use a new workdir")

  def update(self, batch: Batch, update_index: int) -> dict[str, jax.Array]:
    """One optimizer update (`update_index` counts updates from 0: the schedule and the step's rng use it)."""
    self.trainable, self.opt_state, metrics = self.optimization.train_step(
      self.trainable, self.opt_state, batch, jnp.int32(update_index), self.frozen
    )
    self.last_update = update_index
    return metrics

  def update_many(self, batches: Batch, first_update_index: int) -> dict[str, jax.Array]:
    """Consecutive updates first_update_index, +1, ... on `batches` stacked on a leading axis, in one call
    (`TrainStep.many`); the metrics are stacked the same way."""
    self.trainable, self.opt_state, metrics = self.optimization.train_step.many(
      self.trainable, self.opt_state, batches, jnp.int32(first_update_index), self.frozen
    )
    self.last_update = first_update_index + jax.tree.leaves(batches)[0].shape[0] - 1
    return metrics

  def save(self, step: int) -> None:
    params, extra = self._split(self.trainable)
    meta = {**self.meta, "step": step, "config": self.config.to_dict(), "stage_state": self.stage_state}
    data_iter = self.data_iter
    if self._global_data_state:
      meta["data_state"], data_iter = self.data_iter.global_state(), None
    self.checkpointer.save(step, params, self.opt_state, data_iter, meta, extra=extra)

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.close()
    if hasattr(self.data_iter, "close"):
      self.data_iter.close()

  def run(
    self,
    step_fn: StepFn,
    num_steps: int,
    *,
    log_every: int,
    print_every: int | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    eval_at_start: bool = False,
    tokens_per_step: int = 0,
    flops_per_token: float = 0.0,
    progress_keys: tuple[str, ...] = ("loss", "learning_rate", "grad_norm"),
    stop_after: int | None = None,
    harness_eval: Callable[[Any], dict[str, float]] | None = None,
    harness_every: int = 0,
    many_fn: Callable[[int, int], dict[str, Any]] | None = None,
    steps_per_call: int = 1,
  ) -> TrainResult:
    """Runs steps start+1 … num_steps (or `stop_after` of them, as a preemption would); see the class.

    `harness_eval(params)` (lm-eval tasks) runs every `harness_every` steps (0: with each evaluation) and at the
    end; its metrics are logged like the evaluation's.

    `many_fn(first_step, count)` does `count` = `steps_per_call` steps in one call and returns their metrics
    stacked. A call never spans a logging, evaluation or checkpoint boundary (only its last step may fall on
    one), so what is logged, evaluated, saved and resumed is the same as step by step; steps next to a boundary
    that a whole call would cross run one at a time."""
    harness_every = harness_every or eval_every
    log = _ProgressLog(self, num_steps, tokens_per_step, flops_per_token, progress_keys, print_every or log_every)
    last_eval: dict[str, float] = {}
    if eval_at_start and self.start == 0 and evaluate is not None:
      self._evaluate(evaluate, 0)
    if eval_at_start and self.start == 0 and harness_eval is not None:
      self._evaluate(harness_eval, 0)
    end = num_steps if stop_after is None else min(num_steps, self.start + stop_after)

    def boundary(s: int) -> bool:  # Something happens after step s: the host must see it.
      return (
        s == end
        or s % log_every == 0
        or s % self.config.checkpoint_every == 0
        or (evaluate is not None and s % eval_every == 0)
        or (harness_eval is not None and bool(harness_every) and s % harness_every == 0)
      )

    def call_size(first: int) -> int:
      if many_fn is None or steps_per_call == 1 or first + steps_per_call - 1 > end:
        return 1
      return 1 if any(boundary(s) for s in range(first, first + steps_per_call - 1)) else steps_per_call

    step = int(self.start)  # (a restored step may be a NumPy integer: the meta is JSON)
    try:
      with _SigtermFlag() as sigterm:
        while step < end:
          first, count = step + 1, call_size(step + 1)
          if count == 1:
            log.add(first, log.timed(lambda: step_fn(first)))
          else:
            log.add_stacked(range(first, first + count), log.timed(lambda: many_fn(first, count), count))
          step = first + count - 1
          if step % log_every == 0 or step == end:
            log.flush()
          if evaluate is not None and (step % eval_every == 0 or step == num_steps):
            log.flush()
            last_eval = self._evaluate(evaluate, step)
            log.restart_clock()  # Throughput counts training steps only.
          if harness_eval is not None and harness_every and (step % harness_every == 0 or step == num_steps):
            log.flush()
            last_eval = {**last_eval, **self._evaluate(harness_eval, step)}
            log.restart_clock()
          if step % self.config.checkpoint_every == 0 or step == end or sigterm.raised:
            log.flush()  # Never checkpoint a state whose loss was not checked.
            self.save(step)
            log.restart_clock()
          if sigterm.raised:
            break
      self.checkpointer.wait()
    finally:
      self.close()
    return TrainResult(
      state=self.spec, mesh=self.mesh, params=self.params, step=step, last_metrics=log.last_metrics, last_eval=last_eval
    )

  def _evaluate(self, evaluate: Callable[[Any], dict[str, float]], step: int) -> dict[str, float]:
    results = evaluate(self.params)
    self.writer.write(step, results)
    if jax.process_index() == 0:
      print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
    return results


class _ProgressLog:
  """The metrics of the steps since the last flush: fetched together (one host sync), checked for NaN, written
  to metrics.jsonl / TensorBoard, and printed with throughput, MFU and ETA."""

  def __init__(
    self,
    trainer: Trainer,
    num_steps: int,
    tokens_per_step: int,
    flops_per_token: float,
    keys: tuple[str, ...],
    print_every: int,
  ):
    self.trainer, self.num_steps, self.keys, self.print_every = trainer, num_steps, keys, print_every
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.peak = perf.peak_flops_per_device() * trainer.mesh.size
    self.pending: list[tuple[int, dict[str, Any]]] = []
    self.last_metrics: dict[str, float] = {}
    self.empty_steps = 0  # Steps whose batch had nothing to train on (weight 0): they add zero loss.
    self.compiled: set[str] = set()  # Kinds of call ("single", "stacked") already compiled.
    self.restart_clock()

  def restart_clock(self) -> None:
    self.window_start, self.window_steps = time.perf_counter(), 0

  def timed(self, step_fn: Callable[[], dict[str, Any]], steps: int = 1) -> dict[str, Any]:
    """Runs `steps` steps (one call); the calls that compile are not throughput samples."""
    kind = "single" if steps == 1 else "stacked"
    if kind in self.compiled:
      self.window_steps += steps
      return step_fn()
    start = time.perf_counter()
    metrics = jax.block_until_ready(step_fn())
    logging.info("first %s call (compile + run): %.1f s", kind, time.perf_counter() - start)
    self.compiled.add(kind)
    self.restart_clock()
    return metrics

  def add(self, step: int, metrics: dict[str, Any]) -> None:
    self.pending.append(([step], metrics, False))

  def add_stacked(self, steps, metrics: dict[str, Any]) -> None:
    """The metrics of consecutive steps, stacked on a leading axis (one call of `TrainStep.many`)."""
    self.pending.append((list(steps), metrics, True))

  def flush(self) -> None:
    """Fetches the pending steps' metrics; stops the run at the first non-finite loss."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _ in self.pending])
    seconds_per_step = (time.perf_counter() - self.window_start) / max(self.window_steps, 1)
    rows = [
      (step, {k: v[i] for k, v in values.items()} if stacked else values)
      for (steps, _, stacked), values in zip(self.pending, fetched)
      for i, step in enumerate(steps)
    ]
    for step, values in rows:
      values = {k: float(v) for k, v in values.items()}
      if not math.isfinite(values["loss"]):
        checkpointer = self.trainer.checkpointer
        raise NonFiniteLossError(
          f"non-finite loss ({values['loss']}) at step {step}; stopped. The last good checkpoint is in "
          f"{checkpointer.directory} (step {checkpointer.latest_step()})"
        )
      self.empty_steps += values.get("weight", 1) == 0
      values["empty_steps"] = self.empty_steps
      self.last_metrics = values
    # The rate of the latest update (the schedule indexed by step: update k uses the value at k).
    self.last_metrics["learning_rate"] = float(self.trainer.schedule(self.trainer.last_update + 1))
    step = rows[-1][0]
    self._add_speed(seconds_per_step, step)
    self.trainer.writer.write(step, self.last_metrics)
    if jax.process_index() == 0 and (step % self.print_every == 0 or step == self.num_steps):
      shown = "  ".join(f"{k} {self.last_metrics[k]:.4g}" for k in self.keys if k in self.last_metrics)
      print(f"step {step:>6}/{self.num_steps}  {shown}{self.speed}", flush=True)
    self.pending.clear()
    self.restart_clock()

  def _add_speed(self, seconds_per_step: float, step: int) -> None:
    self.speed = ""
    if not self.window_steps:
      return
    self.last_metrics["step_seconds"] = seconds_per_step
    self.speed = (
      f"  step {1000 * seconds_per_step:.1f} ms  ETA {_format_seconds(seconds_per_step * (self.num_steps - step))}"
    )
    if self.tokens_per_step:
      tokens_per_second = self.tokens_per_step / seconds_per_step
      self.last_metrics.update(
        tokens_per_second=tokens_per_second, mfu=self.flops_per_token * tokens_per_second / self.peak
      )
      self.speed = f"  {tokens_per_second:,.0f} tok/s  MFU {100 * self.last_metrics['mfu']:.1f}%" + self.speed


def data_read_options(data_cfg: ml_collections.ConfigDict, prepared: bool) -> grain.ReadOptions:
  """`data.num_threads` / `data.prefetch`, where -1 means: in-memory data 1 thread (slicing arrays in memory:
  more threads only contend for the GIL) and 4 batches; prepared data `prepared.READ_THREADS` threads and as many
  batches in flight (each thread reads one batch's rows, one storage read each: cold reads overlap)."""
  threads = data_cfg.num_threads if data_cfg.num_threads >= 0 else (prepared_data.READ_THREADS if prepared else 1)
  prefetch = data_cfg.prefetch if data_cfg.prefetch >= 0 else (max(threads, 4) if prepared else 4)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  mesh: Mesh,
  model_factory: ModelFactory,
  loss_fn: LossFn,
  train_data,  # A grain.MapDataset of local batches, or a prepared.PreparedStream.
  eval_data: list[dict[str, np.ndarray]],
  tokens_per_step: int,
  flops_per_token: float,
  initial_params: Callable[[ModelSpec], Any] | None = None,
  meta: dict[str, Any] | None = None,
  extra_eval: Callable[[Any], dict[str, float]] | None = None,
  eval_at_start: bool = False,
  stop_after: int | None = None,
  tokenizer=None,
  model_cfg=None,
) -> TrainResult:
  """A supervised stage: `config.steps` updates on batches of `train_data` (resuming from the workdir).

  `initial_params(spec)` returns starting parameters (e.g. an earlier stage's) instead of a fresh init.
  `extra_eval(params)` adds a stage's own evaluation (e.g. generation accuracy) to each evaluation;
  `eval_at_start` also evaluates the initial parameters (logged as step 0) on a fresh start.
  `stop_after` stops early after that many steps, as a preemption would (used by the resume tests).
  `config.eval_tasks` (lm-eval tasks; needs `tokenizer` and `model_cfg`) are run on the live parameters.
  """
  harness_eval = None
  if config.get("eval_tasks"):
    harness_eval = _harness_evaluation(config, mesh, tokenizer, model_cfg)  # Unknown tasks fail before compiling.
  read_options = data_read_options(config.data, prepared=not isinstance(train_data, grain.MapDataset))
  if isinstance(train_data, grain.MapDataset):
    batch_shardings = {k: sharding.token_sharding(mesh, np.shape(v)) for k, v in train_data[0].items()}
    data_iter = iter(train_data.to_iter_dataset(read_options))
  else:  # Prepared data (llm_jax.data.prepared.PreparedStream): an iterator whose state is global.
    batch_shardings = {k: sharding.token_sharding(mesh, np.shape(v)) for k, v in train_data.example().items()}
    data_iter = train_data.iterator(read_options)
  trainer = Trainer(
    config,
    workdir,
    mesh=mesh,
    model_factory=model_factory,
    loss_fn=loss_fn,
    batch_shardings=batch_shardings,
    meta=meta or {},
    data_iter=data_iter,
    initial_params=initial_params,
  )
  eval_step = make_eval_step(trainer.spec, loss_fn, mesh, batch_shardings)

  def run_eval(params) -> dict[str, float]:
    results = evaluate(eval_step, params, eval_data, mesh)
    if extra_eval is not None:
      results.update(extra_eval(params))
    return results

  def step_fn(step: int) -> dict[str, jax.Array]:
    return trainer.update(sharding.global_batch(next(data_iter), mesh), step - 1)

  def many_fn(first_step: int, count: int) -> dict[str, jax.Array]:
    batches = sharding.stacked_global_batch([next(data_iter) for _ in range(count)], mesh)
    return trainer.update_many(batches, first_step - 1)

  return trainer.run(
    step_fn,
    config.steps,
    log_every=config.log_every,
    evaluate=run_eval,
    eval_every=config.eval_every,
    eval_at_start=eval_at_start,
    tokens_per_step=tokens_per_step,
    flops_per_token=flops_per_token,
    stop_after=stop_after,
    harness_eval=harness_eval and harness_eval(trainer.spec),
    harness_every=config.get("eval_tasks_every", 0),
    many_fn=many_fn,
    steps_per_call=config.get("steps_per_call", 1),
  )


def _harness_evaluation(config: ml_collections.ConfigDict, mesh: Mesh, tokenizer, model_cfg):
  """`config.eval_tasks` as a function of the live parameters (no copy: the model class reads them in place)."""
  from llm_jax.inference import harness  # noqa: PLC0415 (the eval extra is only needed when tasks are asked for)

  if tokenizer is None or model_cfg is None:
    raise UserError("eval_tasks: this stage does not support lm-eval tasks during training")
  harness.require_lm_eval()
  harness.quiet_harness_logs()
  names = harness.parse_tasks(config.eval_tasks)
  manager = harness.task_manager(names, config.get("eval_tasks_include_path", ""))

  def bind(spec: ModelSpec):
    lm = harness.JaxLM(
      spec.graphdef, None, mesh, tokenizer, model_cfg, batch_size=config.eval_tasks_batch_size, seed=config.seed
    )

    def evaluate_tasks(params) -> dict[str, float]:
      lm.params = params
      results = harness.run_tasks(
        lm,
        names,
        manager=manager,
        limit=config.eval_tasks_limit or None,
        num_fewshot=None if config.eval_tasks_num_fewshot < 0 else config.eval_tasks_num_fewshot,
        seed=config.seed,
      )
      return harness.flat_metrics(results)

    return evaluate_tasks

  return bind


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
