"""Reward-model config: Bradley-Terry on ranked pairs, backbone from an SFT workdir.

  python experiments/reward_model.py --config=configs/reward_model.py --workdir=/tmp/rm \
    --config.init_from=/tmp/sft --config.data.path=PAIRS.jsonl

Pairs: JSONL {"prompt": ... or "messages": [...], "chosen": "...", "rejected": "..."}. Evaluation reports the
held-out pairwise accuracy (eval_accuracy) and mean score margin (eval_margin), also at step 0 (chance: 0.5).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # SFT workdir: the backbone and tokenizer.
  config.margin = 0.0  # Optional margin in −log σ(r_chosen − r_rejected − margin).
  # Adds w · (log-prob of the answer's least likely token under the backbone's LM head) to the score, so the
  # reward model can check facts with what the backbone knows (llm_jax/train/reward.py). False: head only.
  config.likelihood_feature = True

  config.steps = 200
  config.batch_size = 16  # Pairs per step.
  config.seq_len = 128  # Longer pairs are dropped (counted).
  config.grad_accum = 1
  config.learning_rate = 3e-4
  config.warmup_steps = 20
  config.min_lr_ratio = 0.1
  config.weight_decay = 0.0
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 1.0
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.path = ""
  config.data.eval_path = ""
  config.data.eval_fraction = 0.1
  config.data.num_threads = 1
  config.data.prefetch = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.log_every = 25
  config.eval_every = 100
  config.eval_batches = 0
  config.checkpoint_every = 100
  config.keep_checkpoints = 3
  return config
