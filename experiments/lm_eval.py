"""Evaluate a checkpoint on lm-evaluation-harness tasks, in-process, with the project's sharded model class.

  python experiments/lm_eval.py --workdir=W [--checkpoint=W/checkpoints/STEP] --tasks=T1,T2 [--include_path=DIR] \
    [--num_fewshot=N] [--limit=N] [--batch_size=N] [--apply_chat_template] --output_path=DIR [--log_samples]

Writes what the `lm_eval` command writes with --output_path (and --log_samples): DIR/<model>/results_<time>.json
and DIR/<model>/samples_<task>_<time>.jsonl, through lm-eval's EvaluationTracker. Needs the `eval` extra
(`pip install -e ".[eval]"`). The repo's world-facts tasks (llm_jax/tasks/world_facts/harness/) are always found.
"""

import os
import sys

# This file is named like the package it runs: keep its own directory off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from absl import app, flags  # noqa: E402

from llm_jax import cli  # noqa: E402

flags.DEFINE_string("workdir", "", "A language-model workdir (its latest checkpoint is used).")
flags.DEFINE_string("checkpoint", "", "One checkpoint: WORKDIR/checkpoints/STEP.")
flags.DEFINE_string("tasks", "", "Comma-separated lm-eval task (or group) names.")
flags.DEFINE_string("include_path", "", "A directory of extra task YAML.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each task's own).")
flags.DEFINE_float("limit", None, "Examples per task (a number < 1: a fraction of each task).")
flags.DEFINE_integer("batch_size", 16, "Rows per scoring or decoding batch (rounded up to the mesh's batch shards).")
flags.DEFINE_integer("max_gen_toks", 256, "Default generation budget of tasks that do not set max_gen_toks.")
flags.DEFINE_bool("apply_chat_template", False, "Render prompts with the model's chat template (HF models).")
flags.DEFINE_string("output_path", "", "Directory for results JSON (and samples JSONL).")
flags.DEFINE_bool("log_samples", False, "Also write every sample's prompt, responses and metrics.")
flags.DEFINE_integer("seed", 0, "Seed for few-shot sampling and sampled generation.")
flags.DEFINE_integer("bootstrap_iters", 100000, "Bootstrap iterations for standard errors (the lm_eval default).")
cli.define_mesh_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    from llm_jax import evaluation_harness

    evaluation_harness.evaluate_checkpoint(
      workdir=FLAGS.workdir,
      checkpoint=FLAGS.checkpoint,
      tasks=FLAGS.tasks,
      include_path=FLAGS.include_path,
      num_fewshot=FLAGS.num_fewshot,
      limit=FLAGS.limit,
      batch_size=FLAGS.batch_size,
      max_gen_toks=FLAGS.max_gen_toks,
      apply_chat_template=FLAGS.apply_chat_template,
      output_path=FLAGS.output_path,
      log_samples=FLAGS.log_samples,
      seed=FLAGS.seed,
      bootstrap_iters=FLAGS.bootstrap_iters,
      mesh_axes=cli.mesh_flag_values(decodes=True)[:3],
    )

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
