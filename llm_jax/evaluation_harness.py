"""`experiments/lm_eval.py`: a checkpoint evaluated on lm-evaluation-harness tasks, with the files the `lm_eval`
command writes (results JSON, per-task samples JSONL) through lm-eval's own EvaluationTracker.

The model class is `llm_jax.inference.harness.JaxLM`; see there for tokenization, batching and processes.
"""

from __future__ import annotations

import json
import os

import jax

from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.inference import harness
from llm_jax.inference.loading import resolve


def _workdir_and_step(workdir: str, checkpoint: str) -> tuple[str, int | None]:
  """--workdir, --checkpoint, or both when the checkpoint is one of the workdir's."""
  if workdir and checkpoint:
    checkpoint_workdir, step = resolve("", checkpoint)
    if os.path.abspath(checkpoint_workdir) != os.path.abspath(workdir):
      raise UserError(f"--checkpoint={checkpoint} is not a checkpoint of --workdir={workdir}")
    return checkpoint_workdir, step
  return resolve(workdir, checkpoint)


def evaluate_checkpoint(
  *,
  workdir: str,
  checkpoint: str = "",
  tasks: str,
  output_path: str,
  include_path: str = "",
  num_fewshot: int | None = None,
  limit: float | None = None,
  batch_size: int = 16,
  max_gen_toks: int = 256,
  apply_chat_template: bool = False,
  log_samples: bool = False,
  seed: int = 0,
  bootstrap_iters: int = 100000,
  mesh_axes: tuple[int, int, int] = (-1, 1, 1),
) -> dict:
  """Runs the tasks; process 0 writes the files and prints the harness's table. Returns the results dict."""
  harness.require_lm_eval()
  task_names = harness.parse_tasks(tasks)
  if not output_path:
    raise UserError("--output_path is required (the directory for the results and samples)")
  if limit is not None and limit <= 0:
    raise UserError(f"--limit={limit} must be positive")
  if limit is not None and limit >= 1:
    if limit != int(limit):
      raise UserError(f"--limit={limit}: a count must be whole (or < 1 for a fraction)")
    limit = int(limit)
  if num_fewshot is not None and num_fewshot < 0:
    raise UserError(f"--num_fewshot={num_fewshot} must be >= 0")
  workdir, step = _workdir_and_step(workdir, checkpoint)
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: not a directory")
  harness.quiet_harness_logs()
  manager = harness.task_manager(task_names, include_path)  # Unknown tasks: one line, before loading weights.
  mesh = sharding.make_mesh(*mesh_axes)
  lm = harness.load_lm(workdir, mesh, step, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed)
  if apply_chat_template and lm.project_tokenizer.chat_template is None:
    raise UserError("--apply_chat_template: this model has no Hugging Face chat_template (project template)")

  from lm_eval.loggers import EvaluationTracker  # noqa: PLC0415
  from lm_eval.utils import handle_non_serializable, make_table  # noqa: PLC0415

  tracker = EvaluationTracker(output_path=output_path)
  try:
    results = harness.run_tasks(
      lm,
      task_names,
      manager=manager,
      num_fewshot=num_fewshot,
      limit=limit,
      log_samples=log_samples,
      apply_chat_template=apply_chat_template,
      evaluation_tracker=tracker,
      seed=seed,
      bootstrap_iters=bootstrap_iters,
    )
  except (ValueError, KeyError, FileNotFoundError) as e:  # The harness's own complaints about a task or its data.
    raise UserError(f"lm-eval: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  samples = results.pop("samples", None)
  results["config"]["model"] = lm.name
  if jax.process_index() == 0:
    json.dumps(results, default=handle_non_serializable)  # Fails here, not half-way through a file.
    # As the `lm_eval` command: the aggregated results, then one samples file per task.
    tracker.general_config_tracker.model_name_sanitized = lm.name.replace("/", "__")
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples:
      for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(make_table(results), flush=True)
    if "groups" in results:
      print(make_table(results, "groups"), flush=True)
  return results
