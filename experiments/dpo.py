"""Direct preference optimisation (DPO, IPO, hinge, SimPO) of an SFT model. See configs/dpo.py for the command."""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "dpo.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/dpo", "Checkpoints, tokenizer, metrics, reference log-probs; rerun to resume.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.train import dpo

  cli.run(lambda: dpo.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
