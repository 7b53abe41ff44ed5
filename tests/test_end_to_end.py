"""The whole pipeline on a micro config (each stage's learning signal), evaluate.py's JSON, and the alignment study.

The module shares one pipeline (a module fixture); setup.cfg's `--dist loadfile` keeps a module on one pytest-xdist
worker, so the pipeline is trained once, not once per worker.
"""

import contextlib
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from conftest import run_tools  # tests/conftest.py: tools run from one process.

from llm_jax.metrics import read_metrics
from llm_jax.tasks.world_facts import alignment_study, end_to_end
from llm_jax.tasks.world_facts import data as world_facts
from llm_jax.train import dpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import alignment_study as study_config  # noqa: E402
import end_to_end as e2e_config  # noqa: E402

# The micro runs judge their models on every EVAL_STRIDE-th evaluation question (held-out countries: 1 of the 10
# phrasings of every other one of the 33 countries; held-out prompts: 20 of 390). The judge, the win-rates, the
# report and the records are the same code; only the question lists are shorter (answer generation is most of these
# tests' time).
EVAL_STRIDE = 20
# The micro pipeline and study run data-parallel on 2 of the 8 simulated devices: still a sharded run end to end,
# at about 3/4 of the time 8 devices on 2 cores take (mesh invariance has its own tests).
DEVICES = 2


@contextlib.contextmanager
def fewer_evaluation_questions():
  full_questions, full_prompts = world_facts.held_out_questions, world_facts.held_out_prompts
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(world_facts, "held_out_questions", lambda *a, **k: full_questions(*a, **k)[::EVAL_STRIDE])
    patch.setattr(world_facts, "held_out_prompts", lambda *a, **k: full_prompts(*a, **k)[::EVAL_STRIDE])
    yield


def micro_config():
  config = e2e_config.get_config()
  p = config.pretrain
  p.model, p.data.tokenizer, p.data.builtin_documents = "tiny", "char", 400
  p.steps, p.batch_size, p.seq_len, p.warmup_steps, p.eval_every, p.log_every = 80, 16, 64, 10, 80, 10
  s = config.sft
  s.steps, s.batch_size, s.seq_len, s.warmup_steps, s.eval_every, s.log_every = 30, 16, 96, 5, 30, 10
  s.exact_match_examples, s.max_answer_tokens = 8, 16
  r = config.reward_model
  # The micro base model knows too little for its reward model to rank the world-facts pairs (its train loss stayed
  # at chance, 0.61-0.84 over 12 runs of lr, batch and seed): this stage checks the wiring, and
  # tests/test_rlhf.py::test_reward_model_learns_synthetic_preferences its learning signal.
  r.steps, r.batch_size, r.seq_len, r.warmup_steps, r.eval_every, r.log_every = 20, 16, 128, 5, 20, 5
  r.learning_rate = 3e-3
  l = config.rlhf
  l.iterations, l.prompts_per_iteration, l.minibatch_size, l.max_new_tokens, l.ppo_epochs = 3, 8, 8, 8, 1
  return config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("e2e"))
  with fewer_evaluation_questions():
    return workdir, end_to_end.run(micro_config(), workdir, devices=jax.devices()[:DEVICES])


def test_every_stage_shows_its_learning_signal(pipeline):
  workdir, results = pipeline
  stage = lambda name: read_metrics(os.path.join(workdir, name))
  pre = [r["loss"] for r in stage("pretrain") if "loss" in r]
  assert pre[-1] < pre[0] - 1.0  # Next-token loss falls.
  sft_eval = [r["eval_loss"] for r in stage("sft") if "eval_loss" in r]
  assert sft_eval[-1] < sft_eval[0]  # Held-out assistant-token loss falls (step 0 is the base model).
  rm_eval = [r["eval_loss"] for r in stage("reward_model") if "eval_loss" in r]
  rm_train = [r["loss"] for r in stage("reward_model") if "loss" in r]
  assert rm_eval[0] == pytest.approx(math.log(2), rel=1e-3)  # The zero head starts at chance and then trains.
  assert len(rm_eval) == 2 and len(rm_train) == 4 and all(map(math.isfinite, rm_train + rm_eval)), (rm_train, rm_eval)
  assert rm_eval[-1] != rm_eval[0]
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
  rl_json, rm_json = tmp_path / "rl.json", tmp_path / "rm.json"
  rl, rm, missing = run_tools(
    [
      (
        "evaluate",
        [
          f"--workdir={workdir}/rlhf",
          f"--reference={workdir}/sft",
          f"--reward_model={workdir}/reward_model",
          f"--output={rl_json}",
        ],
      ),
      ("evaluate", [f"--workdir={workdir}/reward_model", f"--output={rm_json}"]),
      ("evaluate", [f"--workdir={tmp_path}/nothing", f"--output={tmp_path}/x.json"]),
    ]
  )
  assert rl["code"] == 0, rl["stderr"]
  results = json.loads(rl_json.read_text())
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
  assert rm["code"] == 0, rm["stderr"]
  results = json.loads(rm_json.read_text())
  assert 0 <= results["pair_accuracy"] <= 1 and 0 <= results["pair_accuracy_held_out_countries"] <= 1
  assert results["stage"] == "reward_model" and results["pairs"] > 100
  assert missing["code"] == 2 and "is not an llm_jax workdir" in missing["stderr"]


def test_mean_and_spread_and_the_gold_peak_match_numpy():
  values = [0.25, 0.5, 1.0]
  stat = alignment_study.mean_and_spread(values)
  assert stat["mean"] == pytest.approx(np.mean(values)) and stat["std"] == pytest.approx(np.std(values, ddof=1))
  points = {
    seed: [
      {"iteration": i, "kl_to_sft": kl, "gold_score": gold + seed * 0.1, "proxy_score": kl * 2}
      for i, (kl, gold) in enumerate([(0.0, 1.0), (0.25, 1.5), (1.0, 1.2)])
    ]
    for seed in (0, 1)
  }
  curve = alignment_study.overopt_curve(points)
  assert [c["sqrt_kl"]["mean"] for c in curve] == pytest.approx([0.0, 0.5, 1.0])
  assert curve[1]["gold_score"]["mean"] == pytest.approx(1.55)
  assert curve[1]["gold_score"]["std"] == pytest.approx(np.std([1.5, 1.6], ddof=1))
  assert alignment_study.gold_peak(curve) == 1


def test_the_study_runs_every_method_and_reports_spread_over_seeds(pipeline, tmp_path, monkeypatch):
  workdir, _ = pipeline
  computed = []  # DPO reference log-probs computed: once, for the first seed; the other seeds reuse them.
  compute = dpo.compute_reference_log_probs
  monkeypatch.setattr(dpo, "compute_reference_log_probs", lambda *a, **k: computed.append(1) or compute(*a, **k))
  config = study_config.get_config()
  config.end_to_end = micro_config()
  config.seeds = (0, 1)
  config.end_to_end.rlhf.iterations = 2
  config.dpo.steps, config.dpo.batch_size, config.dpo.seq_len, config.dpo.eval_every = 4, 8, 128, 4
  config.dpo.warmup_steps = 1
  config.overopt.iterations, config.overopt.every = 2, 1
  with fewer_evaluation_questions():
    result = alignment_study.run(config, workdir, devices=jax.devices()[:DEVICES])

  for method in ("ppo", "grpo", "rloo", "dpo"):
    runs = result["runs"][method]
    assert sorted(runs) == [0, 1]
    win = [runs[s]["held_out_prompts/gold_win_rate"] for s in (0, 1)]
    stat = result["summary"][method]["held_out_prompts/gold_win_rate"]
    assert stat["mean"] == pytest.approx(np.mean(win)) and stat["n"] == 2
    assert all(0 <= w <= 1 for w in win) and runs[0]["wall_seconds"] > 0 and runs[0]["trained_tokens"] > 0
  assert result["runs"]["grpo"][0]["generated_tokens"] > 0 and result["runs"]["dpo"][0]["generated_tokens"] == 0
  assert len(computed) == 1
  curve = result["overoptimisation"]["curve"]
  assert [c["iteration"]["mean"] for c in curve] == [0, 1, 2] and curve[0]["sqrt_kl"]["mean"] < 0.05
  report = open(os.path.join(workdir, "STUDY.md")).read()
  for text in ("| PPO |", "| GRPO |", "| RLOO |", "| DPO |", "gold peak", "± "):
    assert text in report, text
  assert sorted(os.listdir(os.path.join(workdir, "study_plots"))) == ["overoptimisation.png", "win_rates.png"]
  assert json.load(open(os.path.join(workdir, "study.json")))["summary"].keys() == result["summary"].keys()

  # A rerun trains and evaluates nothing again: every run and evaluation is recorded.
  before = {p: os.path.getmtime(p) for p in _records(workdir)}
  with fewer_evaluation_questions():
    assert alignment_study.run(config, workdir, devices=jax.devices()[:DEVICES])["summary"] == result["summary"]
  assert {p: os.path.getmtime(p) for p in _records(workdir)} == before


def _records(workdir):
  study = os.path.join(workdir, "alignment_study")
  return [
    os.path.join(study, d, f)
    for d in os.listdir(study)
    for f in os.listdir(os.path.join(study, d))
    if f.startswith("study_")
  ]
