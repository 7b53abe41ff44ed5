"""Batched, sharded decoding with a KV cache: prefill once, then one token per step inside a jitted loop.

    prompts (left-padded to a bucket length P) ──prefill──▶ KV cache [layers, B, K, P + N, H] + first logits
        └─ lax.while_loop: sample → append → forward 1 token against the cache, until every row has stopped
           (a stop id, or N new tokens); no host round trip per token.

Every row stops at its first stop id (default <eos>); what follows is padding. The returned log-probabilities
are those of the chosen tokens under the distribution actually sampled from (after temperature, top-k and
top-p): RLHF needs exactly these. With temperature 1 and no top-k/top-p that is the policy's own distribution.

Randomness: row b at step t draws with `fold_in(fold_in(key, b), t)`, so the same key gives the same tokens,
and a row's draws do not depend on the batch size.

Streaming runs the same loop in chunks of a few tokens (the loop state is donated from chunk to chunk), so a
single prompt prints as it is produced with no per-token host callback.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from llm_jax import chat as chat_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.model import KVCache, ModelConfig, Transformer
from llm_jax.sequences import PAD_FILL, left_pad, restrict_logits
from llm_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 1.0  # 0: greedy.
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1: off.
  stop_ids: tuple[int, ...] = ()  # Besides these, `Sampler.complete` stops at the tokenizer's stop ids.
  banned_ids: tuple[int, ...] = ()  # Never sampled (chat mode bans role and control tokens).

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise UserError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")


def sample_logits(
  logits_BV: jax.Array, keys_B: jax.Array, temperature: float, top_k: int, top_p: float, banned_ids: Sequence[int] = ()
) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns it and its log-probability under the distribution sampled from."""
  logits_BV = restrict_logits(logits_BV, temperature, banned_ids)
  if temperature == 0:
    token_B = jnp.argmax(logits_BV, axis=-1)
    return token_B, _log_prob(jax.nn.log_softmax(logits_BV), token_B)
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
  if top_p < 1:
    # Keep the most likely tokens until their mass reaches top_p (the token that crosses it included).
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
  log_probs_BV = jax.nn.log_softmax(logits_BV)
  token_B = jax.vmap(jax.random.categorical)(keys_B, log_probs_BV)
  return token_B, _log_prob(log_probs_BV, token_B)


def _log_prob(log_probs_BV, token_B):
  return jnp.take_along_axis(log_probs_BV, token_B[:, None], axis=-1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  cache: KVCache
  logits_BV: jax.Array  # The model's prediction for the next token of each row.
  tokens_BN: jax.Array  # Generated tokens (PAD_FILL after a row stops).
  log_probs_BN: jax.Array
  lengths_B: jax.Array  # Tokens generated so far (the stop token included).
  done_B: jax.Array
  next_position_B: jax.Array
  step: jax.Array  # int32 scalar: tokens generated so far by the longest row.


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # Per prompt, up to and including the stop token.
  log_probs: list[list[float]]
  prompt_tokens: list[list[int]]
  new_token_budget: int  # max_new_tokens, or less where the longest prompt left less room in the context.
  cut_by_context: int  # Prompts whose prompt + max_new_tokens did not fit the context (0 unless allowed).


def _fetch(tree):
  """Host copies; arrays that span several processes are all-gathered (every process calls this)."""
  return jax.tree.map(
    lambda x: np.asarray(
      jax.device_get(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
    ),
    tree,
  )


def bucket(n: int, minimum: int = 16) -> int:
  """The next power of two ≥ n: prompt lengths share a few compiled shapes."""
  return max(minimum, 1 << (n - 1).bit_length())


def text_prompts(
  tokenizer: Tokenizer, prompts: Sequence[str], sampling: SamplingConfig, chat: bool
) -> tuple[list[list[int]], SamplingConfig]:
  """The token prompts and sampling settings `Sampler.complete` generates text prompts with (the inspector too).

  Plain: the tokenizer's default ids (BOS where it adds one), stopping at its stop ids. `chat`: each prompt a user
  turn in the chat template, stopping at the end of the turn, with role and control tokens banned.
  """
  if chat:
    token_prompts = [
      chat_lib.render(tokenizer, [chat_lib.Message("user", p)], generation_prompt=True)[0] for p in prompts
    ]
    return token_prompts, chat_lib.chat_sampling(sampling, tokenizer)
  token_prompts = [tokenizer.encode_default(p) for p in prompts]
  return token_prompts, dataclasses.replace(sampling, stop_ids=tuple(sorted({*sampling.stop_ids, *tokenizer.stop_ids})))


@functools.lru_cache(maxsize=32)
def _jitted_pieces(graphdef, mesh: Mesh, cache_dtype, model_cfg: ModelConfig):
  """(prefill, decode), jitted once per model graph, mesh and cache dtype and shared by every Sampler of them: RL
  and evaluation build a Sampler per call, and jit's own cache then serves the shapes it has already compiled."""
  program = Sampler(graphdef, None, mesh, cache_dtype, model_cfg)  # No parameters: they are arguments.
  return (
    jax.jit(program.prefill, static_argnames=("cache_length",)),
    jax.jit(program.decode, static_argnames=("sampling",), donate_argnames=("state",)),
  )


class Sampler:
  """Generates from a model whose parameters are sharded on `mesh` (see `llm_jax.modeling.ModelSpec`).

  Compiled functions are cached per (batch, prompt bucket, cache length, sampling settings) and shared by every
  Sampler of the same model graph and mesh: calls with the same shapes never trace or compile again.
  """

  def __init__(self, graphdef, params, mesh: Mesh, cache_dtype=None, model_cfg: ModelConfig | None = None):
    self.graphdef, self.params, self.mesh = graphdef, params, mesh
    self.model_cfg = model_cfg or nnx.merge(graphdef, params).cfg
    self.cache_dtype = cache_dtype or self.model_cfg.dtype

  # ---- jitted pieces (shapes static; params and arrays traced) ----

  def _cache_sharding(self, cache: KVCache) -> KVCache:
    """KV cache on batch ("data", "fsdp") and kv heads ("tensor") when they divide; the rest replicated."""

    def constrain(x, names):
      spec = sharding.logical_to_spec(names, x.shape, self.mesh)
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    kv_names = ("layers", "batch", "kv_heads", None, "head_dim")
    return KVCache(
      constrain(cache.k_LBKSH, kv_names),
      constrain(cache.v_LBKSH, kv_names),
      constrain(cache.positions_BS, ("batch", None)),
      constrain(cache.segment_ids_BS, ("batch", None)),
      cache.index,
    )

  def prefill(self, params, tokens_BP, segment_ids_BP, cache_length: int) -> DecodeState:
    """Runs the prompts through the model, filling the cache; returns the state before the first sample.

    The prompts attend only to each other: they fill a cache of exactly their length, which is then padded
    with empty slots (segment 0, never attended) to `cache_length` for decoding.
    """
    model: Transformer = nnx.merge(self.graphdef, params)
    batch, prompt_len = tokens_BP.shape
    cache = self._cache_sharding(KVCache.empty(model.cfg, batch, prompt_len, self.cache_dtype))
    prompt_lengths_B = segment_ids_BP.sum(axis=1)
    positions_BP = jnp.maximum(jnp.arange(prompt_len)[None, :] - (prompt_len - prompt_lengths_B[:, None]), 0)
    h_BPD, cache = model.backbone_with_cache(tokens_BP, positions_BP, segment_ids_BP, cache)
    cache = self._cache_sharding(cache.pad_to(cache_length))
    logits_BV = model.logits(h_BPD[:, -1:])[:, 0]
    n = cache_length - prompt_len
    return DecodeState(
      cache=cache,
      logits_BV=logits_BV,
      tokens_BN=jnp.full((batch, n), PAD_FILL, jnp.int32),
      log_probs_BN=jnp.zeros((batch, n), jnp.float32),
      lengths_B=jnp.zeros((batch,), jnp.int32),
      done_B=jnp.zeros((batch,), bool),
      next_position_B=prompt_lengths_B.astype(jnp.int32),
      step=jnp.zeros((), jnp.int32),
    )

  def decode(self, params, state: DecodeState, key, until_step, sampling: SamplingConfig) -> DecodeState:
    """Samples tokens until every row is done or `state.step` reaches `until_step` (a traced int)."""
    batch, max_new = state.tokens_BN.shape
    row_keys_B = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    stop_ids = jnp.asarray(sampling.stop_ids, jnp.int32)

    def not_finished(s: DecodeState):
      return (s.step < jnp.minimum(until_step, max_new)) & ~jnp.all(s.done_B)

    def one_token(s: DecodeState) -> DecodeState:
      # Merged inside the loop body: nnx transforms (scan over layers) refuse a module from an outer trace.
      model: Transformer = nnx.merge(self.graphdef, params)
      keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, s.step)
      token_B, log_prob_B = sample_logits(
        s.logits_BV, keys_B, sampling.temperature, sampling.top_k, sampling.top_p, sampling.banned_ids
      )
      token_B = jnp.where(s.done_B, PAD_FILL, token_B).astype(jnp.int32)
      log_prob_B = jnp.where(s.done_B, 0.0, log_prob_B)
      tokens_BN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BN, token_B[:, None], s.step, axis=1)
      log_probs_BN = jax.lax.dynamic_update_slice_in_dim(s.log_probs_BN, log_prob_B[:, None], s.step, axis=1)
      lengths_B = s.lengths_B + (~s.done_B).astype(jnp.int32)
      done_B = s.done_B | jnp.isin(token_B, stop_ids)
      # Feed the token back; finished rows feed padding (segment 0), which nothing attends to.
      h_B1D, cache = model.backbone_with_cache(
        token_B[:, None], s.next_position_B[:, None], (~s.done_B).astype(jnp.int32)[:, None], s.cache
      )
      return DecodeState(
        cache=cache,
        logits_BV=model.logits(h_B1D)[:, 0],
        tokens_BN=tokens_BN,
        log_probs_BN=log_probs_BN,
        lengths_B=lengths_B,
        done_B=done_B,
        next_position_B=s.next_position_B + 1,
        step=s.step + 1,
      )

    return jax.lax.while_loop(not_finished, one_token, state)

  @property
  def _jitted(self):
    return _jitted_pieces(self.graphdef, self.mesh, self.cache_dtype, self.model_cfg)

  # ---- host API ----

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    key: jax.Array,
    stream: Callable[[list[int]], None] | None = None,
    stream_chunk: int = 4,
    allow_context_cut: bool = False,
    stop_when: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    check_every: int = 8,
  ) -> Generation:
    """Continues each prompt (token ids). `stream(new_tokens_of_row_0)` is called as tokens are produced.

    Every prompt gets `max_new_tokens` of room whenever prompt + max_new_tokens fits the model's context: the
    bucket padding shrinks, never the budget. Otherwise a UserError, or with `allow_context_cut` (evaluation
    loops) a smaller budget for the whole batch, logged and counted in `Generation.cut_by_context`.
    `stop_when(tokens_BN, lengths_B) -> done_B` (host arrays) is asked every `check_every` tokens whether rows
    are finished for a reason the loop cannot see (e.g. a stop string in their text); those rows stop there.
    """
    sampling.validate()
    context = self.model_cfg.max_seq_len
    for i, prompt in enumerate(prompts):
      if not len(prompt):
        raise UserError(f"prompt {i} is empty")
      if len(prompt) >= context:
        raise UserError(
          f"prompt {i} has {len(prompt)} tokens; the model's context is {context} "
          "(prompt + at least one new token must fit)"
        )
    longest = max(len(p) for p in prompts)
    cut = [i for i, p in enumerate(prompts) if len(p) + sampling.max_new_tokens > context]
    if cut and not allow_context_cut:
      raise UserError(
        f"prompt {cut[0]} has {len(prompts[cut[0]])} tokens: with max_new_tokens="
        f"{sampling.max_new_tokens} it does not fit the model's context of {context} "
        f"({len(cut)} prompt(s) affected); shorten it or lower max_new_tokens"
      )
    if cut:
      logging.warning(
        "%d of %d prompts leave less than max_new_tokens=%d in the context of %d: this batch "
        "generates at most %d tokens",
        len(cut),
        len(prompts),
        sampling.max_new_tokens,
        context,
        context - longest,
      )
    # A power-of-two bucket (few compiled shapes), shrunk so that the bucket never eats the token budget.
    prompt_len = max(longest, min(bucket(longest), context - sampling.max_new_tokens))
    cache_length = min(prompt_len + sampling.max_new_tokens, context)
    # Pad the batch to a multiple of the batch shards with one-token dummy rows (dropped below).
    shards = sharding.num_batch_shards(self.mesh)
    rows = list(prompts) + [[PAD_FILL]] * (-len(prompts) % shards)
    tokens, segments = left_pad(rows, prompt_len)
    tokens, segments = (jax.device_put(x, sharding.batch_sharding(self.mesh)) for x in (tokens, segments))
    prefill, decode = self._jitted
    with jax.set_mesh(self.mesh):  # Traced under the mesh: a fused attention kernel (splash) shards by it.
      state = prefill(self.params, tokens, segments, cache_length=cache_length)
    if stop_when is not None:
      if stream is not None:
        raise ValueError("stream and stop_when cannot be combined")
      while True:
        state = decode(self.params, state, key, state.step + check_every, sampling=sampling)
        done_B, step = _fetch(state.done_B), int(np.asarray(state.step.addressable_data(0)))
        if done_B.all() or step >= state.tokens_BN.shape[1]:
          break
        tokens_BN, lengths_B = _fetch((state.tokens_BN, state.lengths_B))
        stopped_B = stop_when(tokens_BN, lengths_B)
        if (done_B | stopped_B).all():
          break
        state = dataclasses.replace(state, done_B=state.done_B | jax.device_put(stopped_B, state.done_B.sharding))
    elif stream is None:
      state = decode(self.params, state, key, jnp.int32(cache_length), sampling=sampling)
    else:
      shown = 0
      while True:
        state = decode(self.params, state, key, state.step + stream_chunk, sampling=sampling)
        new = jax.device_get(state.tokens_BN[0, shown : state.lengths_B[0]]).tolist()
        if new:
          stream(new)
        shown += len(new)
        if bool(state.done_B[0]) or int(state.step) >= state.tokens_BN.shape[1]:
          break
      state = decode(self.params, state, key, jnp.int32(cache_length), sampling=sampling)  # Finish the rest.
    tokens_BN, log_probs_BN, lengths_B = _fetch((state.tokens_BN, state.log_probs_BN, state.lengths_B))
    n = len(prompts)
    return Generation(
      tokens=[tokens_BN[b, : lengths_B[b]].tolist() for b in range(n)],
      log_probs=[log_probs_BN[b, : lengths_B[b]].tolist() for b in range(n)],
      prompt_tokens=[list(p) for p in prompts],
      new_token_budget=cache_length - prompt_len,
      cut_by_context=len(cut),
    )

  def complete(
    self,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    key: jax.Array,
    stream: Callable[[str], None] | None = None,
    chat: bool = False,
    allow_context_cut: bool = False,
  ) -> list[str]:
    """Text in, text out: each prompt (tokenized as the model's tokenizer does by default: BOS where it adds one)
    continued until a stop id (the tokenizer's, and `sampling.stop_ids`). `stream` gets row 0's text.

    `chat=True` sends each prompt as a user turn in the model's chat template and returns the assistant's answer
    (decoding also stops at the end-of-turn token). `allow_context_cut`: as in `generate` (fewer new tokens where
    the prompt leaves less room in the model's context, instead of an error).
    """
    if stream is None:
      on_tokens = None
    else:
      shown: list[int] = []

      def on_tokens(new_tokens: list[int]) -> None:
        before = tokenizer.decode(shown)
        shown.extend(new_tokens)
        stream(tokenizer.decode(shown)[len(before) :])

    token_prompts, sampling = text_prompts(tokenizer, prompts, sampling, chat)
    result = self.generate(token_prompts, sampling, key, stream=on_tokens, allow_context_cut=allow_context_cut)
    return [tokenizer.decode(tokens) for tokens in result.tokens]
