"""The seed's story on a 2-core CPU, one command: python experiments/end_to_end.py --workdir=DIR

See configs/end_to_end.py for what each stage does, its runtime and the expected result.
"""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "end_to_end.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/end_to_end", "One sub-workdir per stage; rerun to resume.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax.tasks.world_facts import end_to_end

  cli.run(lambda: end_to_end.run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
