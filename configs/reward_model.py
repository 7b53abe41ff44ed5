"""Reward-model config: Bradley-Terry on ranked pairs, backbone from an SFT workdir.

  python experiments/reward_model.py --config=configs/reward_model.py --workdir=/tmp/rm \
    --config.init_from=/tmp/sft --config.data.path=PAIRS.jsonl

Pairs: JSONL {"prompt": ... or "messages": [...], "chosen": "...", "rejected": "..."}. Evaluation reports the
held-out pairwise accuracy (eval_accuracy) and mean score margin (eval_margin), also at step 0 (chance: 0.5).
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # SFT workdir: the backbone and tokenizer.
  config.margin = 0.0  # Optional margin in −log σ(r_chosen − r_rejected − margin).
  # Adds w · (log-prob of the answer's least likely token under the backbone's LM head) to the score, so the
  # reward model can check facts with what the backbone knows (llm_jax/train/reward_model.py). False: head only.
  config.likelihood_feature = True

  config.batch_size = 16  # Pairs per step.
  config.seq_len = 128  # Longer pairs are dropped (counted).
  common.add_optimizer(config, steps=200, learning_rate=3e-4, warmup_steps=20, steps_per_call=5)

  config.data = ml_collections.ConfigDict()
  config.data.path = ""
  config.data.eval_path = ""
  config.data.eval_fraction = 0.1
  common.add_data_loading(config.data)
  common.add_mesh(config)
  common.add_lora(config)  # --config.lora.rank=16: train LoRA adapters only (0: full fine-tuning).
  common.add_cadence(config, log_every=25, eval_every=100, eval_batches=0, checkpoint_every=100)
  return config
