"""Pretrain a language model (next-token prediction on packed documents), then print a few samples.

  python experiments/pretrain.py --workdir=/tmp/pretrain [--config=configs/pretrain.py] [--config.steps=...]

With no flags it trains the `tiny` model on the built-in world-facts corpus. See configs/pretrain.py.
"""

import os

from absl import app, flags

from llm_jax import cli, flag_parsing

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "pretrain.py"), "Config file.")
flags.DEFINE_string("workdir", "workdirs/pretrain", "Checkpoints, tokenizer, metrics; rerun to resume.")
flags.DEFINE_multi_string(
  "sample_prompt", ["The capital of China is", "People in France speak"], "Prompts to complete after training."
)
flags.DEFINE_integer("sample_tokens", 48, "Tokens to sample per prompt after training (0: no samples).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from llm_jax.errors import UserError
  from llm_jax.inference.sampler import Sampler, SamplingConfig
  from llm_jax.tokenizer import load_tokenizer
  from llm_jax.train import pretrain

  def run():
    if FLAGS.sample_tokens < 0:
      raise UserError(f"--sample_tokens={FLAGS.sample_tokens} must be >= 0 (0: no samples)")
    result = pretrain.run(FLAGS.config, FLAGS.workdir)
    if FLAGS.sample_tokens:
      sampler = Sampler(result.state.graphdef, result.params, result.mesh)
      sampling = SamplingConfig(max_new_tokens=FLAGS.sample_tokens, temperature=0.8)
      # Illustrative samples: a short-context model (e.g. nanoGPT's 64-token baby) continues as far as it can.
      completions = sampler.complete(
        load_tokenizer(FLAGS.workdir),
        FLAGS.sample_prompt,
        sampling,
        jax.random.key(FLAGS.config.seed),
        allow_context_cut=True,
      )
      for prompt, completion in zip(FLAGS.sample_prompt, completions):
        if jax.process_index() == 0:
          print(f"sample: {prompt}|{completion}", flush=True)

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
