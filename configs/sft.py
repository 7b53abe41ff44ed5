"""SFT config: continue a pretrained model on chats; loss on assistant tokens only.

  python experiments/sft.py --config=configs/sft.py --workdir=/tmp/sft \
    --config.init_from=/tmp/pretrain --config.data.path=CHATS.jsonl

The model and tokenizer come from `init_from` (a pretraining or SFT workdir); the optimizer starts fresh.
Chats: JSONL `{"messages": [{"role": ..., "content": ...}]}` or `{"prompt": ..., "response": ...}` (see
llm_jax/chat.py for the template and the validation rules). Evaluation reports the held-out assistant-token
loss and the exact-match accuracy of greedy answers to held-out chats (logged at step 0 too).
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # Workdir whose latest checkpoint (and tokenizer, model) SFT starts from.

  config.batch_size = 16
  config.seq_len = 128
  common.add_optimizer(config, steps=300, learning_rate=1e-3, warmup_steps=20)

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # JSONL chats.
  config.data.eval_path = ""  # Optional held-out chats; "" = a seeded eval_fraction of data.path.
  config.data.eval_fraction = 0.1
  config.data.overlong = "truncate"  # Chats longer than seq_len + 1 tokens: "truncate" or "drop" (counted).
  config.data.on_error = "raise"  # Malformed lines: "raise" (file:line) or "skip" (counted).
  common.add_data_loading(config.data)
  common.add_mesh(config)
  common.add_lora(config)  # --config.lora.rank=16: train LoRA adapters only (0: full fine-tuning).
  common.add_cadence(config, log_every=25, eval_every=100, eval_batches=8, checkpoint_every=100)
  common.add_harness_eval(config)
  config.exact_match_examples = 64  # Held-out chats answered greedily at each evaluation (0 = all).
  config.max_answer_tokens = 48
  return config
