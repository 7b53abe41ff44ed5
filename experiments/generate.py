"""Generate text from a trained model with KV-cache decoding (greedy or sampled).

  python experiments/generate.py --workdir=DIR --prompt="The capital of France is" [--prompt=...] \
    --max_new_tokens=64 --temperature=1.0 --top_k=0 --top_p=1.0 --seed=0

`--chat` sends each prompt as a user turn in the chat template (SFT/RLHF models). `--temperature=0` is
greedy; `--top_k=0` and `--top_p=1` are off. A single prompt streams its tokens as they
are produced. `--checkpoint=DIR/checkpoints/STEP` picks one checkpoint instead of the latest.
"""

import sys

from absl import app, flags

from llm_jax import cli

flags.DEFINE_string("workdir", "", "A training workdir (its latest checkpoint is used).")
flags.DEFINE_string("checkpoint", "", "One checkpoint: WORKDIR/checkpoints/STEP.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompt_file", "", "A file with one prompt per line.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (at most).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same tokens.")
flags.DEFINE_bool("chat", False, "Send each prompt as a user turn in the chat template (SFT/RLHF models).")
cli.define_mesh_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    import jax

    from llm_jax import chat as chat_lib
    from llm_jax.errors import UserError
    from llm_jax.inference.loading import load_sampler, resolve
    from llm_jax.inference.sampler import SamplingConfig

    workdir, step = resolve(FLAGS.workdir, FLAGS.checkpoint)
    prompts = list(FLAGS.prompt)
    if FLAGS.prompt_file:
      try:
        with open(FLAGS.prompt_file, encoding="utf-8") as f:
          prompts += [line.rstrip("\n") for line in f if line.strip()]
      except OSError as e:
        raise UserError(f"--prompt_file={FLAGS.prompt_file}: {e.strerror}") from None
      except UnicodeDecodeError as e:
        raise UserError(f"--prompt_file={FLAGS.prompt_file}: not UTF-8 text ({e.reason})") from None
    if not prompts:
      raise UserError("no prompt: give --prompt or --prompt_file")
    for i, prompt in enumerate(prompts):
      if not prompt.strip():
        raise UserError(f"prompt {i} is empty")
    mesh = cli.mesh_from_flags(decodes=True)
    sampler, tokenizer, meta = load_sampler(workdir, mesh, step)
    if FLAGS.chat:
      chat_lib.check_chat_format(tokenizer)  # One line before anything is printed.
    sampling = SamplingConfig(
      max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p
    )
    key = jax.random.key(FLAGS.seed)
    if len(prompts) == 1:  # Stream the answer as it is produced.
      sys.stdout.write(prompts[0] + ("\n" if FLAGS.chat else ""))
      sampler.complete(
        tokenizer, prompts, sampling, key, chat=FLAGS.chat, stream=lambda text: print(text, end="", flush=True)
      )
      print()
    else:
      completions = sampler.complete(tokenizer, prompts, sampling, key, chat=FLAGS.chat)
      for prompt, completion in zip(prompts, completions):
        print(prompt + ("\n" if FLAGS.chat else "") + completion, flush=True)

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
