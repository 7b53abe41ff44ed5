"""PPO vs GRPO vs RLOO vs DPO from the end-to-end experiment's SFT model, judged by the gold rule, and reward
over-optimisation: python experiments/alignment_study.py --workdir=DIR

See configs/alignment_study.py for what runs, its runtime and the expected result.
"""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "alignment_study.py"), "Config file.")
flags.DEFINE_string(
  "workdir", "workdirs/end_to_end", "The end-to-end experiment's workdir (its stages are reused or run there)."
)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.tasks.world_facts import alignment_study

  cli.run(lambda: alignment_study.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
