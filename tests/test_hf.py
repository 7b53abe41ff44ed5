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
from conftest import run_tools  # tests/conftest.py: tools run from one process.
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


# ----------------------------------------------------------------------------------------------------------
# Workdirs: import → every tool, export → transformers, and back


def import_fixture(tmp_path, family: str, dtype: str = "") -> str:
  workdir = str(tmp_path / f"imported_{family}")
  hf.import_checkpoint(os.path.join(FIXTURES, family), workdir, one_device_mesh(), dtype)
  return workdir


def hf_tensors(directory: str) -> dict[str, np.ndarray]:
  tensors = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors") and name != "reference.safetensors":
      tensors.update(safetensors.numpy.load_file(os.path.join(directory, name)))
  return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_every_tensor_back_bit_for_bit(tmp_path, family):
  workdir = import_fixture(tmp_path, family)
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "exported"), one_device_mesh())
  source, back = hf_tensors(os.path.join(FIXTURES, family)), hf_tensors(exported)
  source = {k: v for k, v in source.items() if not k.endswith(hf.IGNORED_SUFFIXES)}
  if family == "gpt2":  # Written with transformers' "transformer." prefix, whatever the source used.
    source = {k if k.startswith(("transformer.", "lm_head")) else f"transformer.{k}": v for k, v in source.items()}
  assert sorted(back) == sorted(source)
  for name, value in source.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
    assert back[name].tobytes() == value.tobytes(), name
  with open(os.path.join(exported, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(FIXTURES, family, "config.json")) as f:
    original = json.load(f)
  assert config["architectures"] == original["architectures"]
  _, cfg_back = hf.model_config_from_hf(config, "exported", "float32")
  _, cfg_source = hf.model_config_from_hf(original, "source", "float32")
  assert cfg_back == cfg_source


def test_export_shards_past_the_size_limit_and_reimports(tmp_path):
  workdir = import_fixture(tmp_path, "llama3")
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "exported"), one_device_mesh(), max_shard_bytes=100_000)
  with open(os.path.join(exported, "model.safetensors.index.json")) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and files == sorted(n for n in os.listdir(exported) if n.startswith("model-"))
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in hf_tensors(exported).values())
  ref, expected = reference("llama3")
  _, cfg, _, params = hf.read_params(exported, one_device_mesh(), "float32")
  np.testing.assert_allclose(forward(cfg, params, [ref["input_ids"]])[0, ref["logit_positions"]], expected, atol=ATOL)
  with pytest.raises(UserError, match="exists"):
    hf.export_checkpoint(workdir, None, exported, one_device_mesh())


def test_import_refuses_an_existing_workdir(tmp_path):
  workdir = import_fixture(tmp_path, "gpt2")
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserError, match="already holds"):
    hf.import_checkpoint(os.path.join(FIXTURES, "gpt2"), workdir, one_device_mesh())
  assert sorted(os.listdir(workdir)) == before


def test_convert_and_generate_command_lines(tmp_path):
  """convert_hf.py writes a workdir that generate.py decodes greedily into transformers' own continuation."""
  from llm_jax.tokenizer import load_tokenizer

  workdir = str(tmp_path / "qwen2")
  ref, _ = reference("qwen2")
  greedy = ref["greedy"]
  done, out, chat, bad = run_tools(
    [
      ("convert_hf", [f"--hf_dir={FIXTURES}/qwen2", f"--workdir={workdir}"]),
      ("generate", [f"--workdir={workdir}", f"--prompt={greedy['prompt']}", "--temperature=0", "--max_new_tokens=16"]),
      ("generate", [f"--workdir={workdir}", "--chat", "--prompt=Hello", "--temperature=0", "--max_new_tokens=8"]),
      ("convert_hf", [f"--hf_dir={FIXTURES}/qwen2", f"--workdir={workdir}"]),  # Again: the workdir is taken.
    ]
  )
  assert done["code"] == 0, done["stderr"]
  assert out["code"] == 0, out["stderr"]
  tokenizer = load_tokenizer(workdir)
  new_ids = greedy["new_ids"]
  stops = [i for i, t in enumerate(new_ids) if t in tokenizer.stop_ids]
  expected = tokenizer.decode(new_ids[: stops[0] if stops else len(new_ids)])
  assert out["stdout"].rstrip("\n") == greedy["prompt"] + expected
  assert chat["code"] == 0 and chat["stdout"].startswith("Hello\n"), chat["stderr"]
  assert bad["code"] == 2 and bad["stderr"].strip().count("\n") == 0 and "already holds" in bad["stderr"]


def project_workdir(tmp_path, cfg, tokenizer) -> str:
  """A workdir as pretraining leaves it (config.json, tokenizer, checkpoint), with random weights."""
  from llm_jax import checkpoint as ckpt_lib
  from llm_jax.files import write_atomically

  workdir = str(tmp_path / "project")
  os.makedirs(workdir)
  record = {"config": {}, "model": dataclasses.asdict(cfg)}
  write_atomically(os.path.join(workdir, "config.json"), json.dumps(record))
  tokenizer.save(workdir)
  params = nnx.to_pure_dict(nnx.state(modeling.build_model(cfg, nnx.Rngs(1))))
  params = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params
  )  # Biases ≠ 0.
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(3, params, None, None, {"step": 3, "stage": "pretrain", "model": dataclasses.asdict(cfg)})
  checkpointer.wait()
  checkpointer.close()
  return workdir


def project_models():
  """A Llama-style model with the project's SentencePiece tokenizer and a GPT-2-style one (no biases) with
  the byte-level "char" tokenizer: the two kinds of model trained here."""
  from llm_jax.tokenizer import ByteTokenizer, train_sentencepiece

  text = ["the cat sat on the mat.", "a dog ran in the park.", "Beijing 2024 café 北京", "two  spaces\nnew line"]
  spm_tokenizer = train_sentencepiece(text * 50, vocab_size=300)
  llama = dataclasses.replace(PRESETS["tiny"], vocab_size=320)
  gpt2 = dataclasses.replace(PRESETS["baby_char"], num_layers=2, d_model=64, d_ff=128, vocab_size=264, max_seq_len=64)
  return {"llama_spm": (llama, spm_tokenizer), "gpt2_char": (gpt2, ByteTokenizer())}


@pytest.mark.parametrize("name", ["llama_spm", "gpt2_char"])
def test_project_models_export_and_reimport_exactly(tmp_path, name):
  cfg, tokenizer = project_models()[name]
  workdir = project_workdir(tmp_path, cfg, tokenizer)
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "exported"), one_device_mesh())
  _, cfg_back, _, params_back = hf.read_params(exported, one_device_mesh())
  _, params, _ = modeling.load_model(workdir, one_device_mesh())
  tokens = [list(range(5, 60))]
  np.testing.assert_allclose(forward(cfg_back, params_back, tokens), forward(cfg, params, tokens), atol=1e-5)


@pytest.mark.parametrize("name", ["llama_spm", "gpt2_char"])
def test_project_models_load_in_transformers_with_the_same_logits_ids_and_greedy_text(tmp_path, name):
  transformers = pytest.importorskip("transformers", reason="optional: transformers + torch are not dependencies")
  import torch

  from llm_jax.inference.loading import load_sampler
  from llm_jax.inference.sampler import SamplingConfig

  cfg, tokenizer = project_models()[name]
  workdir = project_workdir(tmp_path, cfg, tokenizer)
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "exported"), one_device_mesh())
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  texts = ["The capital of China is", "  two  spaces\nand 2024 café 北京", "x"]
  for text in texts:
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode_default(text), text
  tokens = tokenizer.encode_default(texts[1])
  with torch.no_grad():
    expected = model(torch.tensor([tokens])).logits.numpy()
  _, params, _ = modeling.load_model(workdir, one_device_mesh())
  np.testing.assert_allclose(forward(cfg, params, [tokens]), expected, atol=ATOL)
  sampler, _, _ = load_sampler(workdir, one_device_mesh())
  prompt = tokenizer.encode_default(texts[0])
  ours = sampler.generate([prompt], SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=()), jax.random.key(0))
  theirs = list(prompt)
  with torch.no_grad():  # Greedy by hand: generate()'s min_new_tokens would ban EOS, ours does not stop at it.
    for _ in range(12):
      theirs.append(int(model(torch.tensor([theirs])).logits[0, -1].argmax()))
  assert list(ours.tokens[0]) == theirs[len(prompt) :]


@pytest.mark.parametrize("family", FAMILIES)
def test_exports_of_imported_models_load_in_transformers(tmp_path, family):
  transformers = pytest.importorskip("transformers", reason="optional: transformers + torch are not dependencies")
  import torch

  exported = hf.export_checkpoint(import_fixture(tmp_path, family), None, str(tmp_path / "out"), one_device_mesh())
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
  ref, expected = reference(family)
  with torch.no_grad():
    logits = model(torch.tensor([ref["input_ids"]])).logits[0, ref["logit_positions"]].numpy()
  np.testing.assert_allclose(logits, expected, atol=ATOL)
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  for case in ref["tokenize"]:
    assert tokenizer(case["text"])["input_ids"] == case["ids"], case["text"]


def test_sft_from_an_imported_qwen2_with_its_chatml_template_lowers_the_loss(tmp_path):
  """The imported model's own template (ChatML) drives SFT; a few steps on one answer format lower the loss."""
  from configs import sft as sft_config
  from llm_jax.metrics import read_metrics
  from llm_jax.train import sft

  workdir = import_fixture(tmp_path, "qwen2")
  chats = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
    for a in range(8)
    for b in range(8)
  ]
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps(c) + "\n" for c in chats))
  config = sft_config.get_config()
  config.init_from, config.data.path, config.data.eval_path = workdir, str(path), ""
  config.steps, config.batch_size, config.seq_len, config.warmup_steps = 30, 8, 64, 3
  config.log_every, config.eval_every, config.learning_rate = 10, 30, 3e-3
  sft.run(config, str(tmp_path / "sft"), devices=jax.devices()[:1])
  eval_losses = [row["eval_loss"] for row in read_metrics(str(tmp_path / "sft")) if "eval_loss" in row]
  assert len(eval_losses) == 2 and eval_losses[1] < 0.5 * eval_losses[0], eval_losses  # Measured: 6.30 → 1.23.


def test_import_places_each_tensor_in_its_mesh_sharding_and_restores_anywhere(tmp_path):
  """Imported on an 8-device FSDP mesh (each tensor sharded as it is read), restored on one device."""
  fsdp = sharding.make_mesh(1, 8, 1, jax.devices()[:8])
  workdir = str(tmp_path / "sharded")
  hf.import_checkpoint(os.path.join(FIXTURES, "llama3"), workdir, fsdp)
  _, _, _, params = hf.read_params(os.path.join(FIXTURES, "llama3"), fsdp)
  embedding = params["embed"]["embedding"]
  assert len({repr(s.index) for s in embedding.addressable_shards}) == 8  # Split 8 ways, not replicated.
  _, restored, _ = modeling.load_model(workdir, one_device_mesh())
  ref, expected = reference("llama3")
  cfg = modeling.read_model_config(workdir)
  np.testing.assert_allclose(forward(cfg, restored, [ref["input_ids"]])[0, ref["logit_positions"]], expected, atol=ATOL)
