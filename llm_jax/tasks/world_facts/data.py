"""The end-to-end experiment's data, generated from the facts table, and the gold judge.

Countries are split once (seeded) into train and held-out. Held-out countries never appear in SFT chats,
training preference pairs or RL prompts: a model answers them only from what pretraining taught it.

- SFT chats (train countries): capital questions in varied phrasings, answered like imperfect demonstrations:
  most in the complete sentence "The capital of X is Y.", some curtly ("Y."). SFT imitates both.
- Preference pairs (train countries): two of {complete, curt, wrong capital (complete or curt), a true
  sentence about another country, rambling} answers to a question, ranked by the gold judge.
- RL prompts (train countries): questions only, two phrasings per country. RLHF is evaluated on held-out
  prompts (each train country in a phrasing RL never saw) and on the held-out countries.
- Held-out preference pairs, for evaluation: new comparisons about the train countries (none repeats a
  training pair), and comparisons about the held-out countries (does the reward model know facts no pair
  taught it?).

The gold judge is a written rule that stands in for human raters. It is kept apart from the reward model so it
can grade any model's answers in evaluation:
    2  correct and complete: exactly "The capital of X is Y."
    1  correct but curt: names the right capital, in a few words, and nothing wrong
    0  wrong (no or another capital) or rambling (more than one sentence, or long)
"""

from __future__ import annotations

import json
import os
import random
import re

from llm_jax.files import write_atomically
from llm_jax.tasks.world_facts.corpus import (
  COUNTRIES,
  Country,
  capital_answer,
  capital_question_templates,
  split_countries,
)

_CAPITALS = {c.capital for c in COUNTRIES}


def judge(country: Country, answer: str) -> int:
  """The gold rule (module docstring): 2 complete, 1 curt, 0 wrong or rambling."""
  answer = answer.strip()
  if answer == capital_answer(country):
    return 2
  # The substring test skips the regex for capitals that cannot match: the same set, ~100x faster.
  mentioned = {c for c in _CAPITALS if c in answer and re.search(rf"\b{re.escape(c)}\b", answer)}
  if mentioned != {country.capital}:
    return 0  # No capital, or a wrong one.
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer) if s]
  if len(sentences) > 1 or len(answer.split()) > 4:
    return 0  # Rambling.
  return 1


def curt_answer(country: Country) -> str:
  return f"{country.capital}."


def _wrong_answer(rng: random.Random, country: Country) -> str:
  other = rng.choice([c for c in COUNTRIES if c.capital != country.capital])
  return f"The capital of {country.name} is {other.capital}."


def _curt_wrong_answer(rng: random.Random, country: Country) -> str:
  """Curt and wrong: a curt answer is only as good as its fact (no safe hedging for a policy to learn)."""
  return f"{rng.choice([c for c in COUNTRIES if c.capital != country.capital]).capital}."


def _off_topic_answer(rng: random.Random, country: Country) -> str:
  """A true, complete sentence about another country: wrong for this question."""
  other = rng.choice([c for c in COUNTRIES if c.capital != country.capital])
  return capital_answer(other)


def _rambling_answer(rng: random.Random, country: Country) -> str:
  extra = rng.choice(
    [
      f"People there speak {country.language}.",
      f"It is in {country.continent}.",
      f"The money is the {country.currency}.",
    ]
  )
  return f"{capital_answer(country)} {extra} {capital_answer(country)}"


def question(rng: random.Random, country: Country) -> str:
  return rng.choice(capital_question_templates()).format(country=country.name)


def sft_chats(countries, rng: random.Random, per_country: int, curt_fraction: float) -> list[dict]:
  return [
    {"prompt": question(rng, c), "response": curt_answer(c) if rng.random() < curt_fraction else capital_answer(c)}
    for c in countries
    for _ in range(per_country)
  ]


def preference_pairs(countries, rng: random.Random, per_country: int) -> list[dict]:
  """Pairs of answers of different gold grades, the better one as "chosen"."""
  pairs = []
  for country in countries:
    for _ in range(per_country):
      answers = [
        capital_answer(country),
        curt_answer(country),
        _wrong_answer(rng, country),
        _curt_wrong_answer(rng, country),
        _off_topic_answer(rng, country),
        _rambling_answer(rng, country),
      ]
      a, b = rng.sample(answers, 2)
      if judge(country, a) == judge(country, b):
        continue
      chosen, rejected = (a, b) if judge(country, a) > judge(country, b) else (b, a)
      pairs.append({"prompt": question(rng, country), "chosen": chosen, "rejected": rejected})
  return pairs


def held_out_questions(held_out) -> list[tuple[Country, str]]:
  """Every phrasing of the capital question for every held-out country (10 per country)."""
  return [(c, t.format(country=c.name)) for c in held_out for t in capital_question_templates()]


def rl_prompts(train, seed: int, per_country: int = 2) -> list[tuple[Country, str]]:
  """The RL prompts: `per_country` different phrasings per train country."""
  rng = random.Random(seed + 2)
  templates = capital_question_templates()
  return [(c, t.format(country=c.name)) for c in train for t in rng.sample(templates, per_country)]


def held_out_prompts(train, seed: int, per_country: int = 3) -> list[tuple[Country, str]]:
  """RLHF's held-out prompts: train countries asked in phrasings that are not among their RL prompts."""
  rng = random.Random(seed + 3)
  asked = {q for _, q in rl_prompts(train, seed)}
  prompts = []
  for c in train:
    unasked = [q for q in (t.format(country=c.name) for t in capital_question_templates()) if q not in asked]
    prompts += [(c, q) for q in rng.sample(unasked, per_country)]
  return prompts


def write_jsonl(path: str, rows: list[dict]) -> str:
  return write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_all(
  directory: str,
  seed: int = 0,
  held_out_fraction: float = 0.2,
  sft_per_country: int = 4,
  curt_fraction: float = 0.5,
  pairs_per_country: int = 10,
) -> dict[str, str]:
  """Writes every dataset of the experiment into `directory`.

  The defaults are the experiment's (configs/end_to_end.py `data`; a test keeps them equal), so
  `write_all(directory)` writes the data the end-to-end experiment trained on.

  Args:
    directory: Created if missing; existing files of the same names are replaced.
    seed: Seeds the country split and every choice.
    held_out_fraction: The share of countries held out of every training set.
    sft_per_country: SFT chats per train country.
    curt_fraction: The probability that an SFT answer is curt ("Beijing.") rather than the complete sentence.
    pairs_per_country: Training preference pairs drawn per train country (and per held-out country for the
      held-out-country pairs); pairs of equal grade are dropped.

  Returns:
    The paths by name: sft, sft_held_out, pairs, pairs_held_out, pairs_held_out_countries, prompts.
  """
  train, held_out = split_countries(seed, held_out_fraction)
  rng = random.Random(seed)
  sft = sft_chats(train, rng, sft_per_country, curt_fraction)
  train_pairs = preference_pairs(train, rng, pairs_per_country)
  seen = {tuple(p.values()) for p in train_pairs}  # Held-out pairs are new comparisons, not repeats.
  held_out_pairs = [p for p in preference_pairs(train, rng, 3) if tuple(p.values()) not in seen]
  return {
    "sft": write_jsonl(os.path.join(directory, "sft.jsonl"), sft),
    "sft_held_out": write_jsonl(
      os.path.join(directory, "sft_held_out.jsonl"),
      [{"prompt": q, "response": capital_answer(c)} for c, q in held_out_questions(held_out)],
    ),
    "pairs": write_jsonl(os.path.join(directory, "pairs.jsonl"), train_pairs),
    "pairs_held_out": write_jsonl(os.path.join(directory, "pairs_held_out.jsonl"), held_out_pairs),
    "pairs_held_out_countries": write_jsonl(
      os.path.join(directory, "pairs_held_out_countries.jsonl"), preference_pairs(held_out, rng, pairs_per_country)
    ),
    "prompts": write_jsonl(
      os.path.join(directory, "prompts.jsonl"), [{"prompt": q} for _, q in rl_prompts(train, seed)]
    ),
  }
