"""Hugging Face checkpoints in and out (Llama 2/3, Mistral, Qwen2/2.5, GPT-2), logit-exact.

Import a checkpoint directory as downloaded (config.json, safetensors, tokenizer files) into a workdir that
generate.py, evaluate.py and every stage's --config.init_from accept:

  python experiments/convert_hf.py --hf_dir=HF_DIR --workdir=OUT [--dtype=float32|bfloat16]

Export a workdir's latest checkpoint (or --checkpoint=W/checkpoints/STEP) for transformers' from_pretrained:

  python experiments/convert_hf.py --workdir=W [--checkpoint=W/checkpoints/STEP] --export_dir=HF_DIR

A LoRA workdir (a stage run with --config.lora.rank > 0) is exported merged: its base workdir's weights plus
the adapters (W + alpha/rank·A·B), a plain model with no adapter tensors.

Anything not converted exactly (another architecture, sliding windows, other RoPE scalings, quantized or
pickled weights) is refused in one line, exit 2. Neither direction overwrites an existing directory.
"""

import os

from absl import app, flags

from llm_jax import cli

flags.DEFINE_string("hf_dir", "", "Import: a Hugging Face checkpoint directory.")
flags.DEFINE_string(
  "workdir", "", "Import: the new workdir to write. Export: the workdir to export (LoRA workdirs: merged weights)."
)
flags.DEFINE_string("dtype", "", "Import: parameter dtype, float32|bfloat16|float16 (default: as stored).")
flags.DEFINE_string("export_dir", "", "Export: the new Hugging Face directory to write.")
flags.DEFINE_string("checkpoint", "", "Export: one checkpoint, WORKDIR/checkpoints/STEP (default: the latest).")
flags.DEFINE_float("max_shard_gb", 5.0, "Export: safetensors files of at most this size (then an index).")
cli.define_mesh_flags("the parameters")
FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    from llm_jax import hf
    from llm_jax.errors import UserError
    from llm_jax.inference.loading import split_checkpoint_path

    if bool(FLAGS.hf_dir) == bool(FLAGS.export_dir):
      raise UserError("give --hf_dir (import) or --export_dir (export), not both or neither")
    mesh = cli.mesh_from_flags()
    if FLAGS.hf_dir:
      cfg = hf.import_checkpoint(FLAGS.hf_dir, FLAGS.workdir, mesh, FLAGS.dtype)
      print(f"imported {FLAGS.hf_dir} → {FLAGS.workdir} ({cfg.num_params():,} parameters, {cfg.param_dtype})")
      return
    workdir, step = FLAGS.workdir, None
    if FLAGS.checkpoint:
      workdir, step = split_checkpoint_path(FLAGS.checkpoint)
      if FLAGS.workdir and os.path.abspath(FLAGS.workdir) != workdir:
        raise UserError(f"--checkpoint={FLAGS.checkpoint} is not in --workdir={FLAGS.workdir}")
    if not workdir:
      raise UserError("export: give --workdir or --checkpoint")
    if FLAGS.max_shard_gb <= 0:
      raise UserError(f"--max_shard_gb={FLAGS.max_shard_gb}: must be positive")
    out = hf.export_checkpoint(workdir, step, FLAGS.export_dir, mesh, int(FLAGS.max_shard_gb * 2**30))
    print(f"exported {workdir} → {out}")

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
