"""Hugging Face interop (llm_jax/hf.py, experiments/convert_hf.py): imported models compute transformers' logits,
exports reload bit for bit, and whatever is not converted exactly is refused by name.

The fixtures (tests/fixtures/hf/<family>/) are tiny random checkpoints with every weight, bias and norm
randomised, written with their tokenizers and reference outputs by tests/fixtures/hf/make_fixtures.py
(transformers + torch, run by hand); these tests need neither.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from llm_jax import hf, modeling, sharding
from llm_jax.errors import UserError
from llm_jax.model import PRESETS

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "gpt2")
ATOL = 1e-4  # Issue 13: logits equal transformers' to 1e-4 in float32.


def one_device_mesh():
  return sharding.make_mesh(1, 1, 1, jax.devices()[:1])


def reference(family: str) -> tuple[dict, np.ndarray]:
  directory = os.path.join(FIXTURES, family)
  with open(os.path.join(directory, "reference.json")) as f:
    ref = json.load(f)
  return ref, safetensors.numpy.load_file(os.path.join(directory, "reference.safetensors"))["logits"]


def forward(cfg, params, tokens) -> np.ndarray:
  model = modeling.model_spec(modeling.lm_factory(cfg), one_device_mesh()).merge(params)
  return np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers(family):
  """320 positions (RoPE bugs hide at position 0), every family's features: GQA, explicit head_dim, llama3
  RoPE scaling, tied/untied heads, Qwen2's q/k/v biases, GPT-2's Conv1D layout, biases and gelu_new."""
  ref, expected = reference(family)
  architecture, cfg, _, params = hf.read_params(os.path.join(FIXTURES, family), one_device_mesh(), "float32")
  assert architecture == ref["architecture"]
  logits = forward(cfg, params, [ref["input_ids"]])[0, ref["logit_positions"]]
  assert max(ref["logit_positions"]) >= 300
  np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


def test_the_fixtures_exercise_every_feature():
  """Each feature the converter maps is switched on in some fixture (else a dropped one would pass)."""
  seen = {}
  for family in FAMILIES:
    path = os.path.join(FIXTURES, family, "config.json")
    with open(path) as f:
      seen[family] = hf.model_config_from_hf(json.load(f), path, "float32")[1]
  assert seen["llama3"].rope_scaling == "llama3" and seen["llama3"].head_dim * seen["llama3"].num_heads != 64
  assert seen["llama3"].num_kv_heads < seen["llama3"].num_heads and seen["llama3"].tie_embeddings
  assert not seen["llama2"].tie_embeddings and seen["qwen2"].qkv_bias and not seen["qwen2"].use_bias
  assert seen["gpt2"].use_bias and seen["gpt2"].gelu_approximate and seen["gpt2"].position == "learned"
  assert seen["mistral"].num_kv_heads == 1
  with open(os.path.join(FIXTURES, "qwen2", "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1  # The sharded layout is read too.


def test_a_wrong_conversion_is_caught_by_the_logit_test():
  """The tolerance is tight enough to see the classic conversion bugs: exact vs tanh GELU, no RoPE scaling."""
  for family, wrong in (("gpt2", dict(gelu_approximate=False)), ("llama3", dict(rope_scaling="none"))):
    ref, expected = reference(family)
    _, cfg, _, params = hf.read_params(os.path.join(FIXTURES, family), one_device_mesh(), "float32")
    logits = forward(dataclasses.replace(cfg, **wrong), params, [ref["input_ids"]])[0, ref["logit_positions"]]
    assert np.abs(logits - expected).max() > 2 * ATOL, family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_equals_transformers(family):
  from llm_jax.inference.sampler import Sampler, SamplingConfig

  ref, _ = reference(family)
  _, cfg, _, params = hf.read_params(os.path.join(FIXTURES, family), one_device_mesh(), "float32")
  spec = modeling.model_spec(modeling.lm_factory(cfg), one_device_mesh())
  sampler = Sampler(spec.graphdef, params, one_device_mesh())
  greedy = ref["greedy"]
  sampling = SamplingConfig(max_new_tokens=len(greedy["new_ids"]), temperature=0.0, stop_ids=())
  result = sampler.generate([greedy["prompt_ids"]], sampling, jax.random.key(0))
  assert list(result.tokens[0]) == greedy["new_ids"]


def test_bfloat16_import_rounds_each_weight_once():
  _, cfg, _, params = hf.read_params(os.path.join(FIXTURES, "llama2"), one_device_mesh(), "bfloat16")
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  source = safetensors.numpy.load_file(os.path.join(FIXTURES, "llama2", "model.safetensors"))
  embedding = np.asarray(params["embed"]["embedding"])
  assert embedding.dtype == jnp.bfloat16
  np.testing.assert_array_equal(embedding, source["model.embed_tokens.weight"].astype(jnp.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# What is refused


def write_variant(tmp_path, family: str, config_changes: dict | None = None, drop=(), extra=None) -> str:
  """A copy of a fixture with config.json fields changed, tensors dropped or added."""
  target = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, family), target)
  if config_changes is not None:
    with open(target / "config.json") as f:
      config = json.load(f)
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
  if drop or extra:
    tensors = safetensors.numpy.load_file(target / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (extra or {})
    safetensors.numpy.save_file(tensors, target / "model.safetensors")
  return str(target)


@pytest.mark.parametrize(
  "family, changes, named",
  [
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("llama3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ("llama2", {"architectures": ["MixtralForCausalLM"]}, "MixtralForCausalLM"),
    ("llama2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama2", {"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
    ("llama2", {"num_attention_heads": None}, "'num_attention_heads' is missing"),
  ],
)
def test_unsupported_features_are_refused_by_name(tmp_path, family, changes, named):
  source = write_variant(tmp_path, family, changes)
  with pytest.raises(UserError, match="config.json") as error:
    hf.read_params(source, one_device_mesh())
  assert named in str(error.value) and "\n" not in str(error.value)


def test_missing_extra_and_truncated_tensors_are_refused(tmp_path):
  missing = write_variant(tmp_path / "a", "llama2", drop=("model.layers.1.mlp.up_proj.weight",))
  with pytest.raises(UserError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    hf.read_params(missing, one_device_mesh())
  extra = write_variant(tmp_path / "b", "llama2", extra={"model.layers.0.self_attn.o_proj.bias": np.zeros(64, "f4")})
  with pytest.raises(UserError, match="o_proj.bias.*unsupported feature"):
    hf.read_params(extra, one_device_mesh())
  truncated = write_variant(tmp_path / "c", "gpt2")
  data = open(os.path.join(truncated, "model.safetensors"), "rb").read()
  with open(os.path.join(truncated, "model.safetensors"), "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(UserError, match="model.safetensors"):
    hf.read_params(truncated, one_device_mesh())
  pickled = tmp_path / "d"
  pickled.mkdir()
  shutil.copy(os.path.join(FIXTURES, "gpt2", "config.json"), pickled / "config.json")
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(UserError, match="pytorch_model.bin: pickle-based"):
    hf.read_params(str(pickled), one_device_mesh())


# ----------------------------------------------------------------------------------------------------------
# Layouts, both ways


@pytest.mark.parametrize("preset, changes", [("tiny", {}), ("tiny", {"qkv_bias": True}), ("baby_char", {})])
def test_tensor_rules_are_exact_inverses(preset, changes):
  """to_hf(to_ours(x)) == x for every tensor of a model, and every parameter has exactly one source."""
  cfg = dataclasses.replace(PRESETS[preset], **changes)
  architecture = hf.architecture_for(cfg)
  if architecture == hf.GPT2:
    cfg = dataclasses.replace(cfg, use_bias=True)
  params = nnx.to_pure_dict(nnx.state(modeling.build_model(cfg, nnx.Rngs(0))))
  flat = hf._flatten(jax.tree.map(np.asarray, params))
  rules = hf.tensor_rules(cfg, architecture)
  assert sorted(p for rule in rules for p in rule.ours) == sorted(flat)
  for rule in rules:
    ours = [flat[p] for p in rule.ours]
    back = rule.to_ours(*rule.to_hf(*ours))
    for a, b in zip(ours, back):
      assert a.shape == b.shape and np.array_equal(a, b)
