"""SFT config: continue a pretrained model on chats; loss on assistant tokens only.

  python experiments/sft.py --config=configs/sft.py --workdir=/tmp/sft \
    --config.init_from=/tmp/pretrain --config.data.path=CHATS.jsonl

The model and tokenizer come from `init_from` (a pretraining or SFT workdir); the optimizer starts fresh.
Chats: JSONL `{"messages": [{"role": ..., "content": ...}]}` or `{"prompt": ..., "response": ...}` (see
llm_jax/chat.py for the template and the validation rules). Evaluation reports the held-out assistant-token
loss and the exact-match accuracy of greedy answers to held-out chats (logged at step 0 too).

LoRA (README "LoRA"): add --config.lora.rank=16 [--config.lora.alpha=16 --config.lora.targets=all]; only the
adapters train and are saved, the checkpoint names init_from as its base, and every loader merges them.

LORA_MEMORY: llama_7b SFT at batch 32 × 2048 on a v5p:2x2x1 slice (4 chips, fsdp=4, remat=full, scan, bf16
compute / f32 params), measured with the ahead-of-time compiler (XLA's per-chip peak, v5p HBM 95 GiB):

  python experiments/aot_compile.py --config.model=llama_7b --topology=v5p:2x2x1 --config.mesh.data=1 \
    --config.mesh.fsdp=-1 --config.batch_size=32 --config.seq_len=2048 --decode=false [--lora_rank=16]
  # ~7 min of compiling each on a 2-core CPU (pip install -e ".[tpu]" for libtpu)

  LoRA rank 16, all 7 projections (39.98 M trained):  26.78 GiB per chip (args 6.60, temp 20.18)  fits (28 %)
  full fine-tuning (6.74 B trained):                  51.35 GiB per chip (args 18.83, temp 32.52) fits (54 %)
  LoRA saves 24.6 GiB per chip: the f32 AdamW moments and gradients of the base (the arguments drop from 18.83
  to 6.60 GiB: params alone) and their update's temporaries.
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # Workdir whose latest checkpoint (and tokenizer, model) SFT starts from.

  config.batch_size = 16
  config.seq_len = 128
  common.add_optimizer(config, steps=300, learning_rate=1e-3, warmup_steps=20, steps_per_call=5)

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
