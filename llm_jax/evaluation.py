"""Evaluation of any checkpoint: perplexity, QA accuracy (gold judge and exact match), reward-model scores,
win-rates and KL to a reference. Used by experiments/evaluate.py and experiments/end_to_end.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from llm_jax import chat as chat_lib
from llm_jax import sharding
from llm_jax.data import text
from llm_jax.inference.sampler import Sampler, SamplingConfig
from llm_jax.tokenizer import Tokenizer
from llm_jax.modeling import ModelSpec
from llm_jax.tasks.world_facts import data as world_facts
from llm_jax.sequences import (next_token_loss, positions_from_segments, prompt_response_rows,
                                 response_log_probs, right_pad)
from llm_jax.train import loop
from llm_jax.train.reward_model import sequence_scores

ANSWER = chat_lib.chat_sampling(SamplingConfig(max_new_tokens=32, temperature=0.0))


def chat_prompts(tokenizer: Tokenizer, questions: list[str]) -> list[list[int]]:
  return [chat_lib.render(tokenizer, [chat_lib.Message("user", q)], generation_prompt=True)[0] for q in questions]


def answers(sampler: Sampler, tokenizer: Tokenizer, questions: list[str], sampling: SamplingConfig = ANSWER,
            seed: int = 0) -> list[str]:
  """The model's answers to questions asked as user turns (greedy by default)."""
  out = sampler.generate(chat_prompts(tokenizer, questions), sampling, jax.random.key(seed), allow_context_cut=True)
  return [tokenizer.decode(t).strip() for t in out.tokens]


def gold_grades(countries, replies: list[str]) -> list[int]:
  return [world_facts.judge(c, r) for c, r in zip(countries, replies)]


def win_rate(grades_a: list[int], grades_b: list[int]) -> float:
  """P(a graded above b), ties counting one half."""
  return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(grades_a, grades_b)]))


def reward_scores(rm_state: ModelSpec, rm_params, tokenizer: Tokenizer, contexts: list, replies: list[str],
                  mesh) -> list[float]:
  """The reward model's score of each answer; a context is a question (str) or a conversation (Chat)."""
  contexts = [(chat_lib.Message("user", c),) if isinstance(c, str) else tuple(c) for c in contexts]
  rows = [chat_lib.render(tokenizer, (*c, chat_lib.Message("assistant", r)))[0]
          for c, r in zip(contexts, replies)]
  length = max(len(r) for r in rows)
  shards = sharding.num_batch_shards(mesh)
  padded = rows + [rows[0]] * (-len(rows) % shards)
  tokens, segments = right_pad(padded, length)
  score = jax.jit(lambda p, t, s: sequence_scores(rm_state.merge(p), t, s))
  batch = sharding.global_batch({"t": tokens, "s": segments}, mesh)
  return jax.device_get(score(rm_params, batch["t"], batch["s"]))[:len(rows)].tolist()


def pair_accuracy(rm_state: ModelSpec, rm_params, tokenizer: Tokenizer, pairs, mesh) -> dict[str, float]:
  """A reward model on (context, chosen, rejected) triples: accuracy (ties count ½) and mean margin."""
  contexts = [c for c, _, _ in pairs]
  replies = [a for _, a, _ in pairs] + [b for _, _, b in pairs]  # One pass (and one compile) for both sides.
  scores = np.array(reward_scores(rm_state, rm_params, tokenizer, contexts + contexts, replies, mesh))
  margins = scores[:len(pairs)] - scores[len(pairs):]
  return {"pair_accuracy": float(np.mean((margins > 0) + 0.5 * (margins == 0))),
          "pair_margin": float(margins.mean()), "pairs": len(pairs)}


def kl_to_reference(sampler: Sampler, ref_state: ModelSpec, ref_params, tokenizer: Tokenizer,
                    questions: list[str], max_new_tokens: int = 32, seed: int = 0) -> float:
  """Mean per-answer KL(π ‖ π_ref), estimated (k1) on answers sampled from π at temperature 1."""
  prompts = chat_prompts(tokenizer, questions)
  sampling = chat_lib.chat_sampling(SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0))
  out = sampler.generate(prompts, sampling, jax.random.key(seed), allow_context_cut=True)
  prompt_len = max(len(p) for p in prompts)
  batch = prompt_response_rows(prompts, out.tokens, prompt_len, max_new_tokens)

  @jax.jit
  def ref_log_probs(params, tokens, segments):
    logits = ref_state.merge(params)(tokens, positions_from_segments(segments), segments)
    # The distribution the answers were sampled from: role and control tokens banned, temperature 1.
    return response_log_probs(logits, tokens, prompt_len, banned_ids=chat_lib.BANNED_IN_ANSWERS)[0]
  ref = np.asarray(ref_log_probs(ref_params, batch["tokens"], batch["segment_ids"]))
  policy = np.zeros_like(ref)
  for i, lp in enumerate(out.log_probs):
    policy[i, :len(lp)] = lp
  return float(((policy - ref) * batch["response_mask"]).sum(1).mean())


def perplexity(state: ModelSpec, params, tokenizer: Tokenizer, documents: list[str], seq_len: int,
               mesh, batch_size: int = 8) -> dict[str, float]:
  """Token-level loss and perplexity on documents (packed like pretraining data)."""
  rows = text.pack(tokenizer.encode_batch(documents), seq_len)
  batch_size = max(batch_size, sharding.num_batch_shards(mesh))
  batch_size += -batch_size % sharding.num_batch_shards(mesh)
  batch_shardings = {k: sharding.batch_sharding(mesh, 2) for k in rows}
  eval_step = loop.make_eval_step(state, next_token_loss, mesh, batch_shardings)
  result = loop.evaluate(eval_step, params, text.eval_batches(rows, batch_size), mesh)
  return {"loss": result["eval_loss"], "perplexity": result["eval_perplexity"]}


def held_out_qa(sampler: Sampler, tokenizer: Tokenizer, seed: int = 0, held_out_fraction: float = 0.2):
  """Capital questions about the held-out countries: (countries, questions, answers, grades)."""
  _, held_out = world_facts.split_countries(seed, held_out_fraction)
  pairs = world_facts.held_out_questions(held_out)
  countries, questions = [c for c, _ in pairs], [q for _, q in pairs]
  replies = answers(sampler, tokenizer, questions)
  return countries, questions, replies, gold_grades(countries, replies)


def gold_win_rates(sampler_a: Sampler, sampler_b: Sampler, tokenizer: Tokenizer, countries, questions,
                   samples: int = 4, seed: int = 0) -> dict[str, float]:
  """Gold-judge win-rates of a over b on capital questions: on `samples` answers per question sampled from each
  policy (temperature 1: the distribution RL optimizes), and on greedy answers."""
  sampling = dataclasses.replace(ANSWER, temperature=1.0)
  repeated_questions = [q for q in questions for _ in range(samples)]
  repeated_countries = [c for c in countries for _ in range(samples)]
  sampled = [gold_grades(repeated_countries, answers(s, tokenizer, repeated_questions, sampling, seed + i))
             for i, s in enumerate((sampler_a, sampler_b))]
  greedy = [gold_grades(countries, answers(s, tokenizer, questions)) for s in (sampler_a, sampler_b)]
  return {"gold_win_rate": win_rate(*sampled), "gold_win_rate_greedy": win_rate(*greedy)}


def qa_summary(grades: list[int]) -> dict[str, float]:
  return {"qa_accuracy": float(np.mean([g >= 1 for g in grades])),
          "qa_complete": float(np.mean([g == 2 for g in grades]))}


@dataclasses.dataclass
class Scored:
  name: str
  values: dict[str, float]


def format_table(rows: list[Scored]) -> str:
  keys = sorted({k for r in rows for k in r.values})
  lines = ["| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
  for r in rows:
    cells = [f"{r.values[k]:.3f}" if isinstance(r.values.get(k), float) and math.isfinite(r.values[k])
             else str(r.values.get(k, "")) for k in keys]
    lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
