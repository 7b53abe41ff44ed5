"""Pretrain a language model (next-token prediction on packed documents), then print a few samples.

  python experiments/pretrain.py --workdir=/tmp/pretrain [--config=configs/pretrain.py] [--config.steps=...]

With no flags it trains the `tiny` model on the built-in world-facts corpus. See configs/pretrain.py.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from llm_jax import cli

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "pretrain.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/pretrain", "Checkpoints, tokenizer, metrics; rerun to resume.")
flags.DEFINE_multi_string("sample_prompt", ["The capital of China is", "People in France speak"],
                          "Prompts to complete after training.")
flags.DEFINE_integer("sample_tokens", 48, "Tokens to sample per prompt after training (0: no samples).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.train import pretrain
  from llm_jax import sampling

  def run():
    result = pretrain.run(FLAGS.config, FLAGS.workdir)
    if FLAGS.sample_tokens:
      sampling.print_samples(FLAGS.workdir, result, FLAGS.sample_prompt, FLAGS.sample_tokens)
  cli.run(run)


if __name__ == "__main__":
  app.run(main)
