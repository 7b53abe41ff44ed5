"""The end-to-end world-facts experiment (README's main job): pretrain → SFT → reward model → RLHF → chat.

  python experiments/end_to_end.py --workdir=workdirs/end_to_end
  # ~6 min on a 2-core CPU (4 of them pretraining). Writes REPORT.md, plots/ and results.json; ends by
  # answering "Where is the capital of China?" with "The capital of China is Beijing."

Expected (measured 2026-12-06, seed 0): held-out-country QA base 2 % → SFT 90 % → RLHF 94 %; reward model 99 % on
held-out pairs (90 % on pairs about held-out countries); RLHF vs SFT gold win-rate 73 % on held-out prompts and
70 % on held-out countries (sampled answers, ties ½) at a KL of 0.65 nats per answer. Float32 rounding differences
(a change of fusion, of XLA version or of CPU) grow over the run into another draw of the same recipe: 2026-12-04
gave 2 → 89 → 87 %, 97 / 90 %, 71 / 67 %, KL 0.69; 2026-11-29 gave 0 → 90 → 94 %, 96 / 92 %, 71 / 69 %, KL 0.65.

Each stage's config is the stage's own config file with the overrides below; any field can be changed on the
command line, e.g. --config.pretrain.steps=1200 (about 4.5 min; held-out countries then fare worse, see below) or
--config.rlhf.algorithm=grpo.
"""

import importlib.util
import os

import ml_collections


def _stage_config(name: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"llm_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict()  # The generated datasets (llm_jax/tasks/world_facts/data.py).
  config.data.sft_per_country = 4
  # Imperfect demonstrations: half the SFT answers are curt ("Beijing."), which SFT imitates and the ranked
  # pairs rank below the complete sentence; this is what RLHF has to fix.
  config.data.curt_fraction = 0.5
  config.data.pairs_per_country = 10

  config.pretrain = _stage_config("pretrain")  # The `small` model on the built-in corpus, spm 2048.
  # 3000 steps (28 epochs of the corpus): facts about the held-out countries become sharp enough to be sampled
  # right at temperature 1. At 1200 steps, RLHF's win-rate on held-out countries is 61 % instead of 68 %.
  config.pretrain.steps = 3000
  config.pretrain.log_every = 100
  config.pretrain.eval_every = 1000
  config.pretrain.checkpoint_every = 1000

  config.sft = _stage_config("sft")
  config.sft.steps = 60  # Longer SFT forgets held-out facts (held-out exact match peaks near 50-60 steps).
  config.sft.eval_every = 20
  config.sft.log_every = 25
  config.sft.exact_match_examples = 0

  config.reward_model = _stage_config("reward_model")
  config.reward_model.steps = 150
  config.reward_model.batch_size = 16
  config.reward_model.learning_rate = 3e-4
  config.reward_model.eval_every = 50

  config.rlhf = _stage_config("rlhf")
  config.rlhf.algorithm = "ppo"
  config.rlhf.iterations = 30
  config.rlhf.prompts_per_iteration = 32
  config.rlhf.minibatch_size = 16
  config.rlhf.ppo_epochs = 2
  config.rlhf.learning_rate = 5e-5
  config.rlhf.kl_coef = 0.1
  config.rlhf.max_new_tokens = 24
  config.rlhf.log_every = 5
  return config
