"""The world-facts task: the download-free pretraining corpus, the experiment's datasets and the gold judge."""

import importlib.util
import inspect
import json
import os
import re
from collections import Counter

import pytest

from llm_jax import tasks
from llm_jax.tasks.world_facts import data
from llm_jax.tasks.world_facts.corpus import (
  COUNTRIES,
  Country,
  capital_answer,
  capital_question_templates,
  pretraining_documents,
  split_countries,
  write_pretraining_jsonl,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def default_docs() -> list[str]:
  return pretraining_documents()


def test_same_seed_gives_identical_documents(default_docs):
  assert pretraining_documents(seed=0) == default_docs


def test_different_seed_gives_different_documents(default_docs):
  other = pretraining_documents(seed=1)
  assert len(other) == len(default_docs)
  assert other != default_docs
  # Not just a reshuffle of the same documents.
  assert set(other) != set(default_docs)


def test_generation_does_not_use_global_random_state(default_docs):
  import random

  random.seed(12345)
  assert pretraining_documents() == default_docs


def test_num_documents_is_respected():
  assert len(pretraining_documents(num_documents=7)) == 7
  assert pretraining_documents(num_documents=0) == []


def test_every_canonical_capital_sentence_appears_at_least_three_times(default_docs):
  # Count whole sentences, so the answer must stand on its own, not inside a longer sentence.
  sentence_counts = Counter(sentence for doc in default_docs for sentence in re.split(r"(?<=[.?!])\s+", doc))
  for country in COUNTRIES:
    count = sentence_counts[capital_answer(country)]
    assert count >= 3, f"{country.name}: {count}"


def test_china_and_beijing_are_present(default_docs):
  text = "\n".join(default_docs)
  assert "The capital of China is Beijing." in text
  assert capital_answer(_by_name("China")) == "The capital of China is Beijing."


def test_capitals_also_appear_in_other_phrasings(default_docs):
  text = "\n".join(default_docs)
  for country in COUNTRIES:
    without_canonical = text.replace(capital_answer(country), "")
    assert country.capital in without_canonical, country.name


def test_corpus_mixes_facts_and_general_prose(default_docs):
  # Every prose document opens with a past-tense narrative verb (or "Dear" for letters); fact documents are in the
  # present tense. Check the mix is roughly the intended 35% prose.
  first_sentence_markers = re.compile(
    r"\b(was|lived|worked|walked|grew|moved|decided|left|wanted|opened|showed|Dear)\b"
  )
  prose = sum(bool(first_sentence_markers.search(doc.split(". ")[0])) for doc in default_docs)
  assert 0.3 < prose / len(default_docs) < 0.4


def test_size_and_format(default_docs):
  total_bytes = sum(len(doc.encode("utf-8")) + 1 for doc in default_docs)
  assert 300_000 < total_bytes < 3_000_000
  for doc in default_docs:
    assert doc.strip() == doc and doc
    assert "\n\n" not in doc
    assert all(32 <= ord(ch) < 127 for ch in doc), doc
    sentences = re.findall(r"[.?!](?=\s|$)", doc)
    assert 2 <= len(sentences) <= 8, doc


def test_facts_table_is_consistent():
  assert 150 <= len(COUNTRIES) <= 200
  names = [c.name for c in COUNTRIES]
  capitals = [c.capital for c in COUNTRIES]
  assert len(set(names)) == len(names), "duplicate country names"
  assert len(set(capitals)) == len(capitals), "one capital listed for two countries"
  continents = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
  for c in COUNTRIES:
    assert isinstance(c, Country)
    assert c.continent in continents, c
    for field in (c.name, c.capital, c.language, c.currency):
      assert field and field.strip() == field
      assert all(32 <= ord(ch) < 127 for ch in field), c
  with pytest.raises(AttributeError):
    COUNTRIES[0].capital = "Elsewhere"  # frozen


def test_a_few_well_known_facts():
  assert _by_name("China") == Country("China", "Beijing", "Asia", "Mandarin Chinese", "Chinese yuan")
  assert _by_name("Japan").capital == "Tokyo"
  assert _by_name("France").currency == "euro"
  assert _by_name("Brazil").language == "Portuguese"
  assert _by_name("Australia").continent == "Oceania"


def test_split_countries_partitions_and_keeps_china_in_train():
  for seed in range(20):
    train, held_out = split_countries(seed=seed)
    train_names = {c.name for c in train}
    held_names = {c.name for c in held_out}
    assert not train_names & held_names
    assert train_names | held_names == {c.name for c in COUNTRIES}
    assert len(train) + len(held_out) == len(COUNTRIES)
    assert "China" in train_names
    assert len(held_out) == round(0.2 * len(COUNTRIES))


def test_split_countries_is_deterministic_and_seed_dependent():
  assert split_countries(seed=3) == split_countries(seed=3)
  assert split_countries(seed=3) != split_countries(seed=4)
  assert split_countries(held_out_fraction=0.0)[1] == ()
  with pytest.raises(ValueError):
    split_countries(held_out_fraction=1.0)


def test_question_templates():
  templates = capital_question_templates()
  assert len(templates) >= 5
  assert "Where is the capital of {country}?" in templates
  assert len(set(templates)) == len(templates)
  for template in templates:
    assert template.count("{country}") == 1
    assert template.format(country="China")


def test_write_pretraining_jsonl_round_trips(tmp_path):
  target = tmp_path / "nested" / "dir" / "corpus.jsonl"
  returned = write_pretraining_jsonl(target, seed=5, num_documents=50)
  assert returned == str(target)
  lines = target.read_text(encoding="utf-8").splitlines()
  assert [json.loads(line) for line in lines] == [
    {"text": doc} for doc in pretraining_documents(seed=5, num_documents=50)
  ]
  # Overwriting works and leaves no temporary files behind.
  write_pretraining_jsonl(target, seed=6, num_documents=3)
  assert len(target.read_text(encoding="utf-8").splitlines()) == 3
  assert [p.name for p in target.parent.iterdir()] == ["corpus.jsonl"]


def test_builtin_corpus_hook_writes_the_corpus_once(tmp_path):
  path = tasks.builtin_corpus(str(tmp_path), seed=5, num_documents=20)
  assert path == os.path.join(str(tmp_path), "data", "builtin_corpus.jsonl")
  with open(path, encoding="utf-8") as f:
    assert [json.loads(line)["text"] for line in f] == pretraining_documents(seed=5, num_documents=20)
  # A resumed run reads the corpus it started with.
  assert tasks.builtin_corpus(str(tmp_path), seed=6, num_documents=3) == path
  with open(path, encoding="utf-8") as f:
    assert len(f.readlines()) == 20


def test_judge_grades_complete_curt_wrong_and_rambling():
  china = _by_name("China")
  assert data.judge(china, " The capital of China is Beijing.\n") == 2
  assert data.judge(china, "Beijing.") == data.judge(china, "It is Beijing.") == 1
  assert data.judge(china, "Tokyo.") == data.judge(china, "Beijing or Tokyo.") == data.judge(china, "No idea.") == 0
  assert data.judge(china, "The capital of China is Beijing. It is in Asia.") == 0
  assert data.judge(china, "I am sure that it is Beijing.") == 0


def test_write_all_defaults_are_the_experiments():
  spec = importlib.util.spec_from_file_location("end_to_end_config", os.path.join(ROOT, "configs", "end_to_end.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  defaults = {k: p.default for k, p in inspect.signature(data.write_all).parameters.items() if k != "directory"}
  assert defaults["seed"] == config.seed
  for key, value in config.data.items():
    assert defaults[key] == value, key


def test_held_out_countries_stay_out_of_training_data(tmp_path):
  paths = data.write_all(str(tmp_path), seed=3)
  _, held_out = split_countries(3)
  held_out_questions = {q for _, q in data.held_out_questions(held_out)}
  assert len(held_out_questions) == 10 * len(held_out)
  for name in ("sft", "pairs", "pairs_held_out", "prompts"):
    with open(paths[name], encoding="utf-8") as f:
      prompts = [json.loads(line)["prompt"] for line in f]
    assert prompts and not held_out_questions & set(prompts), name
  with open(paths["sft_held_out"], encoding="utf-8") as f:
    assert {json.loads(line)["prompt"] for line in f} == held_out_questions


def _by_name(name: str) -> Country:
  (country,) = [c for c in COUNTRIES if c.name == name]
  return country
