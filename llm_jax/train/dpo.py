"""Direct preference optimisation (DPO and its family): a language model trained on ranked pairs, no reward model.

For a pair (x, y_w ≻ y_l), with log π(y|x) the sum of the answer's token log-probs (the answer runs from its
`answer_start` to the end of the row, as the reward model reads it) and h = log π/π_ref (the policy against the
frozen `init_from` model):

    sigmoid  −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)      Δ = h(y_w) − h(y_l)       (DPO; ε > 0: conservative DPO)
    hinge    max(0, 1 − β·Δ)                                                   (SLiC)
    ipo      (Δ̄ − 1/(2β))²                          Δ̄: Δ of per-token means    (IPO, eq. 17)
    simpo    −(1−ε)·log σ(β·(ā_w − ā_l) − γ) − ε·log σ(−β·(ā_w − ā_l) + γ)   ā: mean log π per answer token,
                                                                               no reference model (SimPO)

as TRL defines them (trl/trainer/dpo_trainer.py before its 2025 refactor, trl/experimental/cpo for SimPO; ε is
`label_smoothing`, γ is `simpo_gamma`). The reference log-probabilities are computed once, before training, with
the `init_from` model (jitted, on the mesh, in batches), stored in the workdir (`REFERENCE_FILE`, with a
fingerprint of what they depend on) and the reference model is dropped: they travel in the batch as two extra
columns of the pair arrays, so the loop's data order, resume and gradient accumulation need nothing new. A rerun
reuses them; a workdir with checkpoints refuses reference values of another model, data or tokenizer.

Metrics (per pair, train and held out as eval_*): rewards_chosen / rewards_rejected = β·h (SimPO: β·ā), their
margin, accuracy = P(margin > 0) (a tie counts ½; eval_accuracy is the held-out preference accuracy),
logps_chosen / logps_rejected = log π of the answers, and
    kl_proxy = mean over the pair's two answers of (log π_ref − log π)(y|x)
the sequence-level k1 estimate of KL(π_ref ‖ π) if the answers were samples of the reference model (on-policy
pairs). Positive: the policy has moved probability away from the data's answers (DPO typically lowers both
log-probs, the rejected faster); off-policy pairs make it a proxy only, and it can go negative. SimPO has no
reference: no kl_proxy.

LoRA (`config.lora.rank` > 0, llm_jax/lora.py), as SFT does it: only adapters over the frozen `init_from` model
train and are saved, the checkpoint meta names that base, a resumed run gets the base back from `init_from`, and
every loader merges the adapters. The reference model is that base without adapters: the reference values are
computed from the base already loaded for training (no second copy, no second load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llm_jax import checkpoint as ckpt_lib
from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.data import text
from llm_jax.data.jsonl import held_out_split
from llm_jax.errors import UserError
from llm_jax.files import write_atomically
from llm_jax.model import ModelConfig
from llm_jax.modeling import ModelFactory, ModelSpec, lm_factory, load_model, load_params, model_spec, read_model_config
from llm_jax.sequences import positions_from_segments
from llm_jax.tokenizer import Tokenizer, load_tokenizer
from llm_jax.train import loop, stage
from llm_jax.train.reward_model import answer_mask, pair_arrays, read_pairs

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FILE = "reference_log_probs.npz"
SIDES = ("chosen", "rejected")


# ---------------------------------------------------------------------------------------------------------
# The losses: pure functions of per-pair [B] arrays (each tested against NumPy).


def sigmoid_loss(delta_B, beta: float, label_smoothing: float = 0.0):
  """DPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); Δ = log-ratio(chosen) − log-ratio(rejected)."""
  return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta_B) - label_smoothing * jax.nn.log_sigmoid(
    -beta * delta_B
  )


def hinge_loss(delta_B, beta: float):
  """SLiC: max(0, 1 − βΔ)."""
  return jax.nn.relu(1 - beta * delta_B)


def ipo_loss(mean_delta_B, beta: float):
  """IPO: (Δ̄ − 1/(2β))², Δ̄ from per-token mean log-ratios (TRL's length normalization, as the IPO authors ran it)."""
  return jnp.square(mean_delta_B - 1 / (2 * beta))


def simpo_loss(mean_logp_chosen_B, mean_logp_rejected_B, beta: float, gamma: float, label_smoothing: float = 0.0):
  """SimPO: the sigmoid loss on β·(ā_w − ā_l) − γ, with ā the mean log π per answer token (no reference)."""
  return sigmoid_loss(mean_logp_chosen_B - mean_logp_rejected_B - gamma / beta, beta, label_smoothing)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  loss: str
  beta: float
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.0


def pair_losses(
  settings: LossSettings, logp_B: dict[str, jax.Array], ref_B: dict[str, jax.Array] | None, length_B
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair losses [B] and implicit rewards {side: [B]} from summed answer log-probs (`logp_B`, `ref_B`: by
  side) and answer lengths in tokens (`length_B`: by side; an empty answer counts as 1)."""
  s = settings
  mean = lambda x, side: x / jnp.maximum(length_B[side], 1.0)
  if s.loss == "simpo":
    rewards = {side: s.beta * mean(logp_B[side], side) for side in SIDES}
    loss_B = simpo_loss(*(mean(logp_B[side], side) for side in SIDES), s.beta, s.simpo_gamma, s.label_smoothing)
    return loss_B, rewards
  ratio = {side: logp_B[side] - ref_B[side] for side in SIDES}
  rewards = {side: s.beta * ratio[side] for side in SIDES}
  delta_B = ratio["chosen"] - ratio["rejected"]
  if s.loss == "sigmoid":
    loss_B = sigmoid_loss(delta_B, s.beta, s.label_smoothing)
  elif s.loss == "hinge":
    loss_B = hinge_loss(delta_B, s.beta)
  elif s.loss == "ipo":
    loss_B = ipo_loss(mean(ratio["chosen"], "chosen") - mean(ratio["rejected"], "rejected"), s.beta)
  else:
    raise ValueError(f"unknown loss {s.loss!r}")
  return loss_B, rewards


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities of answers.


def answer_log_probs(model, tokens_BT, segment_ids_BT, answer_start_B) -> tuple[jax.Array, jax.Array]:
  """Each row's answer (from `answer_start` to its last real token): the sum of its tokens' log-probs [B] and
  its length in tokens [B]. Rows are right-padded."""
  logits_BTV = model(tokens_BT, positions_from_segments(segment_ids_BT), segment_ids_BT)
  token_logp_BT = -optax.softmax_cross_entropy_with_integer_labels(
    logits_BTV[:, :-1].astype(jnp.float32), tokens_BT[:, 1:]
  )
  mask_BT = answer_mask(answer_start_B, segment_ids_BT)
  return jnp.sum(jnp.where(mask_BT, token_logp_BT, 0.0), axis=1), jnp.sum(mask_BT, axis=1).astype(jnp.float32)


def pair_log_probs(model, batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Summed answer log-probs and answer lengths of both sides, {side: [B]}, in one forward pass of 2B rows."""
  cat = lambda key: jnp.concatenate([batch[f"chosen{key}"], batch[f"rejected{key}"]])
  logp_2B, length_2B = answer_log_probs(model, cat(""), cat("_segment_ids"), cat("_answer_start"))
  b = batch["chosen"].shape[0]
  return {"chosen": logp_2B[:b], "rejected": logp_2B[b:]}, {"chosen": length_2B[:b], "rejected": length_2B[b:]}


def preference_loss(model, batch, rng, settings: LossSettings):
  """Summed loss over the real pairs and summed metrics (see loop.LossFn and the module docstring)."""
  del rng  # No dropout.
  logp_B, length_B = pair_log_probs(model, batch)
  ref_B = None if settings.loss == "simpo" else {side: batch[f"{side}_ref_logp"] for side in SIDES}
  loss_B, rewards_B = pair_losses(settings, logp_B, ref_B, length_B)
  pair_B = batch["pair_mask"].astype(jnp.float32)
  margin_B = rewards_B["chosen"] - rewards_B["rejected"]
  per_pair = {
    "accuracy": (margin_B > 0) + 0.5 * (margin_B == 0),
    "margin": margin_B,
    "rewards_chosen": rewards_B["chosen"],
    "rewards_rejected": rewards_B["rejected"],
    "logps_chosen": logp_B["chosen"],
    "logps_rejected": logp_B["rejected"],
  }
  if ref_B is not None:
    per_pair["kl_proxy"] = 0.5 * sum(ref_B[side] - logp_B[side] for side in SIDES)
  sums = {k: jnp.sum(v * pair_B) for k, v in per_pair.items()}
  return jnp.sum(loss_B * pair_B), {"weight": jnp.sum(pair_B), **sums}


# ---------------------------------------------------------------------------------------------------------
# Reference log-probabilities: computed once, stored in the workdir.


def reference_fingerprint(config, tokenizer: Tokenizer, init_step: int, splits: dict[str, dict]) -> dict[str, Any]:
  """What the reference values depend on (not the loss or β): the reference model, the data and its rendering."""
  rows = hashlib.sha256()
  for name in sorted(splits):
    for key in sorted(splits[name]):
      if key.startswith(SIDES):
        rows.update(f"{name}/{key}".encode())
        rows.update(np.ascontiguousarray(splits[name][key]).tobytes())
  return {
    "init_from": os.path.abspath(config.init_from),
    "init_step": int(init_step),
    "data_sha256": _file_sha256(config.data.path),
    "eval_data_sha256": _file_sha256(config.data.eval_path) if config.data.eval_path else "",
    "seq_len": int(config.seq_len),
    "tokenizer": tokenizer.fingerprint(),
    "rows_sha256": rows.hexdigest(),  # The rendered pairs and the train/held-out split.
  }


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def compute_reference_log_probs(
  spec: ModelSpec, params, splits: dict[str, dict[str, np.ndarray]], mesh, batch_size: int
) -> dict[str, np.ndarray]:
  """{f"{split}_{side}": [num_pairs]} summed answer log-probs under (spec, params), `batch_size` pairs per call."""
  keys = [f"{side}{suffix}" for side in SIDES for suffix in ("", "_segment_ids", "_answer_start")]

  def forward(params, batch):
    logp_B, _ = pair_log_probs(spec.merge(params), batch)
    return logp_B

  any_rows = next(iter(splits.values()))
  batch_shardings = {k: sharding.token_sharding(mesh, np.shape(any_rows[k])) for k in keys}
  step = loop.OnMesh(
    jax.jit(forward, in_shardings=(spec.param_shardings, batch_shardings), out_shardings=sharding.replicated(mesh)),
    mesh,
  )
  pid, count = jax.process_index(), jax.process_count()
  out = {}
  for name, rows in splits.items():
    n = len(rows["pair_mask"])
    values = {side: [] for side in SIDES}
    for batch in text.eval_batches({k: rows[k] for k in keys}, batch_size, 0, pid, count):
      for side, v in jax.device_get(step(params, sharding.global_batch(batch, mesh))).items():
        values[side].append(np.asarray(v, np.float32))
    for side in SIDES:
      out[f"{name}_{side}"] = np.concatenate(values[side])[:n]
  return out


def _read_reference(path: str) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop("fingerprint"))), arrays
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to compute it again") from None


def reference_log_probs(
  config,
  workdir: str,
  mesh,
  model_cfg: ModelConfig,
  tokenizer: Tokenizer,
  init_step: int,
  splits: dict[str, dict],
  init_params: Any = None,
) -> dict[str, np.ndarray]:
  """The stored reference values if their fingerprint matches; else computed now with the `init_from` model
  (then dropped) and stored. A mismatch in a workdir that already has checkpoints is a UserError: those
  checkpoints were trained against other reference values. `init_params`: the `init_from` model's parameters
  if the caller holds them already (LoRA's frozen base), instead of loading them again."""
  path = os.path.join(workdir, REFERENCE_FILE)
  fingerprint = reference_fingerprint(config, tokenizer, init_step, splits)
  if os.path.exists(path):
    stored, arrays = _read_reference(path)
    if stored == fingerprint:
      print(f"reference log-probs: reusing {path}", flush=True)
      return arrays
    if ckpt_lib.workdir_meta(workdir) is not None:
      changed = sorted(k for k in fingerprint if (stored or {}).get(k) != fingerprint[k])
      raise UserError(
        f"{path}: this workdir was trained against reference log-probs of another model, data or tokenizer "
        f"(fields {changed} differ); use a new workdir"
      )
  if init_params is None:
    spec, params, _ = load_model(config.init_from, mesh, init_step)  # Merged, if init_from is a LoRA workdir.
  else:
    spec, params = model_spec(lm_factory(model_cfg), mesh), init_params
  arrays = compute_reference_log_probs(spec, params, splits, mesh, config.batch_size // config.grad_accum)
  del params  # No reference model in memory while training.
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.asarray(json.dumps(fingerprint, sort_keys=True)), **arrays)
    write_atomically(path, buffer.getvalue())
  print(f"reference log-probs: computed for {sum(len(v) for v in arrays.values())} answers into {path}", flush=True)
  return arrays


# ---------------------------------------------------------------------------------------------------------
# The stage.


def policy_model(
  config, model_cfg: ModelConfig, mesh, lora: stage.LoraStart | None
) -> tuple[ModelFactory, Callable[[ModelSpec], Any]]:
  """The trained model's factory and its initial parameters: the `init_from` model (merged, if that is a LoRA
  workdir), or with `lora` fresh adapters on that model as the frozen base (as SFT does)."""
  factory = lm_factory(model_cfg, lora and lora.lora)
  if lora is not None:
    return factory, lambda spec: lora.initial_params(factory, spec, config.seed)
  return factory, lambda spec: load_params(config.init_from, spec, mesh)[0]


def validate_dpo_config(config: ml_collections.ConfigDict) -> None:
  if config.loss not in LOSSES:
    raise UserError(f"loss={config.loss!r} must be one of {', '.join(LOSSES)}")
  if not (config.beta > 0 and np.isfinite(config.beta)):
    raise UserError(f"beta={config.beta} must be positive and finite")
  if not 0 <= config.label_smoothing < 0.5:
    raise UserError(f"label_smoothing={config.label_smoothing} must be in [0, 0.5)")
  if config.label_smoothing and config.loss in ("ipo", "hinge"):
    raise UserError(f"label_smoothing={config.label_smoothing}: the {config.loss} loss has none (sigmoid, simpo)")
  if not np.isfinite(config.simpo_gamma) or config.simpo_gamma < 0:
    raise UserError(f"simpo_gamma={config.simpo_gamma} must be >= 0 and finite")
  if not config.init_from:
    raise UserError("init_from: give the SFT workdir to start from")
  if not config.data.path:
    raise UserError("data.path: give a JSONL file of preference pairs")


def prepare_pairs(config, tokenizer: Tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Train and held-out pair arrays (reward_model.pair_arrays), as the reward model splits and renders them."""
  pairs = read_pairs(config.data.path)
  if config.data.eval_path:
    train_pairs, eval_pairs = pairs, read_pairs(config.data.eval_path)
  else:
    train_pairs, eval_pairs = held_out_split(pairs, config.data.eval_fraction, config.seed, config.data.path, "pairs")
  train_rows, dropped = _pair_arrays(config.data.path, train_pairs, tokenizer, config.seq_len)
  eval_rows, eval_dropped = _pair_arrays(
    config.data.eval_path or config.data.path, eval_pairs, tokenizer, config.seq_len
  )
  print(
    f"pairs: {len(train_rows['pair_mask'])} train, {len(eval_rows['pair_mask'])} held out; "
    f"{dropped + eval_dropped} dropped as longer than seq_len={config.seq_len}",
    flush=True,
  )
  return train_rows, eval_rows


def _pair_arrays(path: str, pairs, tokenizer: Tokenizer, seq_len: int):
  try:
    return pair_arrays(pairs, tokenizer, seq_len)
  except UserError as e:  # Say which file.
    raise UserError(f"{path}: {e}") from None


def run(
  config: ml_collections.ConfigDict, workdir: str, devices=None, stop_after: int | None = None
) -> loop.TrainResult:
  devices = jax.devices() if devices is None else devices
  # Everything the user gave is checked before the workdir is written.
  validate_dpo_config(config)
  init_meta = stage.check_source_workdir(config.init_from, "init_from", "SFT", stage.LANGUAGE_MODEL_STAGES)
  config_lib.validate_training_config(
    config, len(devices), jax.process_count(), model_cfg=read_model_config(config.init_from)
  )
  train_rows, eval_rows = prepare_pairs(config, load_tokenizer(config.init_from))
  model_cfg, mesh, tokenizer = stage.continue_from(config, workdir, devices, "SFT", stage_name="dpo")

  settings = LossSettings(config.loss, config.beta, config.label_smoothing, config.simpo_gamma)
  lora = stage.lora_start(config, model_cfg, mesh)  # None: full fine-tuning.
  if config.loss != "simpo":
    splits = {"train": train_rows, "eval": eval_rows}
    base = lora and lora.base  # The reference IS LoRA's frozen base: computed from it, not loaded twice.
    reference = reference_log_probs(config, workdir, mesh, model_cfg, tokenizer, init_meta["step"], splits, base)
    for name, rows in splits.items():
      for side in SIDES:
        rows[f"{side}_ref_logp"] = reference[f"{name}_{side}"]

  factory, initial_params = policy_model(config, model_cfg, mesh, lora)
  pid, count = jax.process_index(), jax.process_count()
  return loop.train(
    config,
    workdir,
    mesh=mesh,
    model_factory=factory,
    loss_fn=lambda model, batch, rng: preference_loss(model, batch, rng, settings),
    train_data=text.train_dataset(train_rows, config.batch_size, config.seed, pid, count),
    eval_data=text.eval_batches(eval_rows, config.batch_size, config.eval_batches, pid, count),
    tokens_per_step=2 * config.batch_size * config.seq_len,
    flops_per_token=model_cfg.train_flops_per_token(config.seq_len),
    initial_params=initial_params,
    eval_at_start=True,
    stop_after=stop_after,
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    meta={
      "stage": "dpo",
      "model": dataclasses.asdict(model_cfg),
      "init_from": config.init_from,
      "init_step": init_meta["step"],
      "loss": config.loss,
      **({"lora": lora.record} if lora else {}),
    },
  )
