"""Train a reward model (Bradley-Terry on ranked pairs). See configs/reward_model.py for the command and data."""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "reward_model.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/reward_model", "Checkpoints, tokenizer, metrics; rerun to resume.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.train import reward_model

  cli.run(lambda: reward_model.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
