"""RLHF config: PPO (or GRPO / RLOO) of an SFT policy against a reward model, KL-penalized to the SFT model.

  python experiments/rlhf.py --config=configs/rlhf.py --workdir=/tmp/rl --config.init_from=/tmp/sft \
    --config.reward_model=/tmp/rm --config.data.path=PROMPTS.jsonl --config.algorithm=ppo

Prompts: JSONL {"prompt": "..."} or {"messages": [...]} (ending with a user turn). Rollouts are answers in the
chat template sampled from the policy at `temperature` (role tokens never sampled); log-probs, ratios and the
KL are computed under that same distribution.
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # SFT workdir: the initial policy and the frozen reference.
  config.reward_model = ""  # Reward-model workdir (frozen scorer; PPO's value model starts from it).
  config.algorithm = "ppo"  # "ppo", "grpo" or "rloo".
  config.value_init = "reward_model"  # PPO value function: "reward_model" (separate network) or "policy_head".

  config.iterations = 50
  config.prompts_per_iteration = 16
  config.group_size = 4  # Samples per prompt for GRPO/RLOO.
  config.max_new_tokens = 32
  config.temperature = 1.0  # > 0; log-probs, ratios and KL use the same temperature.
  config.ppo_epochs = 2
  config.minibatch_size = 8
  config.gamma = 1.0
  config.lam = 0.95
  config.clip = 0.2
  config.value_clip = 0.2
  config.value_coef = 0.5
  config.kl_coef = 0.05  # β; adapted toward target_kl when target_kl > 0.
  # Where the KL penalty goes: "reward" (−β·kl per token, PPO/RLOO's default) or "loss" (+β·kl as its own
  # term, GRPO's default); "auto" picks per algorithm. Estimator: "k1", "k2", "k3" ("auto": k1 in the reward,
  # k3 in the loss).
  config.kl_in = "auto"
  config.kl_estimator = "auto"
  # Subtracted from the score of answers cut off by max_new_tokens (no <|end|>): the reward model never saw
  # an unfinished answer, so its score there means nothing (TRL's missing_eos_penalty).
  config.missing_eos_penalty = 1.0
  config.target_kl = 0.0  # Per-sequence KL target of the adaptive controller (0 = fixed β).
  config.kl_horizon = 10_000
  config.whiten_rewards = False
  config.reward_clip = 0.0  # Clip reward-model scores to ±reward_clip (0 = off).

  # Optimizer (read by the shared train step): `steps` is the schedule's length in updates (a constant rate
  # here); grad_accum splits each minibatch update into microbatches.
  common.add_optimizer(config, steps=10_000, learning_rate=1e-5, warmup_steps=0, min_lr_ratio=1.0)

  config.data = ml_collections.ConfigDict()
  config.data.path = ""

  common.add_mesh(config)
  common.add_lora(config)  # --config.lora.rank=16: train LoRA adapters only (0: full fine-tuning).
  common.add_cadence(config, log_every=1, checkpoint_every=25, keep_checkpoints=2)  # In iterations.
  return config
