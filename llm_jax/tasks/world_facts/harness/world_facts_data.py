"""The world-facts harness tasks' data, generated from the project's country table (no files, no downloads).

lm-eval calls these through `custom_dataset: !function world_facts_data.<name>` with the task's metadata as keyword
arguments: `split_seed` (default 0, the end-to-end experiment's split) picks the held-out countries, as
`llm_jax.tasks.world_facts.corpus.split_countries` does.
"""

import random

import datasets

from llm_jax.tasks.world_facts import corpus

NUM_CHOICES = 4


def _held_out(split_seed: int) -> tuple:
  return corpus.split_countries(int(split_seed))[1]


def capital_completion(split_seed: int = 0, **_) -> datasets.DatasetDict:
  """One row per held-out country: {"country", "capital"}."""
  rows = [{"country": c.name, "capital": c.capital} for c in _held_out(split_seed)]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def capital_choice(split_seed: int = 0, **_) -> datasets.DatasetDict:
  """One row per held-out country: its capital among 3 other countries' capitals, in a seeded order."""
  rng = random.Random(int(split_seed) + 1)
  capitals = sorted({c.capital for c in corpus.COUNTRIES})
  rows = []
  for country in _held_out(split_seed):
    choices = [country.capital] + rng.sample([c for c in capitals if c != country.capital], NUM_CHOICES - 1)
    rng.shuffle(choices)
    rows.append({"country": country.name, "choices": choices, "answer": choices.index(country.capital)})
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
