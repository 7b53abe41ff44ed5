"""Pretraining config: next-token prediction on packed documents.

Default (no flags): the `small` model (1.3 M parameters) on the project's built-in world-facts corpus with a
2048-piece SentencePiece tokenizer, 1000 steps of 16 × 128 tokens.

  python experiments/pretrain.py --workdir=/tmp/pretrain
  # ~4 min on a 2-core CPU; eval_loss falls from 7.6 to ~0.7 and the samples state facts:
  # "The capital of China is| Beijing. The country of China is part of Asia. ..."

nanoGPT's shakespeare_char "baby" run (CPU; val loss ≈ 1.88 after 2000 steps in nanoGPT):

  python experiments/pretrain.py --workdir=/tmp/shakespeare_baby \
    --config.model=baby_char --config.data.path=../shared/data/tinyshakespeare.txt \
    --config.seq_len=64 --config.batch_size=12 --config.steps=2000 --config.learning_rate=1e-3 \
    --config.warmup_steps=100 --config.weight_decay=0.1 --config.b2=0.99 --config.eval_every=250

Any model field can be overridden: `--config.model_overrides.num_layers=4`. `batch_size` is global (all
devices and processes). The mesh axes multiply to the device count; -1 fills.
"""

import ml_collections

from llm_jax.config import model_overrides


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "small"  # A preset in llm_jax.model.PRESETS.
  config.model_overrides = model_overrides()

  config.steps = 1000
  config.batch_size = 16
  config.seq_len = 128
  config.grad_accum = 1  # Microbatches per step (batch_size is the total).
  config.learning_rate = 3e-3
  config.warmup_steps = 50
  config.min_lr_ratio = 0.1  # Cosine decay ends at learning_rate * min_lr_ratio.
  config.weight_decay = 0.1
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 1.0  # Global-norm clipping; 0 turns it off.
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # File(s) or glob(s), comma-separated; "" = the built-in corpus.
  config.data.eval_path = ""  # Optional validation file(s); "" = the last eval_fraction of the rows.
  config.data.eval_fraction = 0.05
  config.data.tokenizer = "spm"  # "char" (bytes) or "spm" (SentencePiece BPE trained on the corpus).
  config.data.vocab_size = 2048  # For spm.
  config.data.builtin_seed = 0
  config.data.builtin_documents = 4000
  config.data.num_threads = 1
  config.data.prefetch = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.log_every = 50
  config.eval_every = 250
  config.eval_batches = 8  # 0 = the whole validation split.
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  return config
