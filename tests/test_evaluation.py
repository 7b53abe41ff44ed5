"""llm_jax.evaluation's measures on a tiny byte-level model."""

import dataclasses

import jax
import pytest

from llm_jax import evaluation, modeling, sharding
from llm_jax.inference.sampler import Sampler
from llm_jax.model import PRESETS
from llm_jax.tokenizer import ByteTokenizer


def test_kl_of_a_model_to_itself_is_zero_and_measuring_again_traces_nothing():
  """KL(π ‖ π) on π's own sampled answers is zero (the reference's full-forward log-probs equal the sampler's
  KV-cache ones); a second measurement with other samples reuses every compiled program (a study measures KL
  after each of its runs)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  factory = modeling.lm_factory(dataclasses.replace(PRESETS["tiny"], vocab_size=264))
  spec = modeling.model_spec(factory, mesh)
  params = modeling.init_params(factory, spec, seed=0)
  sampler = Sampler(spec.graphdef, params, mesh)
  questions = ["where is the cat?", "what is two and two?", "say hi"]
  measure = lambda seed: evaluation.kl_to_reference(
    sampler, spec, params, ByteTokenizer(), questions, max_new_tokens=6, seed=seed
  )
  assert measure(0) == pytest.approx(0.0, abs=1e-4)
  traces = []

  def listener(event, seconds, **kwargs):
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traces.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = measure(1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert traces == [] and again == pytest.approx(0.0, abs=1e-4)
