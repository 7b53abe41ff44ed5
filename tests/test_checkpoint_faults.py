"""Checkpoints that do not restore: resume and restore_params fall back to the newest one that does, say so and
delete nothing; a checkpoint named by its step is one clear error; no checkpoint restoring is one clear error."""

import glob
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from llm_jax import checkpoint as ckpt_lib
from llm_jax.errors import UserError
from llm_jax.metrics import read_metrics
from llm_jax.train import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_train import tiny_config  # noqa: E402


def config(corpus):
  return tiny_config(corpus, steps=6, warmup_steps=0, checkpoint_every=2, keep_checkpoints=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted 6-step run with checkpoints 2, 4, 6 (its workdir must not be modified: copy it)."""
  tmp = tmp_path_factory.mktemp("faults")
  from conftest import SENTENCES  # The same corpus as the `corpus` fixture, built once for the module.

  rng = np.random.default_rng(0)
  corpus = tmp / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(SENTENCES, 3))}) + "\n" for _ in range(200)))
  result = pretrain.run(config(str(corpus)), str(tmp / "run"), devices=jax.devices()[:1])
  return str(corpus), str(tmp / "run"), result


def copy(workdir, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


def truncate_data(step_dir):
  """Cuts the largest OCDBT data file of the parameters in half (a copy or a disk that stopped short)."""
  files = glob.glob(os.path.join(step_dir, "params", "ocdbt.process_0", "d", "*"))
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  return largest


def listing(directory):
  """{file: size} of every file under `directory`."""
  return {
    os.path.relpath(os.path.join(root, f), directory): os.path.getsize(os.path.join(root, f))
    for root, _, files in os.walk(directory)
    for f in files
  }


def test_resume_falls_back_to_the_newest_good_checkpoint_and_continues_exactly(trained, tmp_path, capfd):
  corpus, straight, _ = trained
  workdir = copy(straight, tmp_path)
  bad_file = truncate_data(os.path.join(workdir, "checkpoints", "6"))
  rows_before = len(read_metrics(workdir))
  bad_listing = listing(os.path.join(workdir, "checkpoints", "6"))
  pretrain.run(config(corpus), workdir, devices=jax.devices()[:1])
  err = capfd.readouterr().err
  assert f"checkpoint {workdir}/checkpoints/6 does not restore ({bad_file}: ValueError: OUT_OF_RANGE" in err, err
  assert f"using checkpoint {workdir}/checkpoints/4 instead" in err
  assert f"moved the bad one to {workdir}/checkpoints/6.corrupt" in err
  # The bad checkpoint is kept as it was, under a name Orbax ignores; step 6 was saved again.
  assert listing(os.path.join(workdir, "checkpoints", "6.corrupt")) == bad_listing
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.all_steps() == [2, 4, 6]
  checkpointer.close()
  # Steps 5 and 6 were trained again from step 4 and give exactly the uninterrupted run's losses.
  rerun = [r for r in read_metrics(workdir)[rows_before:] if "loss" in r]
  original = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
  assert [r["step"] for r in rerun] == [5, 6]
  np.testing.assert_array_equal([r["loss"] for r in rerun], [original[5], original[6]])


def test_restore_params_falls_back_but_a_named_checkpoint_does_not(trained, tmp_path, capfd):
  _, straight, result = trained
  workdir = copy(straight, tmp_path)
  bad_file = truncate_data(os.path.join(workdir, "checkpoints", "6"))
  params, meta = ckpt_lib.restore_params(workdir, result.state.abstract_params)
  assert meta["step"] == 4
  err = capfd.readouterr().err
  assert f"checkpoint {workdir}/checkpoints/6 does not restore ({bad_file}" in err
  assert f"using checkpoint {workdir}/checkpoints/4 instead" in err and "moved" not in err
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  with pytest.raises(UserError) as error:
    ckpt_lib.restore_params(workdir, result.state.abstract_params, step=6)
  message = str(error.value)
  assert "\n" not in message and f"checkpoint {workdir}/checkpoints/6 does not restore: {bad_file}: " in message
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # Readers never move anything.
  with pytest.raises(UserError, match=r"checkpoints/7: no such checkpoint; the checkpoints in .* are \[2, 4, 6\]"):
    ckpt_lib.restore_params(workdir, result.state.abstract_params, step=7)


@pytest.mark.parametrize("damage", ["data", "metadata", "meta", "empty_params"])
def test_every_checkpoint_unreadable_is_one_error_and_nothing_is_deleted(trained, tmp_path, damage):
  corpus, straight, result = trained
  workdir = copy(straight, tmp_path)
  for step in (2, 4, 6):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    if damage == "data":
      truncate_data(step_dir)
    elif damage == "metadata":
      os.truncate(os.path.join(step_dir, "params", "_METADATA"), 100)
    elif damage == "meta":
      os.truncate(os.path.join(step_dir, "meta", "metadata"), 0)
    else:
      shutil.rmtree(os.path.join(step_dir, "params"))
      os.mkdir(os.path.join(step_dir, "params"))
  before = listing(workdir)
  with pytest.raises(
    UserError,
    match=r"no checkpoint in .*/checkpoints restores \(nothing was deleted\): 6: .*"
    r"; 4: .*; 2: ",
  ) as error:
    ckpt_lib.restore_params(workdir, result.state.abstract_params)
  assert "\n" not in str(error.value)
  with pytest.raises(UserError, match="no checkpoint in .* restores"):  # Resume: never silently from scratch.
    pretrain.run(config(corpus), workdir, devices=jax.devices()[:1])
  after = listing(workdir)
  assert {f: n for f, n in after.items() if not f.startswith("tensorboard")} == {
    f: n for f, n in before.items() if not f.startswith("tensorboard")
  }  # Nothing deleted, moved or written.


def test_command_line_names_the_bad_checkpoint(trained, tmp_path):
  """generate.py: a named bad checkpoint is one line and exit 2; --workdir falls back with one warning line."""
  from conftest import run_tools

  _, straight, _ = trained
  workdir = copy(straight, tmp_path)
  bad_file = truncate_data(os.path.join(workdir, "checkpoints", "6"))
  named, latest = run_tools(
    [
      ("generate", [f"--checkpoint={workdir}/checkpoints/6", "--prompt=the", "--max_new_tokens=1"]),
      ("generate", [f"--workdir={workdir}", "--prompt=the", "--max_new_tokens=1"]),
    ]
  )
  lines = named["stderr"].splitlines()
  assert named["code"] == 2 and len(lines) == 1, named["stderr"]
  assert lines[0].startswith(
    f"error: checkpoint {workdir}/checkpoints/6 does not restore: {bad_file}: ValueError: OUT_OF_RANGE: "
  ), lines[0]
  lines = [line for line in latest["stderr"].splitlines() if line.strip()]
  assert latest["code"] == 0 and len(lines) == 1, latest["stderr"]  # No leftover tracebacks from the failed read.
  assert lines[0].startswith(f"warning: checkpoint {workdir}/checkpoints/6 does not restore ({bad_file}: ")
  assert lines[0].endswith(f"using checkpoint {workdir}/checkpoints/4 instead")
