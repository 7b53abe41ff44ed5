"""DPO config: offline preference optimisation of an SFT model on ranked pairs (llm_jax/train/dpo.py).

  python experiments/dpo.py --config=configs/dpo.py --workdir=/tmp/dpo \
    --config.init_from=/tmp/sft --config.data.path=PAIRS.jsonl \
    [--config.loss=sigmoid|ipo|hinge|simpo] [--config.beta=0.1] [--config.label_smoothing=0]

Pairs: JSONL {"prompt": ... or "messages": [...], "chosen": "...", "rejected": "..."}, as for the reward model.
The reference log-probs (the init_from model's) are computed once into WORKDIR/reference_log_probs.npz; a rerun
resumes and reuses them. Evaluation reports the held-out preference accuracy (eval_accuracy, 0.5 at step 0),
implicit rewards, their margin and the KL proxy, also at step 0 (where the sigmoid loss is log 2).

LoRA (README "LoRA"): add --config.lora.rank=16 [--config.lora.alpha=16 --config.lora.targets=all], any loss;
only the adapters train and are saved, the checkpoint names init_from as its base (which is also the reference
model), and every loader (generate, export, later stages) merges them.

Expected (measured on the end-to-end experiment's pairs from its SFT model, as the alignment study runs it:
--config.steps=100 --config.learning_rate=5e-5 --config.warmup_steps=10, seed 0): held-out preference accuracy
0.50 → 0.80 (step 50) → 0.82 (step 100), eval loss 0.693 → 0.502, about 2 min on 2 busy CPU cores. Both answers
lose likelihood (held-out log π(chosen) −2.66 → −4.30 nats) and greedy answers get worse: README "Alignment study".
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # SFT workdir: the policy's start, the reference model and the tokenizer.
  config.loss = "sigmoid"  # sigmoid (DPO), ipo, hinge (SLiC) or simpo (no reference model).
  config.beta = 0.1  # DPO's β (IPO's τ). SimPO's paper uses β ≈ 2 with simpo_gamma ≈ 1.
  config.label_smoothing = 0.0  # ε of conservative DPO / SimPO (the probability a label is flipped); < 0.5.
  config.simpo_gamma = 0.5  # SimPO's target margin γ (TRL's default); simpo only.

  config.batch_size = 16  # Pairs per step.
  config.seq_len = 128  # Longer pairs are dropped (counted).
  common.add_optimizer(config, steps=200, learning_rate=1e-4, warmup_steps=20, steps_per_call=5)

  config.data = ml_collections.ConfigDict()
  config.data.path = ""
  config.data.eval_path = ""  # Optional held-out pairs; "" = a seeded eval_fraction of data.path.
  config.data.eval_fraction = 0.1
  common.add_data_loading(config.data)
  common.add_mesh(config)
  common.add_lora(config)  # --config.lora.rank=16: train LoRA adapters only (0: full fine-tuning).
  common.add_cadence(config, log_every=25, eval_every=50, eval_batches=0, checkpoint_every=100)
  return config
