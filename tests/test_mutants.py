"""The mutation check's list (tests/mutation_check.py) stays in sync with the code: every mutant's `original`
snippet occurs exactly once in its file, its replacement differs, and its tests exist. Cheap: runs no mutant."""

import os
import shlex

import mutation_check  # tests/mutation_check.py (pytest puts tests/ on sys.path).
import pytest


@pytest.mark.parametrize("mutant", mutation_check.MUTANTS, ids=lambda m: m.name)
def test_mutant_matches_the_code(mutant):
  assert mutation_check.check_mutants([mutant]) == []
  for spec in mutant.tests:
    args = shlex.split(spec)
    path, _, name = args[0].partition("::")
    with open(os.path.join(mutation_check.ROOT, path), encoding="utf-8") as f:
      source = f.read()
    if name:  # A node id: the test function exists.
      assert f"def {name.split('[')[0]}(" in source, spec
    if "-k" in args:  # Every word of the -k expression names something in the file.
      for word in args[args.index("-k") + 1].replace("(", " ").replace(")", " ").split():
        assert word in ("and", "or", "not") or word in source, f"{spec}: {word!r}"


def test_mutant_names_are_unique_and_there_are_enough():
  assert mutation_check.check_mutants() == []
  assert len(mutation_check.MUTANTS) >= 22


def test_a_stale_snippet_is_reported():
  stale = mutation_check.Mutant("stale", "llm_jax/model.py", "this line is not in the model", "x", ("tests",))
  assert "occurs 0 times" in mutation_check.check_mutants([stale])[0]
