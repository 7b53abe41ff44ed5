"""Evaluation of any checkpoint: perplexity, QA exact match (and a task's gold judge), reward-model scores and pair
accuracy, win-rates and KL to a reference; `evaluate_workdir` is experiments/evaluate.py.

Nothing here knows a task: what to evaluate on when no file is named (documents, questions with a gold judge,
preference pairs) comes in as `Defaults`, e.g. `llm_jax.tasks.world_facts.evaluation.DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import numpy as np

from llm_jax import chat as chat_lib
from llm_jax import checkpoint as ckpt_lib
from llm_jax import sharding
from llm_jax.data import text
from llm_jax.errors import UserError
from llm_jax.inference.loading import load_sampler, resolve
from llm_jax.inference.sampler import Sampler, SamplingConfig
from llm_jax.modeling import ModelSpec, check_language_model, lm_factory, model_spec, read_model_config
from llm_jax.sequences import (
  next_token_loss,
  positions_from_segments,
  prompt_response_rows,
  response_log_probs,
  right_pad,
)
from llm_jax.tokenizer import Tokenizer, load_tokenizer
from llm_jax.train import loop, stage
from llm_jax.train.reward_model import load_reward_model, read_pairs, sequence_scores

# Greedy answers; `answers` adds the chat stops and bans of the tokenizer (chat_lib.chat_sampling).
ANSWER = SamplingConfig(max_new_tokens=32, temperature=0.0)


def chat_prompts(tokenizer: Tokenizer, questions: list[str]) -> list[list[int]]:
  return [chat_lib.render(tokenizer, [chat_lib.Message("user", q)], generation_prompt=True)[0] for q in questions]


def answers(
  sampler: Sampler, tokenizer: Tokenizer, questions: list[str], sampling: SamplingConfig = ANSWER, seed: int = 0
) -> list[str]:
  """The model's answers to questions asked as user turns (greedy by default)."""
  sampling = chat_lib.chat_sampling(sampling, tokenizer)
  out = sampler.generate(chat_prompts(tokenizer, questions), sampling, jax.random.key(seed), allow_context_cut=True)
  return [tokenizer.decode(t).strip() for t in out.tokens]


def win_rate(grades_a: list[int], grades_b: list[int]) -> float:
  """P(a graded above b), ties counting one half."""
  return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(grades_a, grades_b)]))


def reward_scores(
  rm_state: ModelSpec, rm_params, tokenizer: Tokenizer, contexts: list, replies: list[str], mesh
) -> list[float]:
  """The reward model's score of each answer; a context is a question (str) or a conversation (Chat)."""
  contexts = [(chat_lib.Message("user", c),) if isinstance(c, str) else tuple(c) for c in contexts]
  rendered = [chat_lib.render_response(tokenizer, c, r) for c, r in zip(contexts, replies)]
  rows, starts = [r for r, _ in rendered], [s for _, s in rendered]
  length = max(len(r) for r in rows)
  shards = sharding.num_batch_shards(mesh)
  padded = rows + [rows[0]] * (-len(rows) % shards)
  starts = np.asarray(starts + [starts[0]] * (-len(rows) % shards), np.int32)
  tokens, segments = right_pad(padded, length)
  special_ids = tuple(sorted(tokenizer.special_ids))
  batch = sharding.global_batch({"t": tokens, "s": segments, "a": starts}, mesh)
  scores = _sequence_scores(rm_params, batch["t"], batch["s"], batch["a"], spec=rm_state, special_ids=special_ids)
  return jax.device_get(scores)[: len(rows)].tolist()


# Module-level jits keyed by the model (a ModelSpec is built once per model and mesh): a study that scores or
# measures KL many times traces and compiles each shape once, not once per call.
@functools.partial(jax.jit, static_argnames=("spec", "special_ids"))
def _sequence_scores(params, tokens, segments, answer_starts, *, spec: ModelSpec, special_ids: tuple[int, ...]):
  return sequence_scores(spec.merge(params), tokens, segments, answer_starts, special_ids)


@functools.partial(jax.jit, static_argnames=("spec", "prompt_len", "banned_ids"))
def _response_log_probs(params, tokens, segments, *, spec: ModelSpec, prompt_len: int, banned_ids: tuple[int, ...]):
  logits = spec.merge(params)(tokens, positions_from_segments(segments), segments)
  return response_log_probs(logits, tokens, prompt_len, banned_ids=banned_ids)[0]


def pair_accuracy(rm_state: ModelSpec, rm_params, tokenizer: Tokenizer, pairs, mesh) -> dict[str, float]:
  """A reward model on (context, chosen, rejected) triples: accuracy (ties count ½) and mean margin."""
  contexts = [c for c, _, _ in pairs]
  replies = [a for _, a, _ in pairs] + [b for _, _, b in pairs]  # One pass (and one compile) for both sides.
  scores = np.array(reward_scores(rm_state, rm_params, tokenizer, contexts + contexts, replies, mesh))
  margins = scores[: len(pairs)] - scores[len(pairs) :]
  return {
    "pair_accuracy": float(np.mean((margins > 0) + 0.5 * (margins == 0))),
    "pair_margin": float(margins.mean()),
    "pairs": len(pairs),
  }


def kl_to_reference(
  sampler: Sampler,
  ref_state: ModelSpec,
  ref_params,
  tokenizer: Tokenizer,
  questions: list[str],
  max_new_tokens: int = 32,
  seed: int = 0,
) -> float:
  """Mean per-answer KL(π ‖ π_ref), estimated (k1) on answers sampled from π at temperature 1."""
  prompts = chat_prompts(tokenizer, questions)
  sampling = chat_lib.chat_sampling(SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0), tokenizer)
  out = sampler.generate(prompts, sampling, jax.random.key(seed), allow_context_cut=True)
  prompt_len = max(len(p) for p in prompts)
  batch = prompt_response_rows(prompts, out.tokens, prompt_len, max_new_tokens)

  tokens, segments = batch["tokens"], batch["segment_ids"]
  banned = sampling.banned_ids  # As sampled: role and control tokens banned, temperature 1.
  ref = _response_log_probs(ref_params, tokens, segments, spec=ref_state, prompt_len=prompt_len, banned_ids=banned)
  ref = np.asarray(ref)
  policy = np.zeros_like(ref)
  for i, lp in enumerate(out.log_probs):
    policy[i, : len(lp)] = lp
  return float(((policy - ref) * batch["response_mask"]).sum(1).mean())


def perplexity(
  state: ModelSpec, params, tokenizer: Tokenizer, documents: list[str], seq_len: int, mesh, batch_size: int = 8
) -> dict[str, float]:
  """Token-level loss and perplexity on documents (packed like pretraining data)."""
  rows = text.pack_documents(tokenizer.encode_batch(documents), tokenizer, seq_len)
  batch_size = max(batch_size, sharding.num_batch_shards(mesh))
  batch_size += -batch_size % sharding.num_batch_shards(mesh)
  batch_shardings = {k: sharding.token_sharding(mesh, v.shape) for k, v in rows.items()}
  eval_step = loop.make_eval_step(state, next_token_loss, mesh, batch_shardings)
  result = loop.evaluate(eval_step, params, text.eval_batches(rows, batch_size), mesh)
  return {"loss": result["eval_loss"], "perplexity": result["eval_perplexity"]}


# ---- evaluate_workdir: experiments/evaluate.py ----


@dataclasses.dataclass(frozen=True)
class QuestionSet:
  """Questions asked as single user turns, their reference answers (exact match), and maybe a gold judge.

  Attributes:
    questions: The user turns.
    references: The expected answer to each question; `qa_exact_match` is the share answered exactly so.
    grade: A gold judge: the answers to `questions` → one grade each (higher is better). Gives `win_rate_gold`.
    summarize: The grades → figures for the results (e.g. accuracy).
  """

  questions: list[str]
  references: list[str]
  grade: Callable[[list[str]], list[int]] | None = None
  summarize: Callable[[list[int]], dict[str, float]] | None = None


@dataclasses.dataclass(frozen=True)
class Defaults:
  """What `evaluate_workdir` evaluates on when the request names no file; a task supplies these.

  Attributes:
    documents: Documents for perplexity (no `text`).
    questions: The questions for QA (no `qa`).
    pairs: Preference pairs for a reward model (no `pairs`), by the suffix of their result keys ("" for the main
      set): each set gives pair_accuracy{suffix}, pair_margin{suffix} and pairs{suffix}.
  """

  documents: Callable[[], list[str]]
  questions: Callable[[], QuestionSet]
  pairs: Callable[[], dict[str, list]]


@dataclasses.dataclass(frozen=True)
class Request:
  """experiments/evaluate.py's flags (errors name them so: --output, --text, ...)."""

  workdir: str = ""
  checkpoint: str = ""
  reference: str = ""
  reward_model: str = ""
  text: str = ""
  qa: str = ""
  pairs: str = ""
  seq_len: int = 128
  output: str = "results.json"


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """A checked request: the model to load and what to evaluate it on."""

  workdir: str
  step: int | None
  meta: dict
  documents: list[str] | None = None  # Language models.
  questions: QuestionSet | None = None  # Language models.
  pairs: dict[str, list] | None = None  # Reward models.


def _check_output_and_workdir(request: Request) -> tuple[str, int | None, dict]:
  workdir, step = resolve(request.workdir, request.checkpoint)
  output = request.output
  if os.path.isdir(output) or not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise UserError(
      f"--output={output}: " + ("is a directory" if os.path.isdir(output) else "its directory does not exist")
    )
  if request.seq_len < 2:
    raise UserError(f"--seq_len={request.seq_len} must be >= 2")
  read_model_config(workdir)  # Not a workdir at all: says so.
  meta = ckpt_lib.workdir_meta(workdir, step)
  if meta is None:
    raise UserError(f"{workdir}: no readable checkpoint in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}")
  return workdir, step, meta


def _read_questions(path: str) -> QuestionSet:
  """A chat file's conversations: the last user turn before the last assistant turn, and that answer."""
  chats = chat_lib.read_chats(path).chats
  for i, chat in enumerate(chats):
    if not any(m.role == "assistant" for m in chat[1:]):
      raise UserError(f"--qa={path}: conversation {i + 1} has no assistant answer after a prompt")
  return QuestionSet(
    [chat_lib.prompt_and_answer(c)[0][-1].content for c in chats],
    [chat_lib.prompt_and_answer(c)[1].strip() for c in chats],
  )


def _check_request(request: Request, defaults: Defaults) -> _Inputs:
  """Checks every file and workdir the request names and reads its inputs; a mistake is a UserError.

  All of it happens before a model is loaded: evaluating takes minutes.
  """
  workdir, step, meta = _check_output_and_workdir(request)
  if meta.get("stage") == "reward_model":
    language_model_flags = [
      f"--{name}" for name in ("reference", "reward_model", "text", "qa") if getattr(request, name)
    ]
    if language_model_flags:
      raise UserError(
        f"{', '.join(language_model_flags)}: for language models; {workdir} is a reward model (give it --pairs)"
      )
    return _Inputs(workdir, step, meta, pairs={"": read_pairs(request.pairs)} if request.pairs else defaults.pairs())
  if request.pairs:
    raise UserError(f"--pairs: for reward models; {workdir} is a {meta.get('stage')} workdir")
  documents = text.read_documents(request.text, name="--text") if request.text else defaults.documents()
  questions = _read_questions(request.qa) if request.qa else defaults.questions()
  if request.reference:
    check_language_model(request.reference)
    stage.check_same_tokenizer(request.reference, "--reference", workdir, "--workdir")
  if request.reward_model:
    stage.check_source_workdir(request.reward_model, "--reward_model", "reward-model", ("reward_model",))
    stage.check_same_tokenizer(request.reward_model, "--reward_model", workdir, "--workdir")
  return _Inputs(workdir, step, meta, documents, questions)


def _evaluate_reward_model(inputs: _Inputs, mesh, results: dict) -> None:
  state, params, _ = load_reward_model(inputs.workdir, mesh, inputs.step)
  tokenizer = load_tokenizer(inputs.workdir)
  for suffix, pairs in inputs.pairs.items():
    results.update({f"{k}{suffix}": v for k, v in pair_accuracy(state, params, tokenizer, pairs, mesh).items()})


def _evaluate_language_model(request: Request, inputs: _Inputs, mesh, results: dict) -> None:
  sampler, tokenizer, loaded = load_sampler(inputs.workdir, mesh, inputs.step)
  results["step"] = loaded.get("step")  # The checkpoint used (an unreadable newer one is skipped).
  model_cfg = read_model_config(inputs.workdir)
  state = model_spec(lm_factory(model_cfg), mesh)
  seq_len = min(request.seq_len, model_cfg.max_seq_len)
  results.update(perplexity(state, sampler.params, tokenizer, inputs.documents, seq_len, mesh))
  qa = inputs.questions
  replies = answers(sampler, tokenizer, qa.questions)
  grades = qa.grade(replies) if qa.grade else None
  if grades is not None and qa.summarize:
    results.update(qa.summarize(grades))
  results["qa_exact_match"] = sum(r == a for r, a in zip(replies, qa.references)) / len(qa.references)
  results["qa_example"] = f"{qa.questions[0]} → {replies[0]}"
  reference_replies = None
  if request.reference:
    ref_sampler, _, _ = load_sampler(request.reference, mesh)
    reference_replies = answers(ref_sampler, tokenizer, qa.questions)
    if grades is not None:
      results["win_rate_gold"] = win_rate(grades, qa.grade(reference_replies))
    ref_state = model_spec(lm_factory(read_model_config(request.reference)), mesh)
    results["kl_to_reference"] = kl_to_reference(sampler, ref_state, ref_sampler.params, tokenizer, qa.questions)
  if request.reward_model:
    rm_state, rm_params, _ = load_reward_model(request.reward_model, mesh)
    scores = reward_scores(rm_state, rm_params, tokenizer, qa.questions, replies, mesh)
    results["reward_score"] = sum(scores) / len(scores)
    if reference_replies is not None:
      ref_scores = reward_scores(rm_state, rm_params, tokenizer, qa.questions, reference_replies, mesh)
      results["win_rate_reward"] = win_rate(scores, ref_scores)


def print_and_write(results: dict, output: str) -> None:
  """Prints one line per figure and writes them all to `output` (JSON; process 0 only)."""
  width = max(len(k) for k in results)
  for key, value in results.items():
    print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
  if jax.process_index() == 0:
    with open(output, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {output}")


def evaluate_workdir(request: Request, defaults: Defaults) -> dict:
  """experiments/evaluate.py: checks the request, evaluates its checkpoint, prints and writes the results.

  A reward-model workdir gets pair accuracy and margin; a language model (pretrain, SFT, RLHF) gets perplexity,
  QA (exact match; a gold judge's figures and win-rate where the questions have one), KL to --reference and
  --reward_model's scores.

  Args:
    request: The flags.
    defaults: What to evaluate on when the request names no file (a task's; see `Defaults`).

  Returns:
    The results, as written to `request.output`.
  """
  inputs = _check_request(request, defaults)
  mesh = sharding.make_mesh()
  results = {
    "workdir": os.path.abspath(inputs.workdir),
    "stage": inputs.meta.get("stage"),
    "step": inputs.meta.get("step"),
  }
  if inputs.meta.get("stage") == "reward_model":
    _evaluate_reward_model(inputs, mesh, results)
  else:
    _evaluate_language_model(request, inputs, mesh, results)
  print_and_write(results, request.output)
  return results
