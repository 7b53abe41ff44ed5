"""The whole story on the built-in world-facts data: tokenizer → pretrain → SFT → reward model → RLHF → chat.

Each stage runs in its own workdir under the experiment's workdir, so a rerun resumes an unfinished stage and
only reloads a finished one. The report (REPORT.md, plots/*.png, results.json) shows what each phase did:

- pretraining teaches grammar and facts (loss), but the base model does not answer questions;
- SFT teaches the answer format on train countries; held-out countries are answered from pretraining alone;
- the reward model learns the gold judge's preferences from ranked pairs (held-out pair accuracy);
- RLHF moves the SFT policy toward complete answers (gold win-rate against SFT), at a stated KL;
- at the end, the seed question through the base, SFT and RLHF models, token by token (inspect/: top choices,
  attention, logit lens; llm_jax/inference/inspection.py). It only reads the models: results.json is unchanged.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from llm_jax import evaluation, sharding
from llm_jax.inference import inspection
from llm_jax.inference.loading import load_sampler
from llm_jax.metrics import read_metrics
from llm_jax.modeling import load_model
from llm_jax.tasks.world_facts import data as world_facts
from llm_jax.tasks.world_facts import evaluation as world_facts_evaluation
from llm_jax.train import pretrain, reward_model, rlhf, sft, stage

QUESTION = "Where is the capital of China?"


def _stage_dirs(workdir: str) -> dict[str, str]:
  return {name: os.path.join(workdir, name) for name in ("pretrain", "sft", "reward_model", "rlhf")}


def run_stages(
  config: ml_collections.ConfigDict, workdir: str, data: dict[str, str], through: str = "rlhf", devices=None
) -> dict[str, str]:
  """Runs (or resumes, or reloads when finished) the stages up to and including `through`, on `devices` (default:
  all)."""
  dirs = _stage_dirs(workdir)
  print("=== 1/4 pretraining: next-token prediction on the world-facts corpus", flush=True)
  pretrain.run(config.pretrain, dirs["pretrain"], devices=devices)

  print("=== 2/4 SFT: capital questions about the train countries", flush=True)
  with config.unlocked():
    config.sft.init_from, config.sft.data.path = dirs["pretrain"], data["sft"]
    config.sft.data.eval_path = data["sft_held_out"]  # Exact match on countries SFT never saw.
    config.reward_model.init_from = dirs["sft"]
    config.reward_model.data.path, config.reward_model.data.eval_path = data["pairs"], data["pairs_held_out"]
    config.rlhf.init_from, config.rlhf.reward_model = dirs["sft"], dirs["reward_model"]
    config.rlhf.data.path = data["prompts"]
  sft.run(config.sft, dirs["sft"], devices=devices)
  print("=== 3/4 reward model: Bradley-Terry on pairs ranked by the gold judge", flush=True)
  reward_model.run(config.reward_model, dirs["reward_model"], devices=devices)
  if through == "reward_model":
    return dirs
  print(f"=== 4/4 RLHF ({config.rlhf.algorithm}) against the reward model", flush=True)
  rlhf.run(config.rlhf, dirs["rlhf"], devices=devices)
  return dirs


def evaluate_all(dirs: dict[str, str], data: dict[str, str], mesh, seed: int) -> dict[str, float]:
  results: dict[str, float] = {}
  grades = {}
  samplers = {}
  for name in ("pretrain", "sft", "rlhf"):
    sampler, tokenizer, _ = load_sampler(dirs[name], mesh)
    samplers[name] = sampler
    countries, questions, replies, grades[name] = world_facts_evaluation.held_out_qa(sampler, tokenizer, seed)
    for key, value in world_facts_evaluation.qa_summary(grades[name]).items():
      results[f"{name}/{key}"] = value
    results[f"{name}/example"] = f"{questions[0]} → {replies[0]}"
  prompt_sets = {
    "held_out_prompts": world_facts.held_out_prompts(world_facts.split_countries(seed)[0], seed),
    "held_out_countries": list(zip(countries, questions)),
  }
  for set_name, pairs in prompt_sets.items():
    rates = world_facts_evaluation.gold_win_rates(samplers["rlhf"], samplers["sft"], tokenizer, *zip(*pairs), seed=seed)
    results.update({f"rlhf_vs_sft/{set_name}/{k}": v for k, v in rates.items()})
  ref_state, ref_params, _ = load_model(dirs["sft"], mesh)
  results["rlhf/kl_to_sft"] = evaluation.kl_to_reference(samplers["rlhf"], ref_state, ref_params, tokenizer, questions)
  rm_rows = [r for r in read_metrics(dirs["reward_model"]) if "eval_accuracy" in r]
  results["reward_model/held_out_accuracy"] = rm_rows[-1]["eval_accuracy"]
  results["reward_model/held_out_accuracy_at_start"] = rm_rows[0]["eval_accuracy"]
  rm_state, rm_params, _ = reward_model.load_reward_model(dirs["reward_model"], mesh)
  countries = evaluation.pair_accuracy(
    rm_state, rm_params, tokenizer, reward_model.read_pairs(data["pairs_held_out_countries"]), mesh
  )
  results["reward_model/held_out_countries_accuracy"] = countries["pair_accuracy"]
  return results


def plot(dirs: dict[str, str], out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  panels = [
    ("pretrain", "pretraining loss", ["loss", "eval_loss"]),
    ("sft", "SFT loss", ["loss", "eval_loss"]),
    ("sft", "SFT held-out exact match", ["eval_exact_match"]),
    ("reward_model", "reward-model pair accuracy", ["accuracy", "eval_accuracy"]),
    ("rlhf", "RLHF reward-model score", ["score"]),
    ("rlhf", "RLHF KL to SFT (per answer)", ["kl_k1", "kl_k3"]),
  ]
  paths = []
  for name, title, keys in panels:
    rows = read_metrics(dirs[name])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in keys:
      points = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("iteration" if name == "rlhf" else "step")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_{keys[0]}.png".replace("/", "_"))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


INSPECTED = (("base (pretrained)", "pretrain"), ("SFT", "sft"), ("RLHF", "rlhf"))


def inspect_seed_question(dirs: dict[str, str], mesh, out_dir: str) -> dict[str, dict]:
  """The seed question through each model as the report's answers are produced (greedy, chat), written to
  out_dir/NAME/ (INSPECT.md, inspect.json, figures). Seconds: one generation and one forward pass per model."""
  inspections = {}
  for _, name in INSPECTED:
    inspections[name] = inspection.inspect_workdir(
      dirs[name], mesh, prompt=QUESTION, chat=True, sampling=evaluation.ANSWER, key=jax.random.key(0)
    )
    inspection.write(inspections[name], os.path.join(out_dir, name))
  return inspections


def write_report(
  workdir: str,
  results: dict,
  plots: list[str],
  seconds: float,
  mesh: jax.sharding.Mesh,
  inspections: dict[str, dict] | None = None,
) -> str:
  """REPORT.md; `mesh`: what the experiment ran on."""
  table = [("base (pretrained)", "pretrain"), ("SFT", "sft"), ("RLHF", "rlhf")]
  lines = [
    "# World-facts experiment",
    "",
    "Held-out countries never appear in SFT, preference or RL data: answering them needs facts learned "
    "in pretraining. Grades come from the gold judge (llm_jax/tasks/world_facts/data.py).",
    "",
    "| model | held-out QA accuracy (correct capital) | complete answers | example |",
    "| --- | --- | --- | --- |",
  ]
  for label, key in table:
    lines.append(
      f"| {label} | {results[f'{key}/qa_accuracy']:.1%} | {results[f'{key}/qa_complete']:.1%} | "
      f"{results[f'{key}/example']} |"
    )
  lines += [
    "",
    f"- reward model, held-out pair accuracy: {results['reward_model/held_out_accuracy']:.1%} "
    f"(at start: {results['reward_model/held_out_accuracy_at_start']:.1%}) on new comparisons "
    f"about the train countries; {results['reward_model/held_out_countries_accuracy']:.1%} on "
    "pairs about the held-out countries",
    "- RLHF vs SFT gold win-rate (ties count ½), 4 sampled answers (temperature 1) per question; greedy "
    "answers in brackets:",
    f"  - held-out prompts (each train country asked in a phrasing RL never saw): "
    f"{results['rlhf_vs_sft/held_out_prompts/gold_win_rate']:.1%} "
    f"({results['rlhf_vs_sft/held_out_prompts/gold_win_rate_greedy']:.1%})",
    f"  - held-out countries (in no SFT, preference or RL data): "
    f"{results['rlhf_vs_sft/held_out_countries/gold_win_rate']:.1%} "
    f"({results['rlhf_vs_sft/held_out_countries/gold_win_rate_greedy']:.1%})",
    f"- RLHF mean KL to the SFT model: {results['rlhf/kl_to_sft']:.3f} nats per answer",
    f"- wall time: {seconds / 60:.1f} min on {mesh.size} × {mesh.devices.flat[0].platform}",
    "",
    f"**{QUESTION}** → {results['answer']}",
    "",
  ]
  lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots]
  if inspections:
    lines += [
      "",
      f"## How each model picks its tokens: {QUESTION}",
      "",
      "Greedy, as the answers above; each number is from the model's own forward pass (token by token: "
      + ", ".join(f"[{label}](inspect/{name}/INSPECT.md)" for label, name in INSPECTED)
      + "). Probabilities are the softmax of the logits with role tokens banned, as the sampler draws; the logit "
      "lens reads the residual stream after each layer through the final norm and the LM head.",
      "",
      *inspection.comparison_markdown([(label, inspections[name], f"inspect/{name}") for label, name in INSPECTED]),
    ]
  path = os.path.join(workdir, "REPORT.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return path


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """The whole experiment on `devices` (default: all); returns results.json's contents."""
  import time

  start = time.perf_counter()
  stage.make_workdir(workdir)
  data = world_facts.write_all(os.path.join(workdir, "data"), seed=config.seed, **config.data)
  dirs = run_stages(config, workdir, data, devices=devices)
  mesh = sharding.make_mesh(devices=devices)
  print("=== evaluation", flush=True)
  results = evaluate_all(dirs, data, mesh, config.seed)
  sampler, tokenizer, _ = load_sampler(dirs["rlhf"], mesh)
  print(f"\nuser: {QUESTION}\nassistant: ", end="", flush=True)
  answer = sampler.complete(
    tokenizer,
    [QUESTION],
    evaluation.ANSWER,
    jax.random.key(0),
    chat=True,
    stream=lambda piece: print(piece, end="", flush=True),
  )[0]
  print("\n", flush=True)
  results["answer"] = answer.strip()
  plots = plot(dirs, os.path.join(workdir, "plots"))
  print("=== inspection: the seed question token by token", flush=True)
  inspections = inspect_seed_question(dirs, mesh, os.path.join(workdir, "inspect"))
  report = write_report(workdir, results, plots, time.perf_counter() - start, mesh, inspections)
  print(open(report).read().split("![")[0], flush=True)
  print(f"report: {report}", flush=True)
  return results
