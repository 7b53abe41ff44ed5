"""llm_jax: pretraining, SFT, RLHF and inference for decoder-only transformers in JAX (flax NNX)."""

from llm_jax.errors import UserError

__all__ = ["UserError"]
