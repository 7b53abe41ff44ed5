"""RLHF: policy-gradient fine-tuning of an SFT model against a reward model, with a KL penalty to the SFT model.

One iteration:
  1. rollout    sample one response per prompt (k per prompt for GRPO/RLOO) with the KV-cache sampler, as an
                answer in the chat template: role and control tokens are never sampled (`chat.banned_in_answers`),
                the end-of-turn token (<|end|>) or EOS ends it (`chat.answer_stop_ids`). Log-probs, ratios and the
                KL are all computed under exactly that distribution (banned ids removed, logits / `temperature`),
                so any temperature > 0 is exact;
  2. score      the reward model's score of prompt + response (read at the response's last token), minus
                `missing_eos_penalty` for answers that max_new_tokens cut off before <|end|>;
                log π, log π_ref and (PPO) values for every response token, in one jitted pass;
  3. rewards    the score at the last response token; with `kl_in="reward"` also −β·kl per token;
  4. advantages PPO: GAE(γ, λ) against the value model, whitened; GRPO: (R − mean_group) / std_group;
                RLOO: R − mean of the other k − 1 samples of the prompt (R = the sequence's total reward, the
                score alone when `kl_in="loss"`); a group of equal returns has zero advantage;
  5. update     `ppo_epochs` passes over minibatches of the clipped surrogate (+ β·kl with `kl_in="loss"`,
                + the clipped value loss for PPO), each a step of the shared jitted train step
                (`loop.make_train_step`, honouring `grad_accum`).
The KL estimator per token is k1, k2 or k3 (`KL_ESTIMATORS`); `kl_in`/`kl_estimator` "auto" follow each
algorithm's paper (`kl_settings`). β is fixed, or adapted toward `target_kl` (Ziegler et al. 2019). Padding
and tokens after <|end|>/<eos> are masked everywhere. The value model is a separate network initialized from
the reward model (`value_init="reward_model"`) or a scalar head on the policy's own hidden states
(`value_init="policy_head"`).

With `config.lora.rank` > 0 the policy (and PPO's value network) train LoRA adapters on frozen bases; the
reference policy is the policy's base without the adapters (the same arrays: no second copy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llm_jax import chat as chat_lib
from llm_jax import sharding
from llm_jax.data.jsonl import read_jsonl
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler, SamplingConfig, bucket
from llm_jax.model import LoraConfig, ModelConfig
from llm_jax.modeling import ModelSpec, build_model, init_params, lm_factory, load_model, model_spec
from llm_jax.sequences import positions_from_segments, prompt_response_rows, response_log_probs
from llm_jax.tokenizer import Tokenizer
from llm_jax.train import loop, stage
from llm_jax.train.reward_model import RewardModel, ScalarHead, load_reward_model, prompt_context, sequence_scores


class ActorCritic(nnx.Module):
  """The trained parameters: the policy, and for PPO its value function (a network or a head)."""

  def __init__(self, cfg: ModelConfig, value: str, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
    self.policy = build_model(cfg, rngs, lora)
    self.value_mode = value
    if value == "reward_model":
      self.value = RewardModel(cfg, rngs=rngs, lora=lora)  # With LoRA: adapters on the frozen reward model.
    elif value == "policy_head":
      self.value_head = ScalarHead(cfg, rngs=rngs)

  def __call__(self, tokens_BT, positions_BT, segment_ids_BT) -> tuple[jax.Array, jax.Array | None]:
    """Logits [B, T, V] and values [B, T] (None without a value function)."""
    h_BTD = self.policy.backbone(tokens_BT, positions_BT, segment_ids_BT)
    logits_BTV = self.policy.logits(h_BTD)
    if self.value_mode == "reward_model":
      return logits_BTV, self.value(tokens_BT, positions_BT, segment_ids_BT)
    if self.value_mode == "policy_head":
      return logits_BTV, self.value_head(h_BTD)
    return logits_BTV, None


# ---------------------------------------------------------------------------------------------------------
# The math (each piece tested against NumPy).

# Estimators of KL(π ‖ π_ref) from one token sampled from π, given log_ratio = log π − log π_ref (Schulman,
# "Approximating KL divergence", 2020): k1 is unbiased but often negative, k2 = ½·log_ratio² is biased with low
# variance, k3 = (π_ref/π − 1) − log(π_ref/π) is unbiased and never negative (DeepSeekMath's GRPO loss term).
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "k1": lambda log_ratio: log_ratio,
  "k2": lambda log_ratio: 0.5 * jnp.square(log_ratio),
  "k3": lambda log_ratio: jnp.expm1(-log_ratio) + log_ratio,
}
KL_PLACEMENTS = ("reward", "loss")


def token_rewards(scores_B, kl_BN, mask_BN, beta) -> jax.Array:
  """Per-token rewards [B, N]: −β·kl on every response token, plus the sequence's score on its last token."""
  last_B = jnp.maximum(mask_BN.sum(1).astype(jnp.int32) - 1, 0)
  score_BN = jax.nn.one_hot(last_B, mask_BN.shape[1]) * scores_B[:, None]
  return (score_BN - beta * kl_BN) * mask_BN


def gae(rewards_BN, values_BN, mask_BN, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation over the masked response tokens; returns (advantages, returns)."""
  next_values_BN = jnp.concatenate([values_BN[:, 1:] * mask_BN[:, 1:], jnp.zeros_like(values_BN[:, :1])], 1)
  deltas_BN = rewards_BN + gamma * next_values_BN - values_BN

  def backward(next_advantage_B, xs):
    delta_B, next_mask_B = xs
    advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B
    return advantage_B, advantage_B

  next_mask_BN = jnp.concatenate([mask_BN[:, 1:], jnp.zeros_like(mask_BN[:, :1])], 1)
  _, advantages_NB = jax.lax.scan(
    backward, jnp.zeros_like(rewards_BN[:, 0]), (deltas_BN.T, next_mask_BN.T), reverse=True
  )
  advantages_BN = advantages_NB.T * mask_BN
  return advantages_BN, (advantages_BN + values_BN) * mask_BN


def masked_mean_var(x, mask) -> tuple[jax.Array, jax.Array]:
  count = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / count
  return mean, (jnp.square(x - mean) * mask).sum() / count


def masked_whiten(x, mask, eps: float = 1e-8):
  """(x − mean) / std over the masked entries only; padding stays 0."""
  mean, var = masked_mean_var(x, mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def group_advantages(returns_B, group_size: int, algorithm: str) -> jax.Array:
  """Critic-free sequence advantages; rows [g·k, (g+1)·k) are the k samples of prompt g.

  GRPO: (R − group mean) / group std, the std with ddof=1 as TRL computes it. RLOO: R − the mean of the other
  k − 1 samples. A group whose returns are all equal gets exactly zero advantage (it carries no signal; dividing
  rounding noise by a tiny std would invent one).
  """
  r_GK = returns_B.reshape(-1, group_size)
  if algorithm == "grpo":
    adv_GK = (r_GK - r_GK.mean(1, keepdims=True)) / (r_GK.std(1, ddof=1, keepdims=True) + 1e-6)
  else:  # RLOO: leave-one-out mean of the other samples.
    adv_GK = r_GK - (r_GK.sum(1, keepdims=True) - r_GK) / (group_size - 1)
  spread_G1 = r_GK.max(1, keepdims=True) - r_GK.min(1, keepdims=True)
  return jnp.where(spread_G1 > 0, adv_GK, 0.0).reshape(-1)


def policy_loss(new_log_probs, old_log_probs, advantages, mask, clip: float):
  ratio = jnp.exp(new_log_probs - old_log_probs)
  unclipped, clipped = -advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip)
  loss = jnp.maximum(unclipped, clipped)
  return jnp.sum(loss * mask), {
    "clip_fraction": jnp.sum((jnp.abs(ratio - 1) > clip) * mask),
    "approx_kl": jnp.sum(((ratio - 1) - (new_log_probs - old_log_probs)) * mask),
    "unclipped_loss": jnp.sum(unclipped * mask),
    "ratio": jnp.sum(ratio * mask),
  }


def value_loss(new_values, old_values, returns, mask, clip: float):
  clipped = old_values + jnp.clip(new_values - old_values, -clip, clip)
  loss = 0.5 * jnp.maximum((new_values - returns) ** 2, (clipped - returns) ** 2)
  return jnp.sum(loss * mask)


def adaptive_kl_coef(beta: float, kl: float, target_kl: float, batch_size: int, horizon: int) -> float:
  """Ziegler et al. 2019 (§2.2): β ← β·(1 + K_β·e), e = clip(KL / KL_target − 1, ±0.2), K_β = batch / horizon."""
  error = float(np.clip(kl / target_kl - 1, -0.2, 0.2))
  return beta * (1 + error * batch_size / horizon)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The fields of the config that the math needs (static for jit)."""

  algorithm: str
  prompt_len: int
  group_size: int
  gamma: float
  lam: float
  clip: float
  value_clip: float
  value_coef: float
  whiten_rewards: bool
  reward_clip: float
  temperature: float
  banned_ids: tuple[int, ...]
  kl_in: str  # "reward": −β·kl per token in the rewards; "loss": +β·kl as a separate loss term.
  kl_estimator: str  # A key of KL_ESTIMATORS.
  missing_eos_penalty: float

  def log_probs(self, logits_BTV, tokens_BT):
    return response_log_probs(logits_BTV, tokens_BT, self.prompt_len, self.temperature, self.banned_ids)


def gae_advantages(rewards_BN, values_BN, mask_BN, rl: RLConfig) -> tuple[dict[str, jax.Array], jax.Array]:
  """PPO: GAE against the value model, whitened; also the returns and values its value loss needs."""
  advantages, returns = gae(rewards_BN, values_BN, mask_BN, rl.gamma, rl.lam)
  explained = 1 - masked_mean_var(returns - values_BN, mask_BN)[1] / (masked_mean_var(returns, mask_BN)[1] + 1e-8)
  out = {"advantages": masked_whiten(advantages, mask_BN), "returns": returns, "old_values": values_BN}
  return out, explained


def critic_free_advantages(rewards_BN, values_BN, mask_BN, rl: RLConfig) -> tuple[dict[str, jax.Array], jax.Array]:
  """GRPO / RLOO: one advantage per answer, from the returns of the other answers to the same prompt."""
  del values_BN
  advantages_B = group_advantages(rewards_BN.sum(1), rl.group_size, rl.algorithm)
  return {"advantages": advantages_B[:, None] * mask_BN}, jnp.float32(jnp.nan)


@dataclasses.dataclass(frozen=True)
class Algorithm:
  advantages: Callable[..., tuple[dict[str, jax.Array], jax.Array]]  # (rewards, values, mask, rl) → outputs.
  critic: bool  # Learns a value function (and samples one answer per prompt); else `group_size` answers.
  default_kl_in: str  # Where its paper puts the KL penalty ("auto").


ALGORITHMS = {
  "ppo": Algorithm(gae_advantages, critic=True, default_kl_in="reward"),  # Ziegler et al. 2019.
  "grpo": Algorithm(critic_free_advantages, critic=False, default_kl_in="loss"),  # DeepSeekMath §4.1.
  "rloo": Algorithm(critic_free_advantages, critic=False, default_kl_in="reward"),  # Ahmadian et al. 2024.
}


def make_scorer(
  rl: RLConfig, ac_state: ModelSpec, ref_state: ModelSpec, reward_fn: Callable[[Any, jax.Array], jax.Array]
):
  """One jitted pass over a rollout batch: log π, log π_ref, values, scores → advantages and returns."""

  @jax.jit
  def score(params, ref_params, reward_params, batch, beta):
    tokens, segments, mask = batch["tokens"], batch["segment_ids"], batch["response_mask"]
    positions = positions_from_segments(segments)
    logits, values_BT = ac_state.merge(params)(tokens, positions, segments)
    log_probs, entropy = rl.log_probs(logits, tokens)
    ref_log_probs, _ = rl.log_probs(ref_state.merge(ref_params)(tokens, positions, segments), tokens)
    raw_scores = reward_fn(reward_params, batch)
    # An answer cut off by max_new_tokens is scored at a mid-answer token the reward model never saw.
    scores = raw_scores - rl.missing_eos_penalty * (1 - batch["ended"])
    if rl.whiten_rewards:
      scores = (scores - scores.mean()) / (scores.std() + 1e-6)
    if rl.reward_clip > 0:
      scores = jnp.clip(scores, -rl.reward_clip, rl.reward_clip)
    log_ratio = (log_probs - ref_log_probs) * mask
    kl_BN = KL_ESTIMATORS[rl.kl_estimator](log_ratio) * mask
    rewards = token_rewards(scores, kl_BN if rl.kl_in == "reward" else jnp.zeros_like(kl_BN), mask, beta)
    values = None if values_BT is None else values_BT[:, rl.prompt_len - 1 : -1] * mask
    out, explained = ALGORITHMS[rl.algorithm].advantages(rewards, values, mask, rl)
    out.update(
      old_log_probs=log_probs,
      ref_log_probs=ref_log_probs,
      response_mask=mask,
      kl_coef=jnp.full(mask.shape[:1], beta, jnp.float32),
    )
    count = jnp.maximum(mask.sum(), 1.0)
    rows = mask.shape[0]
    stats = {
      "score": jnp.mean(raw_scores),
      "reward": jnp.mean(scores),
      **{f"kl_{k}": jnp.sum(f(log_ratio) * mask) / rows for k, f in KL_ESTIMATORS.items()},
      "entropy": jnp.sum(entropy * mask) / count,
      "response_length": mask.sum(1).mean(),
      "prompt_length": (segments[:, : rl.prompt_len] != 0).sum(1).mean(),
      "truncated_fraction": 1 - jnp.mean(batch["ended"]),
      "explained_variance": explained,
    }
    return out, stats

  return score


def make_loss(rl: RLConfig):
  def loss_fn(model: ActorCritic, batch, rng):
    del rng
    tokens, segments, mask = batch["tokens"], batch["segment_ids"], batch["response_mask"]
    logits, values_BT = model(tokens, positions_from_segments(segments), segments)
    log_probs, entropy = rl.log_probs(logits, tokens)
    loss, metrics = policy_loss(log_probs, batch["old_log_probs"], batch["advantages"], mask, rl.clip)
    metrics["entropy"] = jnp.sum(entropy * mask)
    if rl.kl_in == "loss":  # DeepSeekMath §4.1: the KL is its own term, not part of the advantages.
      kl_BN = KL_ESTIMATORS[rl.kl_estimator](log_probs - batch["ref_log_probs"]) * mask
      metrics["kl_loss"] = jnp.sum(kl_BN)
      loss = loss + jnp.sum(batch["kl_coef"][:, None] * kl_BN)
    if ALGORITHMS[rl.algorithm].critic:
      values = values_BT[:, rl.prompt_len - 1 : -1]
      v_loss = value_loss(values, batch["old_values"], batch["returns"], mask, rl.value_clip)
      metrics["value_loss"] = v_loss
      loss = loss + rl.value_coef * v_loss
    metrics["weight"] = jnp.sum(mask)
    return loss, metrics

  return loss_fn


# ---------------------------------------------------------------------------------------------------------
# The RL loop.


def read_prompts(path: str) -> list[chat_lib.Chat]:
  """JSONL lines with "prompt" (a user turn) or "messages" (a conversation to continue)."""
  chats, _ = read_jsonl(path, prompt_context)
  if not chats:
    raise UserError(f"{path}: no prompts")
  return chats


def kl_settings(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(kl_in, kl_estimator), "auto" resolved per algorithm as in its paper: PPO and RLOO subtract β·k1 from the
  per-token rewards (Ziegler et al. 2019; Ahmadian et al. 2024), GRPO adds β·k3 to the loss (DeepSeekMath §4.1)."""
  kl_in = config.kl_in
  if kl_in == "auto":
    kl_in = ALGORITHMS[config.algorithm].default_kl_in
  estimator = config.kl_estimator
  if estimator == "auto":
    estimator = "k3" if kl_in == "loss" else "k1"
  return kl_in, estimator


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  if config.algorithm not in ALGORITHMS:
    raise UserError(f"algorithm={config.algorithm!r} must be one of {list(ALGORITHMS)}")
  if config.value_init not in ("reward_model", "policy_head"):
    raise UserError(f"value_init={config.value_init!r} must be 'reward_model' or 'policy_head'")
  if not ALGORITHMS[config.algorithm].critic and config.group_size < 2:
    raise UserError(f"group_size={config.group_size} must be >= 2 for {config.algorithm}")
  if config.kl_in not in ("auto", *KL_PLACEMENTS):
    raise UserError(f"kl_in={config.kl_in!r} must be one of {['auto', *KL_PLACEMENTS]}")
  if config.kl_estimator not in ("auto", *KL_ESTIMATORS):
    raise UserError(f"kl_estimator={config.kl_estimator!r} must be one of {['auto', *KL_ESTIMATORS]}")
  for field in ("iterations", "prompts_per_iteration", "ppo_epochs", "minibatch_size", "max_new_tokens", "grad_accum"):
    if config[field] <= 0:
      raise UserError(f"{field}={config[field]} must be positive")
  if not config.temperature > 0:
    raise UserError(
      f"temperature={config.temperature} must be > 0: rollouts sample from the policy (log-probs, "
      "ratios and KL are computed at this temperature)"
    )
  if config.missing_eos_penalty < 0:
    raise UserError(f"missing_eos_penalty={config.missing_eos_penalty} must be >= 0")
  rollout = config.prompts_per_iteration * (1 if ALGORITHMS[config.algorithm].critic else config.group_size)
  if rollout % config.minibatch_size:
    raise UserError(f"minibatch_size={config.minibatch_size} must divide the rollout batch ({rollout})")
  shape = sharding.config_mesh_shape(config.mesh, num_devices)
  if shape[sharding.MESH_AXES.index("sequence")] > 1:  # Checked before anything is written.
    raise UserError(
      f"mesh.sequence={config.mesh.sequence}: RLHF samples its rollouts with the KV-cache sampler, which does not "
      "shard the sequence; use mesh.sequence=1"
    )
  if config.minibatch_size % (config.grad_accum * shape[0] * shape[1]):
    raise UserError(
      f"minibatch_size={config.minibatch_size} must be divisible by grad_accum*mesh.data*mesh.fsdp "
      f"({config.grad_accum}*{shape[0]}*{shape[1]})"
    )


def rollout_prompts(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, model_cfg: ModelConfig, prompts: list[list[int]] | None
) -> list[list[int]]:
  """Token ids of the prompts, each ending where the assistant's answer begins; all must leave room for
  max_new_tokens in the model's context."""
  if prompts is None:
    prompts = [chat_lib.render(tokenizer, chat, generation_prompt=True)[0] for chat in read_prompts(config.data.path)]
  too_long = [i for i, p in enumerate(prompts) if len(p) + config.max_new_tokens > model_cfg.max_seq_len]
  if too_long:
    raise UserError(
      f"{len(too_long)} prompts (first: #{too_long[0]}) leave no room for max_new_tokens="
      f"{config.max_new_tokens} in the model's context of {model_cfg.max_seq_len}"
    )
  return prompts


def rl_config(
  config: ml_collections.ConfigDict, prompts: list[list[int]], model_cfg: ModelConfig, tokenizer: Tokenizer
) -> RLConfig:
  prompt_len = min(bucket(max(len(p) for p in prompts)), model_cfg.max_seq_len - config.max_new_tokens)
  kl_in, kl_estimator = kl_settings(config)
  return RLConfig(
    config.algorithm,
    prompt_len,
    1 if ALGORITHMS[config.algorithm].critic else config.group_size,
    config.gamma,
    config.lam,
    config.clip,
    config.value_clip,
    config.value_coef,
    config.whiten_rewards,
    config.reward_clip,
    config.temperature,
    chat_lib.banned_in_answers(tokenizer),
    kl_in,
    kl_estimator,
    config.missing_eos_penalty,
  )


# What each iteration prints (all of its metrics go to metrics.jsonl).
PROGRESS_KEYS = (
  "score",
  "kl_k1",
  "kl_k3",
  "beta",
  "clip_fraction",
  "response_length",
  "truncated_fraction",
  "rollout_tokens_per_second",
  "iteration_seconds",
)


class RolloutIteration:
  """One RL iteration, the loop's step: rollout → score → `ppo_epochs` passes of minibatch updates."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    rl: RLConfig,
    trainer: loop.Trainer,
    prompts: list[list[int]],
    sampler: Sampler,
    tokenizer: Tokenizer,
    score,
    ref_params,
    reward_params,
    reward_fn: Callable[[list[int]], float] | None,
    fields: list[str],
  ):
    self.config, self.rl, self.trainer, self.prompts, self.score = config, rl, trainer, prompts, score
    self.ref_params, self.reward_params, self.reward_fn, self.fields = ref_params, reward_params, reward_fn, fields
    self.sampler = sampler  # The policy's language model (its parameters change every iteration).
    # Answers in the chat template: stop at the end of the turn, never a role or control token (banned_ids, which
    # the log-probs exclude too: rl.banned_ids is the same set).
    self.sampling = chat_lib.chat_sampling(
      SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature), tokenizer
    )
    self.rollout_size = config.prompts_per_iteration * rl.group_size
    self.minibatches = self.rollout_size // config.minibatch_size
    self.order = [int(i) for i in np.random.default_rng(config.seed).permutation(len(prompts))]
    self.history: list[dict[str, float]] = []

  def rollout(self, iteration: int) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    config = self.config
    picked = [
      self.order[(iteration * config.prompts_per_iteration + j) % len(self.order)]
      for j in range(config.prompts_per_iteration)
    ]
    batch_prompts = [self.prompts[i] for i in picked for _ in range(self.rl.group_size)]
    self.sampler.params = self.trainer.params["policy"]
    generation = self.sampler.generate(batch_prompts, self.sampling, jax.random.key(config.seed * 100_003 + iteration))
    host = prompt_response_rows(batch_prompts, generation.tokens, self.rl.prompt_len, config.max_new_tokens)
    host["ended"] = np.array([len(t) > 0 and t[-1] in self.sampling.stop_ids for t in generation.tokens], np.float32)
    if self.reward_fn is not None:
      host["rule_scores"] = np.array([self.reward_fn(t) for t in generation.tokens], np.float32)
    return host, generation.tokens

  def update(self, iteration: int, rollout: dict[str, np.ndarray]) -> list[dict[str, jax.Array]]:
    """`ppo_epochs` passes over shuffled minibatches; metrics stay on device (no host sync between updates)."""
    config, metrics = self.config, []
    update_index = (iteration - 1) * config.ppo_epochs * self.minibatches
    for epoch in range(config.ppo_epochs):
      perm = np.random.default_rng(config.seed + iteration * 1000 + epoch).permutation(self.rollout_size)
      for m in range(self.minibatches):
        idx = np.sort(perm[m * config.minibatch_size : (m + 1) * config.minibatch_size])
        minibatch = sharding.global_batch({k: v[idx] for k, v in rollout.items()}, self.trainer.mesh)
        metrics.append(self.trainer.update(minibatch, update_index))
        update_index += 1
    return metrics

  def __call__(self, iteration: int) -> dict[str, float]:
    t0 = time.perf_counter()
    host, responses = self.rollout(iteration)
    t_rollout = time.perf_counter() - t0
    beta = self.trainer.stage_state["beta"]
    batch = sharding.global_batch(host, self.trainer.mesh)
    prepared, stats = self.score(self.trainer.params, self.ref_params, self.reward_params, batch, jnp.float32(beta))
    prepared.update(tokens=batch["tokens"], segment_ids=batch["segment_ids"])
    step_metrics = self.update(iteration, jax.device_get({k: prepared[k] for k in self.fields}))
    step_metrics, stats = jax.device_get((step_metrics, stats))
    stats = {k: float(v) for k, v in stats.items()}
    row = {
      **stats,
      **{k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]},
      "first_ratio": float(step_metrics[0]["ratio"]),
      "beta": beta,
      "rollout_seconds": t_rollout,
      "rollout_tokens_per_second": sum(len(t) for t in responses) / t_rollout,
      "iteration_seconds": time.perf_counter() - t0,
    }
    if stats["kl_k1"] < 0:
      print(f"WARNING: negative mean KL {stats['kl_k1']:.4f} at iteration {iteration}", flush=True)
    if self.config.target_kl > 0:
      self.trainer.stage_state["beta"] = adaptive_kl_coef(
        beta, stats["kl_k1"], self.config.target_kl, self.rollout_size, self.config.kl_horizon
      )
    self.history.append(row)
    return row


def lora_initial_params(spec: ModelSpec, factory, seed: int, base, value_mode: str, rm_params) -> dict:
  """LoRA: fresh adapters on frozen bases, no copies. The policy's base is the SFT model (also the reference);
  PPO's value network is the reward model's backbone (the scorer's own arrays) with adapters, its head starting
  from the reward model's (the policy's base when a rule replaces the reward model)."""
  trainable = init_params(factory, spec, seed, trainable_only=True)
  frozen = {"policy": base}
  if value_mode == "reward_model":
    frozen["value"] = {"transformer": base if rm_params is None else rm_params["transformer"]}
    if rm_params is not None:  # Copies: the trained part is donated at every update.
      trainable["value"].update({k: jax.tree.map(jnp.copy, v) for k, v in rm_params.items() if k != "transformer"})
  return spec.join(trainable, spec.split(spec.join({}, frozen))[1])


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  devices=None,
  reward_fn: Callable[[list[int]], float] | None = None,
  prompts: list[list[int]] | None = None,
) -> list[dict[str, float]]:
  """Runs `config.iterations` RL iterations on the shared loop; returns the per-iteration metrics.

  `reward_fn(response_tokens) -> float`, a rule instead of a reward model, and raw token `prompts` serve tests
  and toy tasks; normally the reward model at `config.reward_model` scores, on prompts from `config.data.path`.
  """
  devices = jax.devices() if devices is None else devices
  validate(config, len(devices))
  model_cfg, mesh, tokenizer = stage.continue_from(
    config, workdir, devices, "SFT", validate_training=False, stage_name="rlhf"
  )
  prompts = rollout_prompts(config, tokenizer, model_cfg, prompts)
  rl = rl_config(config, prompts, model_cfg, tokenizer)

  # The policy (+ value), the frozen reference and the frozen reward model.
  value_mode = config.value_init if ALGORITHMS[config.algorithm].critic else "none"
  lora = stage.lora_start(config, model_cfg, mesh)
  factory = lambda rngs: ActorCritic(model_cfg, value_mode, rngs=rngs, lora=lora and lora.lora)
  if lora is None:
    ref_state, ref_params, _ = load_model(config.init_from, mesh)
  else:  # The reference is the frozen base itself, without the adapters: no second copy of the weights.
    ref_state, ref_params = model_spec(lm_factory(model_cfg), mesh), lora.base
  if reward_fn is None:
    rm_state, rm_params, _ = load_reward_model(config.reward_model, mesh)
    special_ids = tuple(sorted(tokenizer.special_ids))

    def reward(params, batch):
      answer_start_B = jnp.full(batch["tokens"].shape[:1], rl.prompt_len, jnp.int32)  # Prompts are left-padded.
      return sequence_scores(rm_state.merge(params), batch["tokens"], batch["segment_ids"], answer_start_B, special_ids)

  else:
    rm_params = None
    reward = lambda params, batch: batch["rule_scores"]

  def initial_params(spec: ModelSpec):
    if lora is not None:
      return lora_initial_params(spec, factory, config.seed, lora.base, value_mode, rm_params)
    value_from_rm = value_mode == "reward_model" and rm_params is not None
    params = init_params(factory, spec, config.seed, skip=("policy", "value") if value_from_rm else ("policy",))
    params["policy"] = jax.tree.map(jnp.copy, ref_params)  # A copy: updates donate their inputs.
    if value_from_rm:
      params["value"] = jax.tree.map(jnp.copy, rm_params)
    return params

  fields = ["tokens", "segment_ids", "response_mask", "old_log_probs", "ref_log_probs", "advantages", "kl_coef"]
  fields += ["returns", "old_values"] if ALGORITHMS[config.algorithm].critic else []
  trainer = loop.Trainer(
    config,
    workdir,
    mesh=mesh,
    model_factory=factory,
    loss_fn=make_loss(rl),
    batch_shardings={k: sharding.batch_sharding(mesh, 1 if k == "kl_coef" else 2) for k in fields},
    meta={
      "stage": "rlhf",
      "algorithm": config.algorithm,
      "model": dataclasses.asdict(model_cfg),
      "init_from": config.init_from,
      **({"lora": lora.record} if lora else {}),
    },
    initial_params=initial_params,
    params_key="policy",
    stage_state={"beta": config.kl_coef},
  )
  iteration = RolloutIteration(
    config,
    rl,
    trainer,
    prompts,
    Sampler(model_spec(lm_factory(model_cfg, lora and lora.lora), mesh).graphdef, None, mesh, model_cfg=model_cfg),
    tokenizer,
    make_scorer(rl, trainer.spec, ref_state, reward),
    ref_params,
    rm_params,
    reward_fn,
    fields,
  )
  trainer.run(iteration, config.iterations, log_every=1, print_every=config.log_every, progress_keys=PROGRESS_KEYS)
  return iteration.history
