"""Every command-line tool as a new user meets it: a bad flag, a missing or malformed file, a workdir of the wrong
kind ends with one line `error: ...` on stderr and exit status 2, and leaves existing workdirs untouched."""

import ast
import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import run_tools  # tests/conftest.py: tools run from one process.

from llm_jax import checkpoint as ckpt_lib
from llm_jax.model import PRESETS
from llm_jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dataclasses.replace(PRESETS["tiny"], vocab_size=320)


def assert_one_line_errors(cases, results):
  wrong = []
  for (tool, args, message), result in zip(cases, results):
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    if not (result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]):
      wrong.append(f"{tool} {' '.join(args)}: exit {result['code']}, stderr {result['stderr'][-600:]!r}")
  assert not wrong, "\n".join(wrong)


def fake_workdir(path, stage, model=TINY, checkpoint_model=None):
  """A workdir as a stage leaves it (config.json, tokenizer, a checkpoint whose meta names the stage), with
  stand-in arrays: every case below must fail on the workdir's kind before any parameter is read."""
  checkpoint_model = checkpoint_model or model
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": {}, "model": dataclasses.asdict(model)}, f)
  ByteTokenizer().save(str(path))
  checkpointer = ckpt_lib.Checkpointer(str(path))
  checkpointer.save(
    1,
    {"w": np.zeros(2, np.float32)},
    {"m": np.zeros(2, np.float32)},
    None,
    {"stage": stage, "step": 1, "model": dataclasses.asdict(checkpoint_model)},
  )
  checkpointer.close()
  return str(path)


def snapshot(directory):
  return {
    os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
    for root, _, files in os.walk(directory)
    for f in files
  }


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  dirs = {stage: fake_workdir(tmp / stage, stage) for stage in ("pretrain", "sft", "reward_model")}
  dirs["other_model"] = fake_workdir(tmp / "other_model", "pretrain", TINY, dataclasses.replace(TINY, num_layers=3))
  dirs["other_vocab_rm"] = fake_workdir(
    tmp / "other_vocab_rm", "reward_model", dataclasses.replace(TINY, vocab_size=384)
  )
  (tmp / "a_file").write_text("not a directory")
  (tmp / "empty.txt").write_text("")
  (tmp / "not_a_workdir").mkdir()
  pair = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
  (tmp / "bad_pairs.jsonl").write_text(json.dumps(pair) + "\n{not json\n")
  (tmp / "long_pairs.jsonl").write_text(3 * (json.dumps({**pair, "chosen": "hello " * 20}) + "\n"))
  dirs.update(
    file=str(tmp / "a_file"), empty=str(tmp / "empty.txt"), not_a_workdir=str(tmp / "not_a_workdir"), tmp=str(tmp)
  )
  dirs.update(bad_pairs=str(tmp / "bad_pairs.jsonl"), long_pairs=str(tmp / "long_pairs.jsonl"))
  return dirs


def test_every_tool_reports_bad_input_in_one_line(workdirs):
  w = workdirs
  tiny = ["--config.model=tiny", "--config.data.tokenizer=char"]
  new = f"--workdir={w['tmp']}/new"  # Must not be created.
  quick = [
    *tiny,
    "--config.steps=1",
    "--config.warmup_steps=0",
    "--config.batch_size=8",
    "--config.seq_len=32",
    "--config.data.builtin_documents=50",
  ]  # If a check were missing, training would end soon.
  dpo = [f"--workdir={w['tmp']}/d", f"--config.init_from={w['sft']}"]  # A new workdir: must not be created.
  cases = [
    ("pretrain", [f"--workdir={w['file']}"], "exists and is not a directory"),
    ("pretrain", [f"--workdir={w['file']}/run"], "cannot create it (Not a directory)"),
    ("pretrain", [new, "--config.steps=abc"], "flag --config.steps=abc: invalid literal"),
    ("pretrain", [new, "--config.stepz=3"], "--config.stepz: the config has no field 'stepz' (did you mean 'steps'"),
    ("pretrain", [new, f"--config={w['tmp']}/missing.py"], "cannot load the config file (No such file or directory)"),
    ("pretrain", [f"--workdir={w['sft']}", *tiny], "holds sft checkpoints (step 1), and this is a pretrain run"),
    ("pretrain", [new, "--config.model_overrides.num_heads=5"], "must divide model.d_model"),
    ("pretrain", [new, f"--config.data.path={w['tmp']}/nothing*.txt"], "no file matches"),
    ("pretrain", [new, f"--config.data.path={w['empty']}"], "the corpus is empty"),
    ("pretrain", [new, *quick, "--config.learning_rate=nan"], "learning_rate=nan must be positive and finite"),
    ("pretrain", [new, *quick, "--sample_tokens=-1"], "--sample_tokens=-1 must be >= 0"),
    (
      "sft",
      [f"--workdir={w['tmp']}/s", f"--config.init_from={w['reward_model']}"],
      "holds reward_model checkpoints, where pretraining (or SFT) checkpoints are expected",
    ),
    ("sft", [f"--workdir={w['tmp']}/s", f"--config.init_from={w['tmp']}/missing"], "is not an llm_jax workdir"),
    (
      "sft",
      [f"--workdir={w['pretrain']}", f"--config.init_from={w['sft']}"],
      "holds pretrain checkpoints (step 1), and this is a sft run",
    ),
    (
      "reward_model",
      [f"--workdir={w['tmp']}/r", f"--config.init_from={w['reward_model']}"],
      "holds reward_model checkpoints, where SFT checkpoints",
    ),
    (
      "rlhf",
      [f"--workdir={w['tmp']}/l", f"--config.init_from={w['sft']}", f"--config.reward_model={w['sft']}"],
      "holds sft checkpoints, where reward-model checkpoints are expected",
    ),
    (
      "rlhf",
      [f"--workdir={w['tmp']}/l", f"--config.init_from={w['sft']}", f"--config.reward_model={w['other_vocab_rm']}"],
      "are models of different vocabularies (model.vocab_size 384 vs 320)",
    ),
    ("dpo", [f"--workdir={w['tmp']}/d", f"--config.data.path={w['bad_pairs']}"], "init_from: give the SFT workdir"),
    ("dpo", [*dpo, f"--config.data.path={w['empty']}"], "empty.txt: no preference pairs"),
    ("dpo", [*dpo, f"--config.data.path={w['bad_pairs']}"], "bad_pairs.jsonl:2: malformed JSON"),
    (
      "dpo",
      [*dpo, f"--config.data.path={w['long_pairs']}", "--config.seq_len=24"],
      "long_pairs.jsonl: every preference pair is longer than seq_len=24",
    ),
    ("dpo", [*dpo, f"--config.data.path={w['bad_pairs']}", "--config.loss=orpo"], "loss='orpo' must be one of"),
    ("dpo", [*dpo, f"--config.data.path={w['bad_pairs']}", "--config.beta=0"], "beta=0.0 must be positive"),
    (
      "dpo",
      [*dpo, f"--config.data.path={w['bad_pairs']}", "--config.loss=ipo", "--config.label_smoothing=0.1"],
      "label_smoothing=0.1: the ipo loss has none",
    ),
    (
      "dpo",
      [f"--workdir={w['tmp']}/d", f"--config.init_from={w['reward_model']}", f"--config.data.path={w['bad_pairs']}"],
      "holds reward_model checkpoints, where SFT checkpoints are expected",
    ),
    ("generate", [f"--workdir={w['not_a_workdir']}", "--prompt=hi"], "is not an llm_jax workdir"),
    ("generate", [f"--workdir={w['reward_model']}", "--prompt=hi"], "is a reward-model workdir"),
    (
      "generate",
      [f"--checkpoint={w['pretrain']}/checkpoints/9", "--prompt=hi"],
      "checkpoints/9: no such checkpoint; the checkpoints in",
    ),
    (
      "generate",
      [f"--workdir={w['other_model']}", "--prompt=hi"],
      "config.json describes another model than its checkpoint 1 (fields ['num_layers'] differ)",
    ),
    ("generate", [f"--workdir={w['pretrain']}", "--max_new_tokens=abc"], "flag --max_new_tokens=abc"),
    (
      "generate",
      [f"--workdir={w['pretrain']}", "--prompt=hi", "--mesh_sequence=2"],
      "--mesh_sequence=2: decoding does not split the sequence",
    ),
    (
      "evaluate",
      [f"--workdir={w['pretrain']}", f"--reference={w['tmp']}/missing", f"--output={w['tmp']}/o.json"],
      "is not an llm_jax workdir",
    ),
    (
      "evaluate",
      [f"--workdir={w['pretrain']}", f"--reward_model={w['sft']}", f"--output={w['tmp']}/o.json"],
      "where reward-model checkpoints are expected",
    ),
    ("evaluate", [f"--workdir={w['pretrain']}", f"--output={w['tmp']}"], "is a directory"),
    (
      "evaluate",
      [f"--workdir={w['pretrain']}", f"--pairs={w['file']}", f"--output={w['tmp']}/o.json"],
      "--pairs: for reward models",
    ),
    (
      "inspect",
      [f"--workdir={w['not_a_workdir']}", "--prompt=hi", f"--output={w['tmp']}/o"],
      "is not an llm_jax workdir",
    ),
    (
      "inspect",
      [f"--workdir={w['reward_model']}", "--prompt=hi", f"--output={w['tmp']}/o"],
      "is a reward-model workdir",
    ),
    ("inspect", [f"--workdir={w['pretrain']}", "--prompt=hi"], "--output is required"),
    ("inspect", [f"--workdir={w['pretrain']}", "--prompt=hi", f"--output={w['file']}"], "is not a directory"),
    ("inspect", [f"--workdir={w['pretrain']}", "--prompt= ", f"--output={w['tmp']}/o"], "--prompt is empty"),
    (
      "inspect",
      [f"--workdir={w['pretrain']}", "--prompt=hi", "--top_k_shown=0", f"--output={w['tmp']}/o"],
      "--top_k_shown=0 must be >= 1",
    ),
    (
      "inspect",
      [f"--workdir={w['pretrain']}", "--prompt=hi", "--max_new_tokens=0", f"--output={w['tmp']}/o"],
      "max_new_tokens=0 must be >= 1",
    ),
    (
      "inspect",
      [f"--workdir={w['pretrain']}", f"--checkpoint={w['sft']}/checkpoints/1", "--prompt=hi", f"--output={w['tmp']}/o"],
      "is not a checkpoint of --workdir",
    ),
    (
      "inspect",
      [f"--workdir={w['pretrain']}", "--checkpoint=9", "--prompt=hi", f"--output={w['tmp']}/o"],
      "checkpoints/9: no such checkpoint",
    ),
    ("end_to_end", [f"--workdir={w['file']}"], "exists and is not a directory"),
    ("bench_train", ["--model=gpt5"], "--model=gpt5: unknown preset"),
    ("bench_decode", ["--batch_sizes=1,x"], "--batch_sizes=1,x: expected integers"),
  ]
  before = snapshot(w["tmp"])
  assert_one_line_errors(cases, run_tools([(tool, args) for tool, args, _ in cases]))
  assert snapshot(w["tmp"]) == before  # No workdir, checkpoint or file was created, changed or removed.


def test_every_tool_starts():
  """`python experiments/TOOL.py --help` for every tool: absl prints the usage (the tool's docstring) and exits 1,
  with nothing on stderr. The stack is imported with experiments/ first on the import path, as in each tool's own
  process: experiments/inspect.py must stand in for the standard library's `inspect` that jax and flax import."""
  experiments = os.path.join(ROOT, "experiments")
  tools = sorted(f[:-3] for f in os.listdir(experiments) if f.endswith(".py"))
  assert {"inspect", "generate", "pretrain"} <= set(tools)
  wrong = []
  for tool, result in zip(tools, run_tools([(tool, ["--help"]) for tool in tools])):
    with open(os.path.join(experiments, f"{tool}.py")) as f:
      usage = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
    if not (result["code"] == 1 and not result["stderr"] and result["stdout"].startswith(usage)):
      wrong.append(
        f"{tool}: exit {result['code']}, stdout {result['stdout'][:200]!r}, stderr {result['stderr'][-600:]!r}"
      )
  assert not wrong, "\n".join(wrong)
