"""The alignment study: PPO, GRPO, RLOO and DPO from one SFT model, judged by the gold rule the reward model never
sees, and reward over-optimisation measured against it (Gao et al. 2022).

    workdir/{pretrain,sft,reward_model}   the end-to-end experiment's stages (reused; run if absent)
    workdir/alignment_study/METHOD_seedS  one run per method and seed, all from the same SFT model and data
    workdir/alignment_study/overopt_seedS a long PPO run with a weak KL penalty, checkpointed along the way
    workdir/STUDY.md, study.json, study_plots/

Every method gets the same rollout budget (answers sampled per iteration and iterations: GRPO and RLOO ask fewer
prompts, `group_size` answers each) and the same KL coefficient; DPO trains on the reward model's ranked pairs.
The seed changes what each run samples and the order of its data; the SFT and reward models are shared, so the
spread is that of the alignment method alone.

Each finished run and each evaluation is recorded in its directory (`study_run.json`, `study_eval.json`), so a
rerun of the study only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import ml_collections
import numpy as np

from llm_jax import evaluation, sharding
from llm_jax.files import write_atomically
from llm_jax.inference.loading import load_sampler
from llm_jax.metrics import read_metrics
from llm_jax.modeling import load_model
from llm_jax.tasks.world_facts import data as world_facts
from llm_jax.tasks.world_facts import end_to_end
from llm_jax.tasks.world_facts import evaluation as world_facts_evaluation
from llm_jax.tokenizer import load_tokenizer
from llm_jax.train import dpo, reward_model, rlhf

RL_METHODS = ("ppo", "grpo", "rloo")
METHODS = (*RL_METHODS, "dpo")
SAMPLES_PER_QUESTION = 4  # Sampled answers per question for the gold win-rates (as the end-to-end report).


# ---------------------------------------------------------------------------------------------------------
# The runs.


def method_config(
  config: ml_collections.ConfigDict, method: str, seed: int, dirs: dict[str, str], data: dict[str, str]
) -> ml_collections.ConfigDict:
  """The stage config of one run: the end-to-end RLHF config (or the study's DPO config) from the SFT model."""
  if method == "dpo":
    run_config = ml_collections.ConfigDict(config.dpo.to_dict())
    run_config.init_from = dirs["sft"]
    run_config.data.path, run_config.data.eval_path = data["pairs"], data["pairs_held_out"]
  else:
    run_config = ml_collections.ConfigDict(config.end_to_end.rlhf.to_dict())
    run_config.algorithm = method
    if method != "ppo":  # The same answers per iteration: fewer prompts, group_size answers each.
      run_config.group_size = config.group_size
      run_config.prompts_per_iteration = config.end_to_end.rlhf.prompts_per_iteration // config.group_size
    run_config.init_from, run_config.reward_model = dirs["sft"], dirs["reward_model"]
    run_config.data.path = data["prompts"]
  run_config.seed = seed
  return run_config


def overopt_config(config, seed: int, dirs: dict[str, str], data: dict[str, str]) -> ml_collections.ConfigDict:
  """A long PPO run with a weak KL penalty, checkpointed every `overopt.every` iterations (all kept)."""
  run_config = method_config(config, "ppo", seed, dirs, data)
  run_config.iterations = config.overopt.iterations
  run_config.kl_coef = config.overopt.kl_coef
  run_config.checkpoint_every = config.overopt.every
  run_config.keep_checkpoints = config.overopt.iterations // config.overopt.every + 1
  return run_config


def _record(path: str, compute) -> dict:
  """The JSON at `path` if an earlier run wrote it, else `compute()` written there."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  write_atomically(path, json.dumps(result, indent=2, sort_keys=True))
  return result


def run_method(method: str, run_config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains one run on `devices` (resuming it if interrupted); returns its wall time and the tokens it processed."""

  def train() -> dict:
    start = time.perf_counter()
    if method == "dpo":
      dpo.run(run_config, workdir, devices=devices)
    else:
      rlhf.run(run_config, workdir, devices=devices)
    return {"wall_seconds": time.perf_counter() - start, **tokens_processed(method, run_config, workdir)}

  return _record(os.path.join(workdir, "study_run.json"), train)


def share_dpo_reference(first_run_dir: str, run_dir: str) -> None:
  """Every seed's DPO run has the same reference values (the SFT model on the same pairs): a later seed starts
  with the first seed's copy instead of computing them again. dpo.reference_log_probs still checks the copy's
  fingerprint and computes its own values if anything they depend on differs."""
  source, target = (os.path.join(d, dpo.REFERENCE_FILE) for d in (first_run_dir, run_dir))
  if os.path.exists(source) and not os.path.exists(target):
    with open(source, "rb") as f:
      write_atomically(target, f.read())


def tokens_processed(method: str, run_config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """generated_tokens: answer tokens sampled in rollouts; trained_tokens: tokens (no padding) of the sequences in
  the policy's training passes (RL: prompt + answer, `ppo_epochs` times per rollout; DPO: chosen + rejected)."""
  if method == "dpo":
    pairs = reward_model.read_pairs(run_config.data.path)
    rows, _ = reward_model.pair_arrays(pairs, load_tokenizer(workdir), run_config.seq_len)
    mean_pair = float(
      ((rows["chosen_segment_ids"] != 0).sum() + (rows["rejected_segment_ids"] != 0).sum()) / len(rows["pair_mask"])
    )
    return {"generated_tokens": 0.0, "trained_tokens": run_config.steps * run_config.batch_size * mean_pair}
  rows = [r for r in read_metrics(workdir) if "response_length" in r]
  rollout = run_config.prompts_per_iteration * (run_config.group_size if method != "ppo" else 1)
  generated = sum(r["response_length"] for r in rows) * rollout
  prompt_tokens = sum(r.get("prompt_length", 0.0) for r in rows) * rollout
  return {"generated_tokens": generated, "trained_tokens": (generated + prompt_tokens) * run_config.ppo_epochs}


# ---------------------------------------------------------------------------------------------------------
# Evaluation by the gold judge.


@dataclasses.dataclass
class Judge:
  """What every policy is measured with: the prompt sets, the SFT model (the baseline and the KL reference), the
  reward model (over-optimisation) and the tokenizer."""

  mesh: object
  tokenizer: object
  sft_sampler: object
  sft_spec: object
  sft_params: object
  rm_spec: object
  rm_params: object
  prompt_sets: dict  # name → (countries, questions)
  held_out_questions: list[str]
  _sft_grades: dict = dataclasses.field(default_factory=dict)

  def sampled_grades(self, sampler, set_name: str, seed: int) -> tuple[list[int], list[str], list[str]]:
    """Gold grades of SAMPLES_PER_QUESTION answers per question at temperature 1 (+ the questions and answers)."""
    countries, questions = self.prompt_sets[set_name]
    repeated_q = [q for q in questions for _ in range(SAMPLES_PER_QUESTION)]
    repeated_c = [c for c in countries for _ in range(SAMPLES_PER_QUESTION)]
    sampling = dataclasses.replace(evaluation.ANSWER, temperature=1.0)
    replies = evaluation.answers(sampler, self.tokenizer, repeated_q, sampling, seed)
    return world_facts_evaluation.gold_grades(repeated_c, replies), repeated_q, replies

  def greedy_grades(self, sampler, set_name: str) -> list[int]:
    countries, questions = self.prompt_sets[set_name]
    return world_facts_evaluation.gold_grades(countries, evaluation.answers(sampler, self.tokenizer, questions))

  def sft_grades(self, set_name: str, seed: int, greedy: bool) -> list[int]:
    key = (set_name, seed, greedy)
    if key not in self._sft_grades:
      self._sft_grades[key] = (
        self.greedy_grades(self.sft_sampler, set_name)
        if greedy
        else self.sampled_grades(self.sft_sampler, set_name, seed + 1)[0]
      )
    return self._sft_grades[key]

  def kl_to_sft(self, sampler, seed: int) -> float:
    return evaluation.kl_to_reference(
      sampler, self.sft_spec, self.sft_params, self.tokenizer, self.held_out_questions, seed=seed
    )

  def evaluate_policy(self, sampler, seed: int) -> dict[str, float]:
    """The study's table row: gold win-rates vs SFT (sampled and greedy, both prompt sets), held-out QA (the
    greedy answers to the held-out countries' questions, as the end-to-end report grades them), KL to SFT."""
    results = {}
    for set_name in self.prompt_sets:
      # Same convention as the end-to-end report: the policy samples with `seed`, SFT with seed + 1.
      grades = self.sampled_grades(sampler, set_name, seed)[0]
      results[f"{set_name}/gold_win_rate"] = evaluation.win_rate(grades, self.sft_grades(set_name, seed, False))
      greedy = self.greedy_grades(sampler, set_name)
      results[f"{set_name}/gold_win_rate_greedy"] = evaluation.win_rate(greedy, self.sft_grades(set_name, seed, True))
      if set_name == "held_out_countries":
        results.update({f"held_out_qa/{k}": v for k, v in world_facts_evaluation.qa_summary(greedy).items()})
    results["kl_to_sft"] = self.kl_to_sft(sampler, seed)
    return results

  def gold_and_proxy(self, sampler, seed: int) -> dict[str, float]:
    """One point of the over-optimisation curve: mean gold grade and mean reward-model score of the same sampled
    answers to the held-out prompts, and the KL to SFT."""
    grades, questions, replies = self.sampled_grades(sampler, "held_out_prompts", seed)
    scores = evaluation.reward_scores(self.rm_spec, self.rm_params, self.tokenizer, questions, replies, self.mesh)
    kl = self.kl_to_sft(sampler, seed)
    return {"gold_score": float(np.mean(grades)), "proxy_score": float(np.mean(scores)), "kl_to_sft": kl}


def make_judge(dirs: dict[str, str], data_seed: int, mesh) -> Judge:
  train, held_out = world_facts.split_countries(data_seed)
  held_out_countries = world_facts.held_out_questions(held_out)
  prompt_sets = {
    "held_out_prompts": tuple(zip(*world_facts.held_out_prompts(train, data_seed))),
    "held_out_countries": tuple(zip(*held_out_countries)),
  }
  sft_sampler, tokenizer, _ = load_sampler(dirs["sft"], mesh)
  sft_spec, sft_params, _ = load_model(dirs["sft"], mesh)
  rm_spec, rm_params, _ = reward_model.load_reward_model(dirs["reward_model"], mesh)
  return Judge(
    mesh,
    tokenizer,
    sft_sampler,
    sft_spec,
    sft_params,
    rm_spec,
    rm_params,
    prompt_sets,
    [q for _, q in held_out_countries],
  )


# ---------------------------------------------------------------------------------------------------------
# Aggregation and the report.


def mean_and_spread(values: list[float]) -> dict[str, float]:
  """Mean, sample standard deviation (ddof 1) and count over seeds."""
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(per_run: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
  """method → metric → mean/std/n over the seeds."""
  return {
    method: {key: mean_and_spread([row[key] for row in runs.values()]) for key in next(iter(runs.values()))}
    for method, runs in per_run.items()
  }


def overopt_curve(points: dict[int, list[dict[str, float]]]) -> list[dict[str, dict[str, float]]]:
  """Per checkpoint index (same iteration in every seed): mean/std of √KL, gold and proxy scores over seeds."""
  num = min(len(p) for p in points.values())
  curve = []
  for i in range(num):
    rows = [p[i] for p in points.values()]
    curve.append(
      {
        "iteration": {"mean": rows[0]["iteration"], "std": 0.0, "n": len(rows)},
        "sqrt_kl": mean_and_spread([math.sqrt(max(r["kl_to_sft"], 0.0)) for r in rows]),
        "gold_score": mean_and_spread([r["gold_score"] for r in rows]),
        "proxy_score": mean_and_spread([r["proxy_score"] for r in rows]),
      }
    )
  return curve


def gold_peak(curve: list[dict]) -> int:
  """Index of the checkpoint where the mean gold score peaks (the first, on ties)."""
  return int(np.argmax([c["gold_score"]["mean"] for c in curve]))


def _fmt(stat: dict[str, float], percent: bool = False, digits: int = 3) -> str:
  if percent:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f} %"
  return f"{stat['mean']:.{digits}g} ± {stat['std']:.2g}"


TABLE_COLUMNS = (
  ("held_out_prompts/gold_win_rate", "win-rate vs SFT, held-out prompts: sampled", True),
  ("held_out_prompts/gold_win_rate_greedy", "(greedy)", True),
  ("held_out_countries/gold_win_rate", "held-out countries: sampled", True),
  ("held_out_countries/gold_win_rate_greedy", "(greedy)", True),
  ("held_out_qa/qa_accuracy", "held-out QA (right capital)", True),
  ("held_out_qa/qa_complete", "complete answers", True),
  ("kl_to_sft", "KL to SFT (nats/answer)", False),
  ("wall_seconds", "wall time (s)", False),
  ("generated_tokens", "tokens generated", False),
  ("trained_tokens", "tokens trained on", False),
)


def plot(summary: dict, curve: list[dict], out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  methods = list(summary)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, title in (
    (axes[0], "held_out_prompts/gold_win_rate", "gold win-rate vs SFT (held-out prompts)"),
    (axes[1], "held_out_countries/gold_win_rate", "gold win-rate vs SFT (held-out countries)"),
  ):
    means = [summary[m][key]["mean"] for m in methods]
    stds = [summary[m][key]["std"] for m in methods]
    ax.bar(methods, means, yerr=stds, capsize=4, color="tab:blue")
    ax.axhline(0.5, color="gray", lw=1, ls="--")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "win_rates.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)

  fig, ax_gold = plt.subplots(figsize=(5.5, 3.6))
  x = [c["sqrt_kl"]["mean"] for c in curve]
  x_err = [c["sqrt_kl"]["std"] for c in curve]
  ax_gold.errorbar(
    x, [c["gold_score"]["mean"] for c in curve], yerr=[c["gold_score"]["std"] for c in curve], xerr=x_err,
    marker="o", color="tab:green", label="gold score (judge, 0-2)", capsize=3,
  )  # fmt: skip
  ax_proxy = ax_gold.twinx()
  ax_proxy.errorbar(
    x, [c["proxy_score"]["mean"] for c in curve], yerr=[c["proxy_score"]["std"] for c in curve], xerr=x_err,
    marker="s", color="tab:orange", label="reward-model score", capsize=3,
  )  # fmt: skip
  peak = gold_peak(curve)
  ax_gold.axvline(x[peak], color="tab:green", ls=":", lw=1)
  ax_gold.annotate("gold peak", (x[peak], curve[peak]["gold_score"]["mean"]), textcoords="offset points", xytext=(4, 6))
  ax_gold.set_xlabel("√KL(π ‖ π_SFT)  (√nats per answer)")
  ax_gold.set_ylabel("gold score", color="tab:green")
  ax_proxy.set_ylabel("reward-model score", color="tab:orange")
  ax_gold.set_title("reward over-optimisation (PPO, weak KL penalty)", fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "overoptimisation.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def write_report(workdir: str, config, summary: dict, curve: list[dict], plots: list[str], seconds: float, mesh) -> str:
  """STUDY.md; `mesh`: what the study ran on."""
  seeds = len(config.seeds)
  lines = [
    "# Alignment study: PPO vs GRPO vs RLOO vs DPO, and reward over-optimisation",
    "",
    f"All methods start from the same SFT model and use the same data; figures are mean ± standard deviation over "
    f"{seeds} seeds (the seed changes each run's samples and data order). Win-rates are by the gold judge, which the "
    f"reward model never sees (ties count ½); {SAMPLES_PER_QUESTION} sampled answers (temperature 1) per question, "
    "greedy in the next column. RL methods sample the same number of answers per iteration "
    f"({config.end_to_end.rlhf.prompts_per_iteration}; GRPO/RLOO: "
    f"{config.end_to_end.rlhf.prompts_per_iteration // config.group_size} prompts × {config.group_size}) for "
    f"{config.end_to_end.rlhf.iterations} iterations at β = {config.end_to_end.rlhf.kl_coef}; DPO trains "
    f"{config.dpo.steps} steps on the reward model's ranked pairs (loss {config.dpo.loss}, β = {config.dpo.beta}).",
    "",
    "| method | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
    "| --- |" + " --- |" * len(TABLE_COLUMNS),
  ]
  for method, stats in summary.items():
    cells = [_fmt(stats[key], percent) if key in stats else "n/a" for key, _, percent in TABLE_COLUMNS]
    lines.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
  peak = gold_peak(curve)
  last = curve[-1]
  lines += [
    "",
    "## Reward over-optimisation",
    "",
    f"PPO with β = {config.overopt.kl_coef} for {config.overopt.iterations} iterations, evaluated every "
    f"{config.overopt.every}: the gold score (mean grade 0-2 of sampled answers to the held-out prompts) and the "
    "reward model's score of the same answers, against √KL to SFT.",
    "",
    "| iteration | √KL | gold score | reward-model score |",
    "| --- | --- | --- | --- |",
  ]
  for i, c in enumerate(curve):
    mark = " **(gold peak)**" if i == peak else ""
    lines.append(
      f"| {int(c['iteration']['mean'])}{mark} | {_fmt(c['sqrt_kl'])} | {_fmt(c['gold_score'])} | "
      f"{_fmt(c['proxy_score'])} |"
    )
  rise = last["proxy_score"]["mean"] - curve[peak]["proxy_score"]["mean"]
  fall = curve[peak]["gold_score"]["mean"] - last["gold_score"]["mean"]
  if peak < len(curve) - 1 and fall > 0:
    verdict = (
      f"The gold score peaks at √KL ≈ {curve[peak]['sqrt_kl']['mean']:.2f} (iteration "
      f"{int(curve[peak]['iteration']['mean'])}); beyond it the reward model's score changes by {rise:+.3g} while "
      f"the gold score falls by {fall:.3g}: optimising the proxy past that point hurts the true objective."
    )
  else:
    verdict = (
      "The gold score did not peak before the end of the run: no over-optimisation within "
      f"√KL ≤ {last['sqrt_kl']['mean']:.2f}."
    )
  where = f"{mesh.size} × {mesh.devices.flat[0].platform}"
  lines += [
    "",
    verdict,
    "",
    f"Wall time of this invocation: {seconds / 60:.1f} min on {where} (runs that an earlier invocation finished "
    "are reused, with their recorded times in the table).",
    "",
  ]
  lines += [f"![{os.path.basename(p)}](study_plots/{os.path.basename(p)})" for p in plots]
  path = os.path.join(workdir, "STUDY.md")
  write_atomically(path, "\n".join(lines) + "\n")
  return path


# ---------------------------------------------------------------------------------------------------------
# The study.


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """The study on `devices` (default: all); returns study.json's contents."""
  start = time.perf_counter()
  e2e = config.end_to_end
  data = world_facts.write_all(os.path.join(workdir, "data"), seed=e2e.seed, **e2e.data)
  dirs = end_to_end.run_stages(e2e, workdir, data, through="reward_model", devices=devices)
  study_dir = os.path.join(workdir, "alignment_study")
  mesh = sharding.make_mesh(devices=devices)
  judge = make_judge(dirs, e2e.seed, mesh)

  per_run: dict[str, dict[int, dict[str, float]]] = {m: {} for m in config.methods}
  for seed in config.seeds:
    for method in config.methods:
      run_dir = os.path.join(study_dir, f"{method}_seed{seed}")
      print(f"=== alignment study: {method} seed {seed}", flush=True)
      if method == "dpo" and seed != config.seeds[0]:
        share_dpo_reference(os.path.join(study_dir, f"dpo_seed{config.seeds[0]}"), run_dir)
      record = run_method(method, method_config(config, method, seed, dirs, data), run_dir, devices)

      def evaluate(run_dir=run_dir, seed=seed):
        sampler, _, _ = load_sampler(run_dir, mesh)
        return judge.evaluate_policy(sampler, seed)

      per_run[method][seed] = {**record, **_record(os.path.join(run_dir, "study_eval.json"), evaluate)}
      print(f"    {json.dumps(per_run[method][seed])}", flush=True)

  points: dict[int, list[dict[str, float]]] = {}
  for seed in config.seeds:
    run_dir = os.path.join(study_dir, f"overopt_seed{seed}")
    print(f"=== over-optimisation: PPO β={config.overopt.kl_coef}, seed {seed}", flush=True)
    run_method("ppo", overopt_config(config, seed, dirs, data), run_dir, devices)

    def curve_points(run_dir=run_dir, seed=seed) -> dict:
      rows = [{"iteration": 0, **judge.gold_and_proxy(judge.sft_sampler, seed)}]
      for step in range(config.overopt.every, config.overopt.iterations + 1, config.overopt.every):
        sampler, _, _ = load_sampler(run_dir, mesh, step)
        rows.append({"iteration": step, **judge.gold_and_proxy(sampler, seed)})
      return {"points": rows}

    points[seed] = _record(os.path.join(run_dir, "study_curve.json"), curve_points)["points"]

  summary = summarize(per_run)
  curve = overopt_curve(points)
  plots = plot(summary, curve, os.path.join(workdir, "study_plots"))
  report = write_report(workdir, config, summary, curve, plots, time.perf_counter() - start, mesh)
  result = {"summary": summary, "runs": per_run, "overoptimisation": {"curve": curve, "points": points}}
  write_atomically(os.path.join(workdir, "study.json"), json.dumps(result, indent=2, sort_keys=True))
  print(open(report).read().split("![")[0], flush=True)
  print(f"report: {report}", flush=True)
  return result
