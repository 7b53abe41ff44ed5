"""The whole pipeline on a micro config (each stage's learning signal), and evaluate.py's JSON."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from llm_jax.metrics import read_metrics
from llm_jax.tasks.world_facts import end_to_end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import end_to_end as e2e_config  # noqa: E402


def micro_config():
  config = e2e_config.get_config()
  p = config.pretrain
  p.model, p.data.tokenizer, p.data.builtin_documents = "tiny", "char", 400
  p.steps, p.batch_size, p.seq_len, p.warmup_steps, p.eval_every, p.log_every = 80, 16, 64, 10, 80, 10
  s = config.sft
  s.steps, s.batch_size, s.seq_len, s.warmup_steps, s.eval_every, s.log_every = 30, 16, 96, 5, 30, 10
  s.exact_match_examples, s.max_answer_tokens = 8, 16
  r = config.reward_model
  r.steps, r.batch_size, r.seq_len, r.warmup_steps, r.eval_every, r.log_every = 120, 16, 128, 10, 120, 10
  r.learning_rate = 3e-3
  l = config.rlhf
  l.iterations, l.prompts_per_iteration, l.minibatch_size, l.max_new_tokens, l.ppo_epochs = 3, 8, 8, 8, 1
  return config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("e2e"))
  return workdir, end_to_end.run(micro_config(), workdir)


def test_every_stage_shows_its_learning_signal(pipeline):
  workdir, results = pipeline
  stage = lambda name: read_metrics(os.path.join(workdir, name))
  pre = [r["loss"] for r in stage("pretrain") if "loss" in r]
  assert pre[-1] < pre[0] - 1.0  # Next-token loss falls.
  sft_eval = [r["eval_loss"] for r in stage("sft") if "eval_loss" in r]
  assert sft_eval[-1] < sft_eval[0]  # Held-out assistant-token loss falls (step 0 is the base model).
  rm_eval = [r["eval_loss"] for r in stage("reward_model") if "eval_loss" in r]
  rm_train = [r["loss"] for r in stage("reward_model") if "loss" in r]
  assert rm_eval[0] == pytest.approx(math.log(2), rel=1e-3)  # The zero head starts at chance...
  # ...and the training pairs start to be learned (held-out countries need facts the micro model lacks).
  assert np.mean(rm_train[len(rm_train) // 2 :]) < math.log(2) - 0.02, rm_train
  rl_rows = stage("rlhf")
  assert len(rl_rows) == 3 and all(math.isfinite(r["kl_k1"]) and math.isfinite(r["score"]) for r in rl_rows)
  for key in (
    "pretrain/qa_accuracy",
    "sft/qa_accuracy",
    "rlhf/qa_accuracy",
    "rlhf/kl_to_sft",
    "rlhf_vs_sft/held_out_prompts/gold_win_rate",
    "rlhf_vs_sft/held_out_countries/gold_win_rate_greedy",
    "reward_model/held_out_accuracy",
    "reward_model/held_out_countries_accuracy",
  ):
    assert math.isfinite(results[key]), key
  report = open(os.path.join(workdir, "REPORT.md")).read()
  assert "Where is the capital of China?" in report and len(os.listdir(os.path.join(workdir, "plots"))) == 6
  # The report ends with the seed question inspected on each model, its figures beside it.
  section = report.split("## How each model picks its tokens")[1]
  for label, name in end_to_end.INSPECTED:
    inspected = json.loads(open(os.path.join(workdir, "inspect", name, "inspect.json")).read())
    assert f"| {label} | {json.dumps(inspected['answer'], ensure_ascii=False)} |" in section
    for figure in ("steps.png", "logit_lens.png"):
      assert f"(inspect/{name}/{figure})" in section and os.path.exists(os.path.join(workdir, "inspect", name, figure))
  assert inspected["answer"].strip() == results["answer"]  # The RLHF model's greedy answer, as the report prints it.


def test_evaluate_writes_the_documented_fields(pipeline, tmp_path):
  workdir, _ = pipeline
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="")
  script = os.path.join(ROOT, "experiments", "evaluate.py")
  out = tmp_path / "rl.json"
  proc = subprocess.run(
    [
      sys.executable,
      script,
      f"--workdir={workdir}/rlhf",
      f"--reference={workdir}/sft",
      f"--reward_model={workdir}/reward_model",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  results = json.loads(out.read_text())
  for key in (
    "loss",
    "perplexity",
    "qa_exact_match",
    "qa_accuracy",
    "qa_complete",
    "win_rate_gold",
    "kl_to_reference",
    "reward_score",
    "win_rate_reward",
  ):
    assert isinstance(results[key], float), key
  assert results["stage"] == "rlhf" and results["perplexity"] > 1
  out = tmp_path / "rm.json"
  proc = subprocess.run(
    [sys.executable, script, f"--workdir={workdir}/reward_model", f"--output={out}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  results = json.loads(out.read_text())
  assert 0 <= results["pair_accuracy"] <= 1 and 0 <= results["pair_accuracy_held_out_countries"] <= 1
  assert results["stage"] == "reward_model" and results["pairs"] > 100
  proc = subprocess.run(
    [sys.executable, script, f"--workdir={tmp_path}/nothing", "--output=x.json"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 2 and "is not an llm_jax workdir" in proc.stderr
