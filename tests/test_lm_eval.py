"""lm-evaluation-harness on the project's model (llm_jax/inference/harness.py): every request type checked against a
plain reference computation (one unpadded forward pass per sequence in JAX, no harness), batching and mesh
invariance, and parity with lm-eval's own Hugging Face backend on an imported checkpoint.

The tasks are local YAML + JSONL in tests/fixtures/lm_eval/ (no downloads).
"""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import run_tools, subprocess_env  # tests/conftest.py: the tools' environment.
from flax import nnx

lm_eval = pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[eval]")')

from lm_eval.api.instance import Instance  # noqa: E402

from llm_jax import modeling, sharding  # noqa: E402
from llm_jax.inference import harness  # noqa: E402
from llm_jax.model import PRESETS  # noqa: E402
from llm_jax.tokenizer import ByteTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "fixtures", "lm_eval")
CONTEXT = 64  # The test model's context: the rolling task's longest document (288 bytes) needs 5 windows.


@pytest.fixture(autouse=True)
def _from_the_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # The task YAML names its JSONL relative to the repository root.


@pytest.fixture(scope="module")
def model():
  """A tiny random model with the byte tokenizer (BOS by default), sharded on 8 devices."""
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=320, max_seq_len=CONTEXT)
  mesh = sharding.make_mesh(8, 1, 1)
  spec = modeling.model_spec(modeling.lm_factory(cfg), mesh)
  params = modeling.init_params(modeling.lm_factory(cfg), spec, seed=3)
  return cfg, spec, params, mesh


def make_lm(model, batch_size=8, mesh=None):
  cfg, spec, params, model_mesh = model
  mesh = mesh or model_mesh
  params = jax.device_put(params, modeling.model_spec(modeling.lm_factory(cfg), mesh).param_shardings)
  return harness.JaxLM(spec.graphdef, params, mesh, ByteTokenizer(), cfg, batch_size=batch_size, max_gen_toks=12)


# ----------------------------------------------------------------------------------------------------------
# The reference: whole sequences, one at a time, no padding, no harness.


@functools.cache
def _reference_forward(graphdef):
  """The model on one row of CONTEXT tokens (right-padded: causal attention keeps the real tokens' logits exact)."""
  return jax.jit(lambda params, tokens_T: jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens_T[None])[0], axis=-1))


def reference_log_probs(model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """log p(tokens[i + 1] | tokens[: i + 1]) and the argmax at each i < len(tokens) - 1, from one forward pass."""
  _, spec, params, _ = model
  inputs = np.zeros(CONTEXT, np.int32)
  inputs[: len(tokens) - 1] = tokens[:-1]
  log_probs = np.asarray(_reference_forward(spec.graphdef)(params, inputs))[: len(tokens) - 1]
  return log_probs[np.arange(len(tokens) - 1), tokens[1:]], log_probs.argmax(-1)


def reference_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
  """The HF backend's rule, spelt out: the context's trailing spaces go to the continuation; BOS first; an
  empty context is BOS alone; the whole string is tokenized and the continuation is what follows the context."""
  tokenizer = ByteTokenizer()
  if context:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_default(context + continuation)
    n_continuation = len(whole) - len(tokenizer.encode_default(context))
  else:
    whole = [tokenizer.bos_id] + tokenizer.encode(continuation)
    n_continuation = len(whole) - 1
  whole = whole[-(CONTEXT + 1) :]  # Cut from the left to the context.
  log_probs, greedy = reference_log_probs(model, whole)
  targets = np.asarray(whole[1:])
  return float(log_probs[-n_continuation:].sum()), bool((greedy[-n_continuation:] == targets[-n_continuation:]).all())


def reference_rolling(model, document: str) -> float:
  """Disjoint windows of CONTEXT predicted tokens, each conditioned on what fits before it in the window."""
  tokens = ByteTokenizer().encode_default(document)  # The HF backend's tok_encode: BOS included...
  sequence = [ByteTokenizer.bos_id] + tokens  # ... and the prefix token before it.
  total, start = 0.0, 0
  while start < len(tokens):
    end = min(start + CONTEXT, len(tokens))
    window = sequence[max(0, end - CONTEXT) : end + 1]
    total += float(reference_log_probs(model, window)[0][-(end - start) :].sum())
    start = end
  return total


def reference_generation(model, context: str, max_new: int, until: list[str]) -> str:
  """Greedy decoding by full forward passes, then cut at the first stop string."""
  tokenizer = ByteTokenizer()
  tokens = tokenizer.encode_default(context)
  new = []
  for _ in range(max_new):
    new.append(int(reference_log_probs(model, tokens + new + [0])[1][-1]))
    if new[-1] in tokenizer.stop_ids:
      break
  text = tokenizer.decode(new)
  for stop in until:
    text = text.split(stop)[0]
  return text


def log_likelihood(response) -> float:
  """A logged response: (log p, is_greedy) for loglikelihood, the log p alone for rolling log-likelihood."""
  return float(response[0] if isinstance(response, (list, tuple)) else response)


def run(lm, tasks, **kwargs):
  manager = harness.task_manager(tasks, TASKS)
  return harness.run_tasks(lm, tasks, manager=manager, log_samples=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------


def test_multiple_choice_equals_the_reference(model):
  results = run(make_lm(model), ["tiny_mc"])
  samples = results["samples"]["tiny_mc"]
  assert len(samples) == 5
  correct = []
  for sample in samples:
    references = [reference_loglikelihood(model, *args) for args in sample["arguments"]]
    ours = [tuple(r[0]) for r in sample["resps"]]
    np.testing.assert_allclose([o[0] for o in ours], [r[0] for r in references], atol=1e-4, rtol=0)
    assert [o[1] for o in ours] == [r[1] for r in references]
    correct.append(int(np.argmax([r[0] for r in references]) == sample["target"]))
  assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
  metrics = harness.flat_metrics(results)
  assert metrics["harness/tiny_mc/acc"] == pytest.approx(np.mean(correct))
  assert "harness/tiny_mc/acc_norm" in metrics


def test_empty_context_and_shared_rows(model):
  """An empty context is BOS alone; one-character answers share their row (same input) and still score apart."""
  lm = make_lm(model)
  pairs = [("", "the sun"), ("The cat", " sat"), ("The cat ", "s"), ("The cat ", "x"), ("The cat ", "sat")]
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  ours = lm.loglikelihood(requests)
  for (context, continuation), (log_prob, greedy) in zip(pairs, ours):
    expected = reference_loglikelihood(model, context, continuation)
    assert log_prob == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]
  assert ours[2][0] != ours[3][0]


def test_rolling_loglikelihood_over_windows_equals_the_reference(model):
  results = run(make_lm(model), ["tiny_rolling"])
  samples = results["samples"]["tiny_rolling"]
  lengths = [len(s["arguments"][0][0]) for s in samples]
  assert max(lengths) > 4 * CONTEXT  # Several windows.
  for sample in samples:
    document = sample["arguments"][0][0]
    assert sample["resps"][0][0] == pytest.approx(reference_rolling(model, document), abs=2e-4)


def test_generation_stops_and_cuts_at_stop_strings(model):
  lm = make_lm(model)
  contexts = ["The sun is", "the cat sat on", "a dog", "We walk to the old bridge.\nBirds"]
  free = [reference_generation(model, c, 12, []) for c in contexts]
  # Stop strings taken from the greedy text itself, so that every row is cut inside its generation.
  stops = [text[3:5] for text in free]
  assert all(len(s) == 2 for s in stops)
  requests = [
    Instance("generate_until", {}, (c, {"until": [s], "max_gen_toks": 12, "do_sample": False}), i)
    for i, (c, s) in enumerate(zip(contexts, stops))
  ]
  ours = lm.generate_until(requests)
  expected = [reference_generation(model, c, 12, [s]) for c, s in zip(contexts, stops)]
  assert ours == expected and all(len(o) < len(f) for o, f in zip(ours, free))


def test_generate_until_task_scores_the_reference_texts(model):
  results = run(make_lm(model), ["tiny_gen"])
  for sample in results["samples"]["tiny_gen"]:
    context = sample["arguments"][0][0]
    assert sample["resps"][0][0] == reference_generation(model, context, 12, [".", "\n"])


def test_batch_size_and_mesh_do_not_change_scores(model):
  one = run(make_lm(model, batch_size=1, mesh=sharding.make_mesh(1, 1, 1, jax.devices()[:1])), ["tiny_mc"])
  eight = run(make_lm(model, batch_size=8), ["tiny_mc"])
  a = [r[0][0] for s in one["samples"]["tiny_mc"] for r in s["resps"]]
  b = [r[0][0] for s in eight["samples"]["tiny_mc"] for r in s["resps"]]
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_unsupported_generation_settings_are_refused(model):
  lm = make_lm(model)
  request = Instance("generate_until", {}, ("a", {"until": ["."], "num_beams": 4}), 0)
  with pytest.raises(harness.UserError, match="num_beams"):
    lm.generate_until([request])


def test_unknown_task_is_one_line():
  with pytest.raises(harness.UserError, match="unknown lm-eval task"):
    harness.task_manager(["no_such_task_anywhere"], TASKS, search_defaults=False)


# ----------------------------------------------------------------------------------------------------------
# Parity with lm-eval's Hugging Face backend on an imported checkpoint (needs transformers + torch).


def test_parity_with_the_hf_backend(tmp_path):
  pytest.importorskip("torch", reason="torch is not installed (the HF backend needs it)")
  pytest.importorskip("transformers", reason="transformers is not installed")
  pytest.importorskip("accelerate", reason="accelerate is not installed (lm-eval's HF backend imports it)")
  from lm_eval.models.huggingface import HFLM

  from llm_jax import hf

  fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama2")  # BOS by default, untied head, 512 context.
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  workdir = str(tmp_path / "imported")
  hf.import_checkpoint(fixture, workdir, mesh, "float32")
  # A 64-token window (of the model's 512) so that the longer documents are scored in several rolling windows.
  ours = harness.load_lm(workdir, mesh, batch_size=4, max_length=64)
  theirs = HFLM(pretrained=fixture, backend="causal", batch_size=4, dtype="float32", device="cpu", max_length=64)
  tasks = ["tiny_mc", "tiny_rolling", "tiny_gen"]
  results = [run(lm, tasks) for lm in (ours, theirs)]
  for task in tasks[:2]:
    a, b = ([log_likelihood(r[0]) for s in res["samples"][task] for r in s["resps"]] for res in results)
    assert len(a) == len(b) > 0
    print(f"{task}: {len(a)} log-likelihoods, max |ours - HF| = {np.abs(np.subtract(a, b)).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  for task in tasks:
    for key, value in results[1]["results"][task].items():
      if isinstance(value, float) and "stderr" not in key:
        assert results[0]["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
  texts = [[s["resps"][0][0] for s in res["samples"]["tiny_gen"]] for res in results]
  assert texts[0] == texts[1]


# ----------------------------------------------------------------------------------------------------------
# The command line.


def lm_eval_command(*args) -> subprocess.CompletedProcess:
  env = subprocess_env(devices=2)
  command = [sys.executable, os.path.join(ROOT, "experiments", "lm_eval.py"), *args]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_command_writes_the_harness_files(tmp_path):
  from llm_jax import hf

  workdir = str(tmp_path / "gpt2")
  hf.import_checkpoint(
    os.path.join(ROOT, "tests", "fixtures", "hf", "gpt2"), workdir, sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  )
  out = tmp_path / "out"
  result = lm_eval_command(
    f"--workdir={workdir}", f"--checkpoint={workdir}/checkpoints/0", "--tasks=tiny_mc,tiny_gen",
    f"--include_path={TASKS}", "--limit=3", "--batch_size=4", f"--output_path={out}", "--log_samples",
    "--bootstrap_iters=0",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(p.name for p in out.rglob("*") if p.is_file())
  assert [f.split("_20")[0] for f in files] == ["results", "samples_tiny_gen", "samples_tiny_mc"], files
  results = json.loads(next(out.rglob("results_*.json")).read_text())
  assert set(results["results"]) == {"tiny_mc", "tiny_gen"} and results["n-samples"]["tiny_mc"]["effective"] == 3
  samples = next(out.rglob("samples_tiny_mc_*.jsonl")).read_text().splitlines()
  assert len(samples) == 3 and "resps" in json.loads(samples[0])


def test_command_bad_input_is_one_line():
  cases = [
    (["--workdir=/nonexistent/w", "--tasks=tiny_mc", "--output_path=/tmp/x"], "not an llm_jax workdir|not a directory"),
    (["--workdir=/tmp", "--tasks=", "--output_path=/tmp/x"], "no task"),
  ]
  for (_, message), result in zip(cases, run_tools([("lm_eval", args) for args, _ in cases], devices=2)):
    assert result["code"] == 2, result["stderr"][-2000:]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines


# ----------------------------------------------------------------------------------------------------------
# During training.


def test_tasks_during_pretraining_score_the_live_parameters(corpus, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import pretrain as pretrain_config  # configs/pretrain.py

  from llm_jax.metrics import read_metrics
  from llm_jax.train import pretrain

  config = pretrain_config.get_config()
  config.model, config.data.path, config.data.tokenizer = "tiny", corpus, "char"
  config.steps, config.batch_size, config.seq_len, config.warmup_steps = 4, 8, 32, 1
  config.log_every, config.eval_every, config.checkpoint_every, config.eval_batches = 1, 2, 4, 1
  config.eval_tasks, config.eval_tasks_include_path, config.eval_tasks_batch_size = "tiny_mc", TASKS, 4
  workdir = str(tmp_path / "run")
  pretrain.run(config, workdir, devices=jax.devices()[:2])
  logged = {row["step"]: row for row in read_metrics(workdir) if "harness/tiny_mc/acc" in row}
  assert sorted(logged) == [2, 4]
  # The final row is what the saved (final) parameters score when loaded afresh.
  final = run(harness.load_lm(workdir, sharding.make_mesh(2, 1, 1, jax.devices()[:2]), batch_size=4), ["tiny_mc"])
  assert logged[4]["harness/tiny_mc/acc"] == pytest.approx(final["results"]["tiny_mc"]["acc,none"])
  assert logged[4]["harness/tiny_mc/acc_norm"] == pytest.approx(final["results"]["tiny_mc"]["acc_norm,none"])


def test_world_facts_tasks_ask_about_the_held_out_countries(model):
  from llm_jax.tasks.world_facts import corpus

  results = harness.run_tasks(
    make_lm(model), ["world_facts_capital_qa", "world_facts_capital_mc"], limit=4, log_samples=True
  )
  held_out = {c.name: c.capital for c in corpus.split_countries(0)[1]}
  for task in ("world_facts_capital_qa", "world_facts_capital_mc"):
    docs = [s["doc"] for s in results["samples"][task]]
    assert len(docs) == 4 and all(held_out[d["country"]] for d in docs)
  for doc in (s["doc"] for s in results["samples"]["world_facts_capital_mc"]):
    assert doc["choices"][doc["answer"]] == held_out[doc["country"]] and len(set(doc["choices"])) == 4
  metrics = harness.flat_metrics(results)
  assert {"harness/world_facts_capital_qa/exact_match_strip", "harness/world_facts_capital_mc/acc"} <= set(metrics)
