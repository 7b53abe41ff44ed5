"""Inspect how a checkpoint goes from a prompt to each next token: tokens, each step's top choices, attention at the
key step, the logit lens. Writes OUTPUT/INSPECT.md, OUTPUT/inspect.json and PNG figures; prints a compact view.

  python experiments/inspect.py --workdir=DIR --prompt="Where is the capital of China?" --chat \
    --temperature=0 --output=DIR/inspect [--checkpoint=STEP] [--max_new_tokens=64] [--top_k_shown=5] [--step=N]

Flags and defaults are generate.py's (the same flags pick the same tokens): `--temperature=0` is greedy, `--chat`
sends the prompt as a user turn. `--checkpoint` is a step of --workdir, or WORKDIR/checkpoints/STEP alone.
`--step=N` inspects answer step N instead of the key step (llm_jax/inference/inspection.py says which that is).
Runtime: seconds for the project's models (one generation and one forward pass).
"""

# This file's name is also the standard library's `inspect`, and a script's folder comes first on the import path:
# every `import inspect` made while a tool of experiments/ runs (jax, flax, absl and dataclasses all make one) finds
# this file. Imported under any name but __main__ it therefore loads the real standard-library module, puts it in
# sys.modules["inspect"] (which the `import` statement then returns) and re-exports it; only as __main__ is it the tool.
import sys

if __name__ != "__main__":  # `import inspect` from experiments/: be the standard library's module.
  import importlib.util
  import os
  import sysconfig

  def _stdlib_inspect():
    loaded = sys.modules.get("inspect")
    if loaded is not None and loaded is not sys.modules.get(__name__):  # Already the real one (we are not it).
      return loaded
    path = os.path.join(sysconfig.get_paths()["stdlib"], "inspect.py")
    spec = importlib.util.spec_from_file_location("inspect", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["inspect"] = module  # Before running it, as the import system does (cycles find the real one).
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules["inspect"]
      raise
    return module

  globals().update({k: v for k, v in vars(_stdlib_inspect()).items() if not k.startswith("__") or k == "__all__"})
else:  # `python experiments/inspect.py ...`: the tool.
  import os

  from absl import app, flags

  from llm_jax import cli

  flags.DEFINE_string("workdir", "", "A training workdir of any stage (its latest checkpoint unless --checkpoint).")
  flags.DEFINE_string("checkpoint", "", "A step of --workdir, or one checkpoint: WORKDIR/checkpoints/STEP.")
  flags.DEFINE_string("prompt", "", "The prompt.")
  flags.DEFINE_bool("chat", False, "Send the prompt as a user turn in the chat template (SFT/RLHF models).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (at most).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = off.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
  flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same tokens as generate.py's.")
  flags.DEFINE_integer("top_k_shown", 5, "Alternatives shown per step.")
  flags.DEFINE_integer("step", -1, "The answer step whose attention and logit lens are shown; -1 = the key step.")
  flags.DEFINE_string("output", "", "Directory for INSPECT.md, inspect.json and the figures.")
  cli.define_mesh_flags()
  FLAGS = flags.FLAGS

  def main(argv):
    del argv

    def run():
      import jax

      from llm_jax.errors import UserError
      from llm_jax.inference import inspection
      from llm_jax.inference.loading import resolve, split_checkpoint_path
      from llm_jax.inference.sampler import SamplingConfig

      if not FLAGS.output:
        raise UserError("--output is required (a directory)")
      if os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
        raise UserError(f"--output={FLAGS.output} exists and is not a directory")
      if not FLAGS.prompt.strip():
        raise UserError("--prompt is empty")
      if FLAGS.top_k_shown < 1:
        raise UserError(f"--top_k_shown={FLAGS.top_k_shown} must be >= 1")
      if FLAGS.step < -1:
        raise UserError(f"--step={FLAGS.step} must be >= 0 (or -1: the key step)")
      if FLAGS.workdir and FLAGS.checkpoint.isdigit():
        workdir, step = FLAGS.workdir, int(FLAGS.checkpoint)
      elif FLAGS.workdir and FLAGS.checkpoint:
        workdir, step = split_checkpoint_path(FLAGS.checkpoint)
        if os.path.realpath(workdir) != os.path.realpath(FLAGS.workdir):
          raise UserError(f"--checkpoint={FLAGS.checkpoint} is not a checkpoint of --workdir={FLAGS.workdir}")
      else:
        workdir, step = resolve(FLAGS.workdir, FLAGS.checkpoint)
      sampling = SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p
      )
      sampling.validate()
      result = inspection.inspect_workdir(
        workdir,
        cli.mesh_from_flags(),
        step,
        prompt=FLAGS.prompt,
        chat=FLAGS.chat,
        sampling=sampling,
        key=jax.random.key(FLAGS.seed),
        top_k_shown=FLAGS.top_k_shown,
        step=None if FLAGS.step == -1 else FLAGS.step,
      )
      paths = inspection.write(result, FLAGS.output)
      print(inspection.text_view(result))
      print(f"\nwrote {paths[0]}, {paths[1]} and {len(paths) - 2} figures", flush=True)

    cli.run(run)

  app.run(main, flags_parser=cli.parse_flags)
