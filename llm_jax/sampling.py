"""A minimal sampler for pretraining demos: full forward pass per token (no KV cache), one jit per prompt.

It recomputes the whole prefix at every step, which is simple and exact; cached, batched decoding belongs to
the inference module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.model import Transformer
from llm_jax.tokenizer import BOS_ID, EOS_ID, load_tokenizer


def sample_tokens(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float,
                  key: jax.Array) -> list[int]:
  """Continues `prompt` by up to `max_new_tokens` tokens (stops at <eos>); temperature 0 is greedy."""
  length = min(len(prompt) + max_new_tokens, model.cfg.max_seq_len)
  buffer = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))

  @jax.jit
  def run(model, buffer, key):
    def body(t, carry):
      buffer, done = carry
      logits = model(buffer)[0, t - 1]
      if temperature > 0:
        token = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
      else:
        token = jnp.argmax(logits)
      token = jnp.where(done, 0, token)
      return buffer.at[0, t].set(token), done | (token == EOS_ID)
    return jax.lax.fori_loop(len(prompt), length, body, (buffer, jnp.bool_(False)))[0]

  out = jax.device_get(run(model, buffer, key))[0, len(prompt):].tolist()
  return out[:out.index(EOS_ID)] if EOS_ID in out else out


def print_samples(workdir: str, result, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
                  seed: int = 0) -> None:
  tokenizer = load_tokenizer(workdir)
  model = result.state.merge(result.params)
  for i, prompt in enumerate(prompts):
    ids = [BOS_ID] + tokenizer.encode(prompt)
    new = sample_tokens(model, ids, max_new_tokens, temperature, jax.random.key(seed + i))
    print(f"sample: {prompt}|{tokenizer.decode(new)}", flush=True)
