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
Prints a table and writes every figure to --output (JSON).
"""

import json

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
    import os
    import tempfile
    import jax
    from llm_jax import evaluation, sharding
    from llm_jax import checkpoint as ckpt_lib
    from llm_jax.data import text
    from llm_jax.tasks.world_facts import corpus as builtin_corpus
    from llm_jax.tasks.world_facts import data as world_facts
    from llm_jax.errors import UserError
    from llm_jax.chat import prompt_and_answer, read_chats
    from llm_jax.inference.loading import load_sampler, resolve
    from llm_jax.modeling import check_language_model, lm_factory, model_spec, read_model_config
    from llm_jax.tokenizer import load_tokenizer
    from llm_jax.train import stage
    from llm_jax.train import reward_model as reward

    workdir, step = resolve(FLAGS.workdir, FLAGS.checkpoint)
    # Every file and workdir the flags name is checked before a model is loaded: evaluating takes minutes.
    if os.path.isdir(FLAGS.output) or not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output))):
      raise UserError(f"--output={FLAGS.output}: " + ("is a directory" if os.path.isdir(FLAGS.output)
                                                      else "its directory does not exist"))
    if FLAGS.seq_len < 2:
      raise UserError(f"--seq_len={FLAGS.seq_len} must be >= 2")
    read_model_config(workdir)  # Not a workdir at all: says so.
    meta = ckpt_lib.workdir_meta(workdir, step)
    if meta is None:
      raise UserError(f"{workdir}: no readable checkpoint in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}")
    language_model_flags = [f"--{name}" for name in ("reference", "reward_model", "text", "qa") if FLAGS[name].value]
    if meta.get("stage") == "reward_model":
      if language_model_flags:
        raise UserError(f"{', '.join(language_model_flags)}: for language models; {workdir} is a reward model "
                        "(give it --pairs)")
      pairs = reward.read_pairs(FLAGS.pairs) if FLAGS.pairs else None
    else:
      if FLAGS.pairs:
        raise UserError(f"--pairs: for reward models; {workdir} is a {meta.get('stage')} workdir")
      documents = (text.read_documents(FLAGS.text, name="--text") if FLAGS.text
                   else builtin_corpus.pretraining_documents(seed=1, num_documents=200))
      chats = read_chats(FLAGS.qa).chats if FLAGS.qa else None
      for i, chat in enumerate(chats or []):
        if not any(m.role == "assistant" for m in chat[1:]):
          raise UserError(f"--qa={FLAGS.qa}: conversation {i + 1} has no assistant answer after a prompt")
      if FLAGS.reference:
        check_language_model(FLAGS.reference)
        stage.check_same_tokenizer(FLAGS.reference, "--reference", workdir, "--workdir")
      if FLAGS.reward_model:
        stage.check_source_workdir(FLAGS.reward_model, "--reward_model", "reward-model", ("reward_model",))
        stage.check_same_tokenizer(FLAGS.reward_model, "--reward_model", workdir, "--workdir")

    mesh = sharding.make_mesh()
    results = {"workdir": os.path.abspath(workdir), "stage": meta.get("stage"), "step": meta.get("step")}
    if meta.get("stage") == "reward_model":
      state, params, _ = reward.load_reward_model(workdir, mesh, step)
      tokenizer = load_tokenizer(workdir)
      if pairs:
        results.update(evaluation.pair_accuracy(state, params, tokenizer, pairs, mesh))
      else:
        data = world_facts.write_all(tempfile.mkdtemp())
        results.update(evaluation.pair_accuracy(state, params, tokenizer,
                                                reward.read_pairs(data["pairs_held_out"]), mesh))
        countries = evaluation.pair_accuracy(state, params, tokenizer,
                                             reward.read_pairs(data["pairs_held_out_countries"]), mesh)
        results.update({f"{k}_held_out_countries": v for k, v in countries.items()})
    else:
      sampler, tokenizer, loaded = load_sampler(workdir, mesh, step)
      results["step"] = loaded.get("step")  # The checkpoint used (an unreadable newer one is skipped).
      model_cfg = read_model_config(workdir)
      state = model_spec(lm_factory(model_cfg), mesh)
      seq_len = min(FLAGS.seq_len, model_cfg.max_seq_len)
      results.update(evaluation.perplexity(state, sampler.params, tokenizer, documents, seq_len, mesh))
      if chats:
        questions = [prompt_and_answer(c)[0][-1].content for c in chats]
        references = [prompt_and_answer(c)[1].strip() for c in chats]
        replies = evaluation.answers(sampler, tokenizer, questions)
        countries = None
      else:
        countries, questions, replies, grades = evaluation.held_out_qa(sampler, tokenizer)
        references = [world_facts.capital_answer(c) for c in countries]
        results.update(evaluation.qa_summary(grades))
      results["qa_exact_match"] = sum(r == a for r, a in zip(replies, references)) / len(references)
      results["qa_example"] = f"{questions[0]} → {replies[0]}"
      reference_replies = None
      if FLAGS.reference:
        ref_sampler, _, _ = load_sampler(FLAGS.reference, mesh)
        reference_replies = evaluation.answers(ref_sampler, tokenizer, questions)
        if countries is not None:
          results["win_rate_gold"] = evaluation.win_rate(evaluation.gold_grades(countries, replies),
                                                         evaluation.gold_grades(countries, reference_replies))
        ref_cfg = read_model_config(FLAGS.reference)
        ref_state = model_spec(lm_factory(ref_cfg), mesh)
        results["kl_to_reference"] = evaluation.kl_to_reference(sampler, ref_state, ref_sampler.params,
                                                                tokenizer, questions)
      if FLAGS.reward_model:
        rm_state, rm_params, _ = reward.load_reward_model(FLAGS.reward_model, mesh)
        scores = evaluation.reward_scores(rm_state, rm_params, tokenizer, questions, replies, mesh)
        results["reward_score"] = sum(scores) / len(scores)
        if reference_replies is not None:
          ref_scores = evaluation.reward_scores(rm_state, rm_params, tokenizer, questions, reference_replies, mesh)
          results["win_rate_reward"] = evaluation.win_rate(scores, ref_scores)

    width = max(len(k) for k in results)
    for key, value in results.items():
      print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if jax.process_index() == 0:
      with open(FLAGS.output, "w") as f:
        json.dump(results, f, indent=2)
      print(f"wrote {FLAGS.output}")
  cli.run(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
