"""SFT config: continue a pretrained model on chats; loss on assistant tokens only.

  python experiments/sft.py --config=configs/sft.py --workdir=/tmp/sft \
    --config.init_from=/tmp/pretrain --config.data.path=CHATS.jsonl

The model and tokenizer come from `init_from` (a pretraining or SFT workdir); the optimizer starts fresh.
Chats: JSONL `{"messages": [{"role": ..., "content": ...}]}` or `{"prompt": ..., "response": ...}` (see
llm_jax/chat.py for the template and the validation rules). Evaluation reports the held-out assistant-token
loss and the exact-match accuracy of greedy answers to held-out chats (logged at step 0 too).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # Workdir whose latest checkpoint (and tokenizer, model) SFT starts from.

  config.steps = 300
  config.batch_size = 16
  config.seq_len = 128
  config.grad_accum = 1
  config.learning_rate = 1e-3
  config.warmup_steps = 20
  config.min_lr_ratio = 0.1
  config.weight_decay = 0.0
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 1.0
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # JSONL chats.
  config.data.eval_path = ""  # Optional held-out chats; "" = a seeded eval_fraction of data.path.
  config.data.eval_fraction = 0.1
  config.data.overlong = "truncate"  # Chats longer than seq_len + 1 tokens: "truncate" or "drop" (counted).
  config.data.on_error = "raise"  # Malformed lines: "raise" (file:line) or "skip" (counted).
  config.data.num_threads = 1
  config.data.prefetch = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.log_every = 25
  config.eval_every = 100
  config.eval_batches = 8
  config.exact_match_examples = 64  # Held-out chats answered greedily at each evaluation (0 = all).
  config.max_answer_tokens = 48
  config.checkpoint_every = 100
  config.keep_checkpoints = 3
  return config
