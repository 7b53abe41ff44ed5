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

nanoGPT's full shakespeare_char model on a CPU: add --config.grad_accum=8 at batch 64 (2,048-token microbatches stay
in cache: 1.5x the throughput of one 16k-token batch and a fifth of the memory, for the same update):

  python experiments/pretrain.py --workdir=/tmp/shakespeare --config.model=gpt2_char \
    --config.data.path=../shared/data/tinyshakespeare.txt --config.data.tokenizer=char --config.seq_len=256 \
    --config.batch_size=64 --config.grad_accum=8 --config.steps=5000 --config.learning_rate=1e-3 --config.b2=0.99

Prepared data (tokenized and packed once into ArrayRecord shards; README "Pretraining data at scale"):

  python experiments/prepare_data.py --input=../shared/data/tinyshakespeare.txt --output=/tmp/shakespeare_prepared \
    --tokenizer=char --seq_len=64 --num_shards=4
  python experiments/pretrain.py --workdir=/tmp/shakespeare_prepared_run --config.model=baby_char \
    --config.data.path=/tmp/shakespeare_prepared --config.seq_len=64 ...   # the baby flags above
  # The same rows in the same order as data.path=../shared/data/tinyshakespeare.txt with data.tokenizer=char:
  # the same losses (tests/test_prepared_data.py checks this bit for bit). data.mixture='DIR:W,DIR:W' mixes.

Any model field can be overridden: `--config.model_overrides.num_layers=4`. `batch_size` is global (all
devices and processes). The mesh axes multiply to the device count; -1 fills.

What fits a TPU pod, measured with the ahead-of-time compiler on a CPU box (BUILD.md; peak = XLA's per-chip
arguments + outputs − donated + temporaries, v5p HBM 95 GiB; sequence length 2048, AdamW with f32 params and
moments, bf16 compute):

  python experiments/aot_compile.py --config.model=llama_7b --topology=v5p:4x4x4 --config.seq_len=2048 \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 --config.batch_size=256

  llama_7b (6.74 B) on v5p-128 (v5p:4x4x4, 64 chips), remat=full, scan_layers=True (the preset), with the
  activations pinned to the batch axes (model.batch_sharded):
    batch 256, fsdp=64, grad_accum=1 (4 rows/chip)             10.8 GiB  fits   <- use this
    2 layers only, batch 64                                      2.1 GiB  fits
  Before the activations were pinned (XLA computed the LM head on the whole global batch on every chip:
  [64, 2048, 32000] bf16 logits per chip), the same settings needed 98.2 GiB (does not fit) and 31.7 GiB; the
  other measurements of that version:
    batch 256, fsdp=64, grad_accum=4                            34.2 GiB  fits
    batch 128, fsdp=16 × tensor=4, grad_accum=1                18.8 GiB  fits
    batch  64, fsdp=64, remat=dots                             199.6 GiB  does not fit
    batch 256, fsdp=64, scan_layers=False                     1095.7 GiB  does not fit
  Decoding 256 prompts × (1024 + 1024 new) on the same mesh: prefill 18.5 GiB, decode loop 8.7 GiB (measured
  with scan_layers=False, before decoding scanned models was fixed).

  70B class (measured before the activations were pinned; Llama-2-70B shape: --config.model=llama_7b
  --config.model_overrides.num_layers=80
  --config.model_overrides.d_model=8192 --config.model_overrides.num_heads=64 --config.model_overrides.num_kv_heads=8
  --config.model_overrides.d_ff=28672; 69 B parameters), remat=full, scan:
    v5p-256 (v5p:4x4x8, 128 chips), fsdp=32 × tensor=4, batch 128             45.3 GiB  fits
    v5p-256, fsdp=32 × tensor=4, batch 256, grad_accum=2                       49.3 GiB  fits
    v5p-512 (v5p:8x8x4, 256 chips), fsdp=64 × tensor=4, batch 256             61.7 GiB  fits
    v5p-512, fsdp=64 × tensor=4, batch 256, grad_accum=4                       21.6 GiB  fits
  (f32 params + AdamW moments alone are 12 bytes × 69 B = 828 GB: 6.0 GiB per chip on 128 chips.)

Long context: llama_7b (remat=full, scan, bf16 compute, AdamW f32) on v5p-128 (v5p:4x4x4: 64 chips, 16 hosts of
4), train step only (--decode=false), per-chip peak by the ahead-of-time compiler. attention_impl=splash is what
`auto` picks for a TPU topology (llm_jax/attention_kernels.py); xla is the written-out attention. mesh.sequence
splits each row's tokens (context parallelism: keys/values all-gathered). Each host feeds whole rows, so
data*fsdp is a multiple of 16 and sequence*tensor <= 4. Compile times are on this shared 2-core box.

  python experiments/aot_compile.py --config.model=llama_7b --topology=v5p:4x4x4 --decode=false \
    --config.seq_len=131072 --config.model_overrides.max_seq_len=131072 --config.batch_size=16 \
    --config.mesh.data=1 --config.mesh.fsdp=16 --config.mesh.sequence=4 --config.mesh.tensor=1 \
    --config.model_overrides.attention_impl=splash

  seq    rows  mesh                         tokens/chip  attention   peak/chip   fits   compile
  8k     64    fsdp 64                         8,192     splash        7.96 GiB  yes    1386 s
  8k     64    fsdp 64                         8,192     xla          20.13 GiB  yes      80 s
  32k    16    fsdp 16 × sequence 4            8,192     splash       15.37 GiB  yes     578 s
  32k    16    fsdp 16 × sequence 4            8,192     xla          64.42 GiB  yes     234 s
  32k    16    fsdp 16 × tensor 4              8,192     splash       23.16 GiB  yes      44 s
  32k    16    fsdp 16 × tensor 4              8,192     xla          75.71 GiB  yes     312 s
  128k   16    fsdp 16 × sequence 4           32,768     splash       35.67 GiB  yes     871 s
  128k   16    fsdp 16 × sequence 4           32,768     xla         802.02 GiB  no       5 s (refused)
  (Compile times: the 80 s and 44 s rows ran on a quiet box, the others beside other jobs.)
  The largest sequence that fits at a global batch of >= 64 × 8k tokens: 128k (16 rows × 128k = 2 M tokens/step),
  with splash and sequence=4, at 38 % of HBM. The written-out attention's f32 scores [rows, heads, L/sequence, L]
  per layer dominate without the kernel: 32 GiB per chip at 32k, 512 GiB at 128k.
  FLOPs per step (aot_compile.py prints them): model estimate (6·N + 12·layers·heads·head_dim·seq per token)
  2.8e16 at 8k × 64, 4.82e16 at 32k × 16, 5.17e17 at 128k × 16 -> expected step time at 40 % / 50 % MFU
  (459 TFLOP/s bf16 per chip × 64): 2.38 / 1.9 s, 4.1 / 3.28 s, 44 / 35.2 s. XLA's own count is no MFU basis: it
  counts the scanned layer body once and nothing inside Pallas kernels.
"""

import ml_collections

from llm_jax import config as common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "small"  # A preset in llm_jax.model.PRESETS.
  config.model_overrides = common.model_overrides()

  config.batch_size = 16  # Global (all devices and processes); grad_accum microbatches make it up.
  config.seq_len = 128
  # 50 updates per jitted call (a divisor of the cadence below): a small model's step is tens of milliseconds, of
  # which per-call dispatch and host round trips are a large share (experiments/bench_nanogpt.py measures it).
  # Big models gain nothing from it and a preemption signal is acted on between calls: use 1 there.
  common.add_optimizer(config, steps=1000, learning_rate=3e-3, warmup_steps=50, weight_decay=0.1, steps_per_call=50)

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # File(s) or glob(s), comma-separated; a prepared directory; "" = the built-in corpus.
  # Prepared directories with weights, "DIR:W,DIR:W" (experiments/prepare_data.py); overrides data.path.
  config.data.mixture = ""
  config.data.eval_path = ""  # Optional validation file(s); "" = the last eval_fraction of the rows.
  config.data.eval_fraction = 0.05
  config.data.tokenizer = "spm"  # "char" (bytes) or "spm" (SentencePiece BPE trained on the corpus).
  config.data.vocab_size = 2048  # For spm.
  config.data.builtin_seed = 0
  config.data.builtin_documents = 4000
  common.add_data_loading(config.data)
  common.add_mesh(config)
  common.add_cadence(config, log_every=50, eval_every=250, eval_batches=8, checkpoint_every=250)
  common.add_harness_eval(config)
  return config
