"""Reward model: the transformer backbone plus a scalar head, trained on ranked pairs (Bradley-Terry).

    score(prompt, response) = head(backbone(chat)[last token])       the last token ends the answer (<|end|>)
                              + w · min_t log p(answer token t)        (with `likelihood_feature`)
    loss = -log σ(score(chosen) - score(rejected) - margin)

The likelihood term reads the backbone's own LM head: the log-probability of the answer's least likely token
(the answer runs from its first token, `answer_start`, found when the chat is rendered, to the end of the row). A
wrong fact shows up there as one very unlikely token, even for facts that no ranked pair mentioned; a scalar head
fine-tuned on a few thousand pairs instead memorizes which answers were good for the prompts it saw. On the
world-facts experiment (llm_jax/tasks/world_facts/end_to_end.py) the term takes held-out pair accuracy from 70.9 % to
98.2 %, and on pairs about countries that no training pair mentions from 50.8 % (chance) to 86.8 %.

Pairs are JSONL `{"prompt": "..." | "messages": [...], "chosen": "...", "rejected": "..."}`, rendered with the one
chat template (llm_jax/chat.py). The backbone starts from an SFT workdir; the head and `w` start at zero, so
every pair starts at loss log 2. The stage runs on the shared training loop; its metrics are pairwise accuracy and the
mean score margin on held-out pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llm_jax import chat as chat_lib
from llm_jax.data import text
from llm_jax.data.jsonl import held_out_split, read_jsonl
from llm_jax.errors import UserError
from llm_jax.model import LoraConfig, ModelConfig
from llm_jax.modeling import (
  ModelSpec,
  build_model,
  init_params,
  lm_factory,
  load_model,
  load_params,
  model_spec,
  read_model_config,
  read_stage_config,
)
from llm_jax.sequences import positions_from_segments, right_pad
from llm_jax.tokenizer import Tokenizer
from llm_jax.train import loop, stage


class ScalarHead(nnx.Module):
  """hidden [B, T, D] → scalar [B, T]; zero-initialized."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs
    self.w_D = nnx.Param(jnp.zeros((cfg.d_model,), cfg.param_dtype), out_sharding=("embed",), eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((), cfg.param_dtype), out_sharding=(), eager_sharding=False)

  def __call__(self, h_BTD: jax.Array) -> jax.Array:
    return (h_BTD.astype(jnp.float32) @ self.w_D[...].astype(jnp.float32)) + self.bias[...]


# Adam moves every parameter by about the learning rate per step. The likelihood weight must reach O(1) within
# tens of steps while the backbone moves by 1e-4, so it is stored divided by this factor.
LIKELIHOOD_WEIGHT_SCALE = 100.0


class RewardModel(nnx.Module):
  """A transformer with a scalar head, and optionally the answer-likelihood term (module docstring).

  Called directly it gives the head's scalar at every position (PPO's value network is a copy of it);
  `sequence_scores` gives the reward of whole sequences.
  """

  def __init__(
    self, cfg: ModelConfig, likelihood_feature: bool = False, *, rngs: nnx.Rngs, lora: LoraConfig | None = None
  ):
    self.transformer = build_model(cfg, rngs, lora)
    self.head = ScalarHead(cfg, rngs=rngs)
    self.likelihood_feature = likelihood_feature
    self.likelihood_weight = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)

  def __call__(self, tokens_BT, positions_BT, segment_ids_BT) -> jax.Array:
    return self.head(self.transformer.backbone(tokens_BT, positions_BT, segment_ids_BT))


def last_token_index(segment_ids_BT: jax.Array) -> jax.Array:
  """Index of each row's last real (segment ≠ 0) token."""
  t = segment_ids_BT.shape[1]
  return jnp.max(jnp.where(segment_ids_BT != 0, jnp.arange(t)[None, :], 0), axis=1)


def answer_mask(answer_start_B: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T-1] bool: token t+1 is part of the answer (at or after the row's `answer_start`, not padding)."""
  t = segment_ids_BT.shape[1]
  return (jnp.arange(1, t)[None, :] >= answer_start_B[:, None]) & (segment_ids_BT[:, 1:] != 0)


# The likelihood term of an answer without a single text token (empty, or only role/control tokens): a floor
# far below any real answer's least likely token (e^-30), so that saying nothing never scores as a sure answer.
EMPTY_ANSWER_LOG_PROB = -30.0


def min_answer_log_prob(
  model: RewardModel, h_BTD, tokens_BT, segment_ids_BT, answer_start_B, special_ids: tuple[int, ...]
) -> jax.Array:
  """[B]: the log-probability of each answer's least likely token under the backbone's own LM head; an answer
  with no text token (only ids in `special_ids`, the tokenizer's) gets `EMPTY_ANSWER_LOG_PROB` (the minimum of
  nothing would otherwise be the best value)."""
  log_probs_BTV = jax.nn.log_softmax(model.transformer.logits(h_BTD)[:, :-1].astype(jnp.float32))
  token_log_probs_BT = jnp.take_along_axis(log_probs_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  in_answer_BT = answer_mask(answer_start_B, segment_ids_BT)
  is_text_BT = ~jnp.isin(tokens_BT[:, 1:], jnp.asarray(special_ids, jnp.int32))
  has_text_B = jnp.any(in_answer_BT & is_text_BT, axis=1)
  least_B = jnp.min(jnp.where(in_answer_BT, token_log_probs_BT, 0.0), axis=1)
  return jnp.where(has_text_B, least_B, EMPTY_ANSWER_LOG_PROB)


def sequence_scores(
  model: RewardModel, tokens_BT, segment_ids_BT, answer_start_B, special_ids: tuple[int, ...]
) -> jax.Array:
  """The reward of each row: the head read at its last real token (+ the likelihood term over the answer, which
  starts at `answer_start_B`; `special_ids`: the tokenizer's). Rows may be left- or right-padded."""
  positions_BT = positions_from_segments(segment_ids_BT)
  h_BTD = model.transformer.backbone(tokens_BT, positions_BT, segment_ids_BT)
  last_B = last_token_index(segment_ids_BT)
  scores_B = jnp.take_along_axis(model.head(h_BTD), last_B[:, None], axis=1)[:, 0]
  if model.likelihood_feature:
    weight = model.likelihood_weight[...] * LIKELIHOOD_WEIGHT_SCALE
    likelihood_B = min_answer_log_prob(model, h_BTD, tokens_BT, segment_ids_BT, answer_start_B, special_ids)
    scores_B = scores_B + weight * likelihood_B
  return scores_B


def bradley_terry_loss(model: RewardModel, batch, rng, margin: float = 0.0, special_ids: tuple[int, ...] = ()):
  """Summed −log σ(r_chosen − r_rejected − margin) over the real pairs (see loop.LossFn)."""
  del rng
  chosen_B = sequence_scores(
    model, batch["chosen"], batch["chosen_segment_ids"], batch["chosen_answer_start"], special_ids
  )
  rejected_B = sequence_scores(
    model, batch["rejected"], batch["rejected_segment_ids"], batch["rejected_answer_start"], special_ids
  )
  pair_B = batch["pair_mask"].astype(jnp.float32)
  diff_B = chosen_B - rejected_B
  loss_B = -jax.nn.log_sigmoid(diff_B - margin)
  correct_B = (diff_B > 0) + 0.5 * (diff_B == 0)  # A tie (e.g. the zero-initialized head) is a coin flip.
  return jnp.sum(loss_B * pair_B), {
    "weight": jnp.sum(pair_B),
    "accuracy": jnp.sum(correct_B * pair_B),
    "margin": jnp.sum(diff_B * pair_B),
  }


# ---------------------------------------------------------------------------------------------------------
# Data.


def _parse_pair(obj) -> tuple[chat_lib.Chat, str, str]:
  if not isinstance(obj, dict):
    raise ValueError("expected a JSON object")
  for field in ("chosen", "rejected"):
    if not isinstance(obj.get(field), str) or not obj[field].strip():
      raise ValueError(f"{field!r} must be a non-empty string")
  return prompt_context(obj), obj["chosen"], obj["rejected"]


def prompt_context(obj) -> chat_lib.Chat:
  """The conversation an answer continues: {"prompt": "..."} (one user turn) or {"messages": [...]} ending with
  a user turn. A conversation ending with an assistant turn is refused, not continued: the template would
  render two assistant turns in a row."""
  if isinstance(obj, dict) and "messages" in obj:
    chat = chat_lib.parse_chat({"messages": obj["messages"]})
    if chat[-1].role != "user":
      raise ValueError(
        f"'messages' must end with a user turn (the answer continues it); the last message is {chat[-1].role!r}"
      )
    return chat
  if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
    return (chat_lib.Message("user", obj["prompt"]),)
  raise ValueError("expected a non-empty 'prompt' string or a 'messages' list")


def read_pairs(path: str) -> list[tuple[chat_lib.Chat, str, str]]:
  """(context, chosen, rejected) triples; errors name file and line."""
  pairs, _ = read_jsonl(path, _parse_pair)
  if not pairs:
    raise UserError(f"{path}: no preference pairs")
  return pairs


def pair_arrays(pairs, tokenizer: Tokenizer, seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """Right-padded [num_pairs, seq_len] arrays and each answer's start; pairs longer than seq_len are dropped (and
  counted)."""
  rows = {k: [] for k in ("chosen", "rejected")}
  starts = {k: [] for k in rows}
  dropped = 0
  for context, chosen, rejected in pairs:
    (c, c_start), (r, r_start) = (chat_lib.render_response(tokenizer, context, a) for a in (chosen, rejected))
    if max(len(c), len(r)) > seq_len:
      dropped += 1
      continue
    rows["chosen"].append(c)
    rows["rejected"].append(r)
    starts["chosen"].append(c_start)
    starts["rejected"].append(r_start)
  if not rows["chosen"]:
    raise UserError(f"every preference pair is longer than seq_len={seq_len}")
  out = {}
  for name, sequences in rows.items():
    out[name], out[f"{name}_segment_ids"] = right_pad(sequences, seq_len)
    out[f"{name}_answer_start"] = np.asarray(starts[name], np.int32)
  out["pair_mask"] = np.ones(len(rows["chosen"]), np.float32)
  return out, dropped


def load_reward_model(workdir: str, mesh, step: int | None = None) -> tuple[ModelSpec, dict, ModelConfig]:
  """A trained reward model's spec and parameters (sharded on `mesh`): the latest (or `step`'s) checkpoint."""
  if not workdir:
    raise UserError("reward_model: give the reward-model workdir")
  stage.check_source_workdir(workdir, "reward_model", "reward-model", ("reward_model",))  # Before loading.
  model_cfg = read_model_config(workdir)
  likelihood_feature = read_stage_config(workdir).get("likelihood_feature", False)
  state, params, meta = load_model(
    workdir,
    mesh,
    step,
    model_factory=lambda lora: lambda rngs: RewardModel(model_cfg, likelihood_feature, rngs=rngs, lora=lora),
  )
  if meta.get("stage") != "reward_model":
    raise UserError(f"{workdir}: a {meta.get('stage')!r} checkpoint, not a reward model")
  return state, params, model_cfg


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> loop.TrainResult:
  devices = jax.devices() if devices is None else devices
  model_cfg, mesh, tokenizer = stage.continue_from(config, workdir, devices, "SFT", stage_name="reward_model")
  if not config.data.path:
    raise UserError("data.path: give a JSONL file of preference pairs")
  pairs = read_pairs(config.data.path)
  if config.data.eval_path:
    train_pairs, eval_pairs = pairs, read_pairs(config.data.eval_path)
  else:
    train_pairs, eval_pairs = held_out_split(pairs, config.data.eval_fraction, config.seed, config.data.path, "pairs")
  train_rows, dropped = pair_arrays(train_pairs, tokenizer, config.seq_len)
  eval_rows, eval_dropped = pair_arrays(eval_pairs, tokenizer, config.seq_len)
  print(
    f"pairs: {len(train_rows['pair_mask'])} train, {len(eval_rows['pair_mask'])} held out; "
    f"{dropped + eval_dropped} dropped as longer than seq_len={config.seq_len}",
    flush=True,
  )

  lora = stage.lora_start(config, model_cfg, mesh)  # None: the whole backbone trains.
  factory = lambda rngs: RewardModel(model_cfg, config.likelihood_feature, rngs=rngs, lora=lora and lora.lora)

  def initial_params(state: ModelSpec):
    if lora is not None:  # Adapters and the zero head train; the backbone is the frozen SFT model.
      return lora.initial_params(factory, state, config.seed)
    params = init_params(factory, state, config.seed, skip=("transformer",))  # The backbone is the SFT model's.
    backbone_spec = model_spec(lm_factory(model_cfg), mesh)
    return {**params, "transformer": load_params(config.init_from, backbone_spec, mesh)[0]}

  pid, count = jax.process_index(), jax.process_count()
  special_ids = tuple(sorted(tokenizer.special_ids))
  loss_fn = lambda model, batch, rng: bradley_terry_loss(model, batch, rng, config.margin, special_ids)
  return loop.train(
    config,
    workdir,
    mesh=mesh,
    model_factory=factory,
    loss_fn=loss_fn,
    train_data=text.train_dataset(train_rows, config.batch_size, config.seed, pid, count),
    eval_data=text.eval_batches(eval_rows, config.batch_size, config.eval_batches, pid, count),
    tokens_per_step=2 * config.batch_size * config.seq_len,
    flops_per_token=model_cfg.train_flops_per_token(config.seq_len),
    initial_params=initial_params,
    eval_at_start=True,
    meta={
      "stage": "reward_model",
      "model": dataclasses.asdict(model_cfg),
      "init_from": config.init_from,
      **({"lora": lora.record} if lora else {}),
    },
  )
