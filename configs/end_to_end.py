"""The end-to-end world-facts experiment (README's main job): pretrain → SFT → reward model → RLHF → chat.

  python experiments/end_to_end.py --workdir=workdirs/end_to_end
  # ~4-8 min on a 2-core CPU. Writes REPORT.md, plots/ and results.json; ends by answering
  # "Where is the capital of China?" with "The capital of China is Beijing."

Each stage's config is the stage's own config file with the overrides below; any field can be changed on the
command line, e.g. --config.pretrain.steps=2000 or --config.rlhf.algorithm=grpo.
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

  config.pretrain = _stage_config("pretrain")  # The `small` model on the built-in corpus, spm 2048.
  config.pretrain.steps = 1200
  config.pretrain.log_every = 100
  config.pretrain.eval_every = 400
  config.pretrain.checkpoint_every = 400

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
