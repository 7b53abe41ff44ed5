"""Supervised fine-tuning on chats (loss on assistant tokens only), starting from a pretrained workdir.

  python experiments/sft.py --config=configs/sft.py --workdir=DIR --config.init_from=PRETRAIN_WORKDIR \
    --config.data.path=CHATS.jsonl

Then: python experiments/generate.py --workdir=DIR --chat --prompt="Where is the capital of China?"
"""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "sft.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/sft", "Checkpoints, tokenizer, metrics; rerun to resume.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.train import sft

  cli.run(lambda: sft.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
