"""World-facts evaluation: held-out capital questions graded by the gold judge, gold win-rates, evaluate.py's defaults.

`DEFAULTS` is what experiments/evaluate.py evaluates on when it names no file; the generic `llm_jax.evaluation`
gets it as an argument and never imports this module.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from llm_jax import evaluation
from llm_jax.inference.sampler import Sampler
from llm_jax.tasks.world_facts import corpus, data
from llm_jax.tokenizer import Tokenizer
from llm_jax.train.reward_model import read_pairs


def gold_grades(countries, replies: list[str]) -> list[int]:
  return [data.judge(c, r) for c, r in zip(countries, replies)]


def held_out_qa(sampler: Sampler, tokenizer: Tokenizer, seed: int = 0, held_out_fraction: float = 0.2):
  """Capital questions about the held-out countries: (countries, questions, answers, grades)."""
  _, held_out = data.split_countries(seed, held_out_fraction)
  pairs = data.held_out_questions(held_out)
  countries, questions = [c for c, _ in pairs], [q for _, q in pairs]
  replies = evaluation.answers(sampler, tokenizer, questions)
  return countries, questions, replies, gold_grades(countries, replies)


def gold_win_rates(
  sampler_a: Sampler, sampler_b: Sampler, tokenizer: Tokenizer, countries, questions, samples: int = 4, seed: int = 0
) -> dict[str, float]:
  """Gold-judge win-rates of a over b on capital questions (ties count one half).

  Returns:
    gold_win_rate: on `samples` answers per question sampled from each policy (temperature 1: the distribution RL
      optimizes); gold_win_rate_greedy: on greedy answers.
  """
  sampling = dataclasses.replace(evaluation.ANSWER, temperature=1.0)
  repeated_questions = [q for q in questions for _ in range(samples)]
  repeated_countries = [c for c in countries for _ in range(samples)]
  sampled = [
    gold_grades(repeated_countries, evaluation.answers(s, tokenizer, repeated_questions, sampling, seed + i))
    for i, s in enumerate((sampler_a, sampler_b))
  ]
  greedy = [gold_grades(countries, evaluation.answers(s, tokenizer, questions)) for s in (sampler_a, sampler_b)]
  return {"gold_win_rate": evaluation.win_rate(*sampled), "gold_win_rate_greedy": evaluation.win_rate(*greedy)}


def qa_summary(grades: list[int]) -> dict[str, float]:
  """qa_accuracy: the right capital (grade >= 1); qa_complete: the complete sentence (grade 2)."""
  return {
    "qa_accuracy": float(np.mean([g >= 1 for g in grades])),
    "qa_complete": float(np.mean([g == 2 for g in grades])),
  }


def held_out_question_set(seed: int = 0, held_out_fraction: float = 0.2) -> evaluation.QuestionSet:
  """Every phrasing of the capital question for every held-out country, with the gold judge.

  The reference answer (exact match) is the complete sentence; the figures are `qa_summary`'s.
  """
  _, held_out = data.split_countries(seed, held_out_fraction)
  countries, questions = zip(*data.held_out_questions(held_out))
  return evaluation.QuestionSet(
    list(questions),
    [data.capital_answer(c) for c in countries],
    grade=lambda replies: gold_grades(countries, replies),
    summarize=qa_summary,
  )


def perplexity_documents() -> list[str]:
  """200 documents of the corpus generated with another seed than training's (seed 1; training's is 0)."""
  return corpus.pretraining_documents(seed=1, num_documents=200)


def held_out_pairs() -> dict[str, list]:
  """The experiment's held-out preference pairs, by result-key suffix (see `llm_jax.evaluation.Defaults`).

  "": new comparisons about the train countries; "_held_out_countries": pairs about the held-out countries.
  """
  with tempfile.TemporaryDirectory() as directory:
    paths = data.write_all(directory)
    return {
      "": read_pairs(paths["pairs_held_out"]),
      "_held_out_countries": read_pairs(paths["pairs_held_out_countries"]),
    }


DEFAULTS = evaluation.Defaults(documents=perplexity_documents, questions=held_out_question_set, pairs=held_out_pairs)
