"""Evaluate any checkpoint: perplexity, QA, reward-model score and win-rate, KL to a reference.

  python experiments/evaluate.py --workdir=CHECKPOINT_DIR [--reference=OTHER_DIR] [--reward_model=RM_DIR] \
    [--text=FILE] [--qa=FILE.jsonl] --output=results.json

Language models (pretrain, SFT, RLHF workdirs):
  loss, perplexity          on --text (text/JSONL files; default: 200 documents of the built-in corpus
                            generated with another seed than training's)
  qa_exact_match            greedy chat answers to --qa ({"prompt", "response"} JSONL) equal to the response;
                            default: the built-in held-out capital questions, also graded by the gold judge
                            (qa_accuracy: right capital; qa_complete: the complete sentence)
  reward_score              mean --reward_model score of the answers (and of --reference's: win_rate_reward)
  win_rate_gold             vs --reference on the built-in questions, by the gold judge (ties ½)
  kl_to_reference           mean per-answer KL(model ‖ reference) on answers sampled at temperature 1
Reward models: pair_accuracy and pair_margin on --pairs; by default on the built-in held-out pairs (new
comparisons about the train countries) and, as pair_accuracy_held_out_countries, on pairs about the held-out
countries.
Prints a table and writes every figure to --output (JSON). The logic is llm_jax.evaluation.evaluate_workdir; the
built-in defaults come from llm_jax.tasks.world_facts.evaluation.
"""

from absl import app, flags

from llm_jax import cli

flags.DEFINE_string("workdir", "", "The workdir to evaluate (latest checkpoint).")
flags.DEFINE_string("checkpoint", "", "Or one checkpoint: WORKDIR/checkpoints/STEP.")
flags.DEFINE_string("reference", "", "A second model workdir: win-rates and KL are measured against it.")
flags.DEFINE_string("reward_model", "", "A reward-model workdir to score answers with.")
flags.DEFINE_string("text", "", "Text for perplexity (files or globs, as data.path).")
flags.DEFINE_string("qa", "", "JSONL {'prompt', 'response'} for exact match (default: built-in questions).")
flags.DEFINE_string("pairs", "", "Preference pairs for a reward-model workdir (default: built-in held-out).")
flags.DEFINE_integer("seq_len", 128, "Rows of this length for perplexity.")
flags.DEFINE_string("output", "results.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    from llm_jax import evaluation
    from llm_jax.tasks.world_facts import evaluation as world_facts

    request = evaluation.Request(
      workdir=FLAGS.workdir,
      checkpoint=FLAGS.checkpoint,
      reference=FLAGS.reference,
      reward_model=FLAGS.reward_model,
      text=FLAGS.text,
      qa=FLAGS.qa,
      pairs=FLAGS.pairs,
      seq_len=FLAGS.seq_len,
      output=FLAGS.output,
    )
    evaluation.evaluate_workdir(request, world_facts.DEFAULTS)  # The built-in defaults are the world-facts task's.

  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
