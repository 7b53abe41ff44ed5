"""The inspector (llm_jax/inference/inspection.py, experiments/inspect.py): captured attention ≡ a NumPy attention
from the layer inputs (GQA, RoPE), logit lens ≡ the model's logits at the last layer, top-k ≡ softmax(logits / T),
the chosen tokens ≡ the sampler's and generate.py's, and the JSON behind every figure. One model (and its sampler)
and one trained workdir serve the whole module: the cost is compiling, so each program is built once."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_tools  # tests/conftest.py: tools run from one process.
from flax import nnx

from llm_jax import checkpoint as ckpt_lib
from llm_jax import modeling, sharding
from llm_jax.errors import UserError
from llm_jax.inference import inspection
from llm_jax.inference.sampler import Sampler, SamplingConfig, text_prompts
from llm_jax.model import PRESETS, Transformer
from llm_jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dataclasses.replace(PRESETS["tiny"], vocab_size=264)  # RoPE, RMSNorm, SwiGLU, 4 query heads on 2 K/V heads.


def numpy_rope(x, positions, theta):
  h = x.shape[-1]
  angle = np.asarray(positions, np.float64)[..., None] * (1.0 / theta ** (np.arange(0, h, 2) / h))
  cos, sin = (f(np.concatenate([angle, angle], -1))[:, :, None, :] for f in (np.cos, np.sin))
  return x * cos + np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1) * sin


def peaked(cfg, seed=0):
  """(graphdef, params) with larger weights than the init: peaked attention and predictions."""
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, nnx.to_pure_dict(state))


@pytest.mark.parametrize("scan", [False, True])
def test_captured_attention_equals_numpy_attention_and_last_lens_row_the_logits(scan):
  graphdef, params = peaked(TINY)
  if scan:  # The same parameters stacked for the scanned model.
    scanned_graphdef = nnx.split(Transformer(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0)))[0]
    params = dict(params, blocks=jax.tree.map(lambda *layers: jnp.stack(layers), *params["blocks"].values()))
    graphdef = scanned_graphdef
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 13), 8, 264))

  @jax.jit
  def run(params, tokens):
    model = nnx.merge(graphdef, params)
    logits, internals = model.forward_with_internals(tokens)
    return logits, internals, model(tokens), inspection.logit_lens(model, internals.residual_stream)

  logits, internals, plain_logits, lens = run(params, tokens)
  np.testing.assert_array_equal(logits, plain_logits)  # Capturing changes nothing in the logits...
  # ...and the last layer's lens is the model's head (on a [layers + 1, ...] batch: float32 rounding apart).
  np.testing.assert_allclose(lens[-1], plain_logits, rtol=1e-5, atol=1e-5)
  assert internals.residual_stream.shape == (TINY.num_layers + 1, 2, 13, TINY.d_model)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  blocks = [jax.tree.map(lambda a: a[i], p["blocks"]) for i in range(TINY.num_layers)] if scan else p["blocks"]
  np.testing.assert_allclose(internals.residual_stream[0], p["embed"]["embedding"][tokens], rtol=1e-6)
  positions = np.broadcast_to(np.arange(13), (2, 13))
  for layer in range(TINY.num_layers):
    x = np.asarray(internals.residual_stream[layer], np.float64)  # The layer's input.
    block = blocks[layer]
    h = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + TINY.norm_eps) * block["attn_norm"]["scale"]
    q, k = (np.einsum("bld,dnh->blnh", h, block["attn"][w]) for w in ("wq_DNH", "wk_DKH"))
    q, k = numpy_rope(q, positions, TINY.rope_theta), numpy_rope(k, positions, TINY.rope_theta)
    k = np.repeat(k, TINY.num_heads // TINY.num_kv_heads, axis=2)  # Query head j reads K/V head j // 2.
    scores = np.einsum("blnh,bsnh->bnls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((13, 13), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    got = np.asarray(internals.attention_probs[layer])
    assert got.max() > 0.9  # Peaked: a wrong head mapping or rotation would show.
    np.testing.assert_allclose(got, probs, atol=2e-5, err_msg=f"layer {layer}")
    assert np.all(np.triu(got, 1) == 0)  # The future gets exactly nothing.


@pytest.fixture(scope="module")
def tiny():
  """The byte-level TINY model with peaked weights, its sampler and a jitted forward, shared by the module."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  factory = modeling.lm_factory(TINY)
  spec = modeling.model_spec(factory, mesh)
  params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, modeling.init_params(factory, spec, seed=0))
  forward = jax.jit(lambda params, tokens: spec.merge(params)(tokens))
  return dict(mesh=mesh, spec=spec, params=params, sampler=Sampler(spec.graphdef, params, mesh), forward=forward)


@pytest.mark.parametrize("chat", [False, True])
def test_steps_are_the_samplers_tokens_with_softmax_top_k(chat, tiny, tmp_path):
  temperature = 0.0 if chat else 0.7
  sampling = SamplingConfig(max_new_tokens=8, temperature=temperature)
  key, tokenizer, sampler = jax.random.key(3), ByteTokenizer(), tiny["sampler"]
  again = lambda **kw: inspection.inspect(
    tiny["spec"].graphdef,
    tiny["params"],
    tiny["mesh"],
    tokenizer,
    "the cat",
    chat=chat,
    sampling=sampling,
    key=key,
    top_k_shown=4,
    sampler=sampler,
    **kw,
  )
  result = again()
  chosen = [s["id"] for s in result["steps"]]
  assert tokenizer.decode(chosen) == sampler.complete(tokenizer, ["the cat"], sampling, key, chat=chat)[0]
  prompt = [t["id"] for t in result["prompt_tokens"]]
  # The model's own forward pass, padded to one length for both cases (causal: the padding changes no earlier row).
  tokens = np.zeros((1, 64), np.int32)
  tokens[0, : len(prompt) + len(chosen)] = prompt + chosen
  logits = np.asarray(tiny["forward"](tiny["params"], tokens)[0], np.float64)
  banned = result["sampling"]["banned_ids"]
  assert bool(banned) == chat  # Chat mode bans role tokens as the sampler does.
  for t, step in enumerate(result["steps"]):
    row = logits[len(prompt) - 1 + t] / (temperature or 1.0)
    row[banned] = -np.inf
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:4]
    assert [c["id"] for c in step["top"]] == top.tolist()
    np.testing.assert_allclose([c["prob"] for c in step["top"]], probs[top], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(step["prob"], probs[step["id"]], rtol=1e-4)
    np.testing.assert_allclose(step["sampler_prob"], probs[step["id"]], rtol=1e-3)  # No top-k/top-p here.
    nonzero = probs[probs > 0]
    np.testing.assert_allclose(step["entropy"], -np.sum(nonzero * np.log(nonzero)), rtol=1e-4, atol=1e-6)
    assert step["rank"] == 1 + int(np.sum(probs > probs[step["id"]]))
    if temperature == 0:
      assert step["rank"] == 1  # Greedy: the argmax of the full forward pass.
    np.testing.assert_allclose(step["lens"]["prob"][-1], step["prob"], rtol=1e-5)
    assert step["lens"]["rank"][-1] == step["rank"]
  if "\ufffd" not in result["answer"]:  # (A random model's bytes may not be UTF-8.)
    assert "".join(s["piece"] for s in result["steps"] if not s["special"]) == result["answer"]
  # Every number behind the figures is in the JSON, which round-trips.
  paths = inspection.write(result, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(["INSPECT.md", "inspect.json", *inspection.FIGURES])
  assert json.loads((tmp_path / "inspect.json").read_text()) == result and len(paths) == 7
  weights = np.asarray(result["attention"]["weights"])
  query = result["attention"]["query_position"]
  assert weights.shape == (TINY.num_layers, TINY.num_heads, query + 1) == (2, 4, len(result["attention"]["context"]))
  np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-5)
  np.testing.assert_allclose(result["attention"]["head_mean"], weights.mean(1), rtol=1e-6)
  assert all(len(s["lens"]["rank"]) == TINY.num_layers + 1 for s in result["steps"])
  with pytest.raises(UserError, match="--step=8: the answer has 8 step"):
    again(step=8)


def test_key_step_is_the_first_new_word():
  pieces = ["The", " capital", " of", " China", " is", " Be", "ijing", ".", "<|end|>"]
  special = [False] * 8 + [True]
  probs = [0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.99, 0.95, 0.9]
  assert inspection.key_step("Where is the capital of China?", pieces, special, probs)[0] == 5
  chars = list("The capital of China is Beijing.")
  assert inspection.key_step("Where is the capital of China?", chars, [False] * len(chars), [0.5] * len(chars))[0] == 24
  # Every word copied from the prompt: the least likely content token.
  assert inspection.key_step("the cat", ["the", " cat", "<eos>"], [False, False, True], [0.9, 0.3, 0.1])[0] == 1


@pytest.fixture(scope="module")
def workdir(tiny, tmp_path_factory):
  """A pretrain workdir as the stage leaves one (config, tokenizer, checkpoint 2 with its meta) holding the `tiny`
  model: written by the project's checkpointer without an optimizer state, as an imported model is (no training:
  its compiles would be most of this module's time, and what the tools read is the same)."""
  path = tmp_path_factory.mktemp("inspect") / "run"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"config": {}, "model": dataclasses.asdict(TINY)}))
  ByteTokenizer().save(str(path))
  checkpointer = ckpt_lib.Checkpointer(str(path))
  checkpointer.save(2, tiny["params"], None, None, {"stage": "pretrain", "step": 2, "model": dataclasses.asdict(TINY)})
  checkpointer.close()
  return str(path)


def test_cli_picks_the_tokens_generate_py_picks(workdir, tiny, tmp_path):
  """`python experiments/inspect.py` (a file named like the standard library's inspect, which jax imports) runs,
  and picks generate.py's tokens: each as its own process would (tests/cli_cases.py)."""
  common = [f"--workdir={workdir}", "--prompt=Where is the cat?", "--chat", "--temperature=0", "--max_new_tokens=10"]
  generated, inspected = run_tools(
    [("generate", common), ("inspect", [*common, f"--output={tmp_path}/out", "--checkpoint=2", "--top_k_shown=3"])]
  )
  assert generated["code"] == 0, generated["stderr"]
  assert inspected["code"] == 0, inspected["stderr"]
  result = json.loads((tmp_path / "out" / "inspect.json").read_text())
  assert generated["stdout"] == "Where is the cat?\n" + result["answer"] + "\n"
  assert result["checkpoint"] == 2 and result["stage"] == "pretrain" and len(result["steps"][0]["top"]) == 3
  assert f"answer: {inspection._quote(result['answer'])}" in inspected["stdout"]
  assert "logit lens" in inspected["stdout"]
  # The ids too (a random model's bytes need not be UTF-8, so equal text could hide different invalid bytes).
  sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
  (prompt,), sampling = text_prompts(ByteTokenizer(), ["Where is the cat?"], sampling, True)
  assert [t["id"] for t in result["prompt_tokens"]] == prompt
  expected = tiny["sampler"].generate([prompt], sampling, jax.random.key(0)).tokens[0]
  assert [s["id"] for s in result["steps"]] == list(expected)


def test_import_inspect_from_experiments_is_the_standard_library():
  """A script's folder comes first on the import path: from experiments/, `import inspect` finds
  experiments/inspect.py, which must hand over the standard library's module (and be it for later imports)."""
  code = """if True:
    import importlib.machinery, os, sys, sysconfig
    found = importlib.machinery.PathFinder.find_spec("inspect", sys.path).origin
    assert os.path.samefile(found, "inspect.py"), found  # The tool is what the import system finds...
    import inspect  # ...and what it returns is the standard library's module,
    import dataclasses  # which later imports get too.
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "inspect.py")
    assert os.path.samefile(inspect.__file__, stdlib), inspect.__file__
    assert os.path.samefile(inspect.signature.__code__.co_filename, stdlib)
    assert sys.modules["inspect"] is inspect is dataclasses.inspect
    assert str(inspect.signature(lambda a, *b, c=1: 0)) == "(a, *b, c=1)"
    assert "absl" not in sys.modules  # The tool did not run.
    print("ok")
  """
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=os.path.join(ROOT, "experiments"),
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=""),
  )
  assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
