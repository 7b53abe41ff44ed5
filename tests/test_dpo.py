"""DPO: each loss against NumPy; stored reference log-probs equal a fresh forward pass; a toy preference task that
needs generalisation; SimPO without a reference; gradient accumulation; DPO with LoRA (adapters only on a
bit-identical base that is also the reference, loaded merged, exact resume reusing the cached reference).

Cost: one module-wide full run and one LoRA run that the other tests reuse (as the uninterrupted run, the
reference values, the workdir to load); a written random base instead of a pretraining run."""

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import chat as chat_lib
from llm_jax import checkpoint as ckpt_lib
from llm_jax import hf, lora, modeling, sharding
from llm_jax.errors import UserError
from llm_jax.inference.loading import load_sampler, resolve
from llm_jax.inference.sampler import SamplingConfig
from llm_jax.metrics import read_metrics
from llm_jax.model import LORA_TARGETS, PRESETS, LoraConfig
from llm_jax.modeling import load_model
from llm_jax.tokenizer import ByteTokenizer, load_tokenizer
from llm_jax.train import dpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import dpo as dpo_config  # noqa: E402


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


# Hand-made summed answer log-probs of 5 pairs (policy and reference) and answer lengths.
LOGP = {"chosen": np.array([-3.0, -10.0, -2.5, -7.0, -1.0]), "rejected": np.array([-4.0, -6.0, -2.5, -12.0, -0.5])}
REF = {"chosen": np.array([-3.5, -9.0, -2.0, -8.0, -1.0]), "rejected": np.array([-3.0, -6.5, -3.0, -9.0, -0.5])}
LENGTH = {"chosen": np.array([3.0, 5.0, 1.0, 4.0, 0.0]), "rejected": np.array([2.0, 5.0, 2.0, 6.0, 1.0])}


def _pair_losses(loss, beta, label_smoothing=0.0, gamma=0.0):
  f32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
  settings = dpo.LossSettings(loss, beta, label_smoothing, gamma)
  loss_B, rewards = dpo.pair_losses(settings, f32(LOGP), None if loss == "simpo" else f32(REF), f32(LENGTH))
  return np.asarray(loss_B, np.float64), {k: np.asarray(v, np.float64) for k, v in rewards.items()}


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.5, 0.2)])
def test_sigmoid_loss_matches_numpy(beta, eps):
  got, rewards = _pair_losses("sigmoid", beta, eps)
  delta = (LOGP["chosen"] - REF["chosen"]) - (LOGP["rejected"] - REF["rejected"])  # [1.5, -0.5, -1, 4, 0]
  expected = -(1 - eps) * np_log_sigmoid(beta * delta) - eps * np_log_sigmoid(-beta * delta)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[4] == pytest.approx(np.log(2), rel=1e-6)  # Δ = 0: log 2 whatever ε.
  np.testing.assert_allclose(rewards["chosen"], beta * (LOGP["chosen"] - REF["chosen"]), rtol=1e-6)
  np.testing.assert_allclose(rewards["rejected"], beta * (LOGP["rejected"] - REF["rejected"]), rtol=1e-6)


def test_hinge_loss_matches_numpy():
  got, _ = _pair_losses("hinge", 0.5)
  delta = (LOGP["chosen"] - REF["chosen"]) - (LOGP["rejected"] - REF["rejected"])
  np.testing.assert_allclose(got, np.maximum(0.0, 1 - 0.5 * delta), rtol=1e-6)
  assert got[3] == 0.0  # β·Δ = 2 > 1: past the margin, no loss.


def test_ipo_loss_uses_per_token_means():
  beta = 0.25
  got, rewards = _pair_losses("ipo", beta)
  mean = lambda side: (LOGP[side] - REF[side]) / np.maximum(LENGTH[side], 1)  # An empty answer counts as 1 token.
  np.testing.assert_allclose(got, (mean("chosen") - mean("rejected") - 1 / (2 * beta)) ** 2, rtol=1e-6)
  np.testing.assert_allclose(rewards["chosen"], beta * (LOGP["chosen"] - REF["chosen"]), rtol=1e-6)  # Summed.


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_uses_mean_log_probs_and_no_reference(eps):
  beta, gamma = 2.0, 0.8
  got, rewards = _pair_losses("simpo", beta, eps, gamma)
  avg = {side: LOGP[side] / np.maximum(LENGTH[side], 1) for side in ("chosen", "rejected")}
  z = beta * (avg["chosen"] - avg["rejected"]) - gamma
  np.testing.assert_allclose(got, -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z), rtol=1e-6)
  np.testing.assert_allclose(rewards["chosen"], beta * avg["chosen"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Training.

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_pairs(path, words):
  """ "say WORD" prefers the word in lowercase to uppercase, "shout WORD" the reverse (alternating): no answer is
  better by itself (a token bias stays at 50 %), the preferred one depends on the prompt's first word."""
  with open(path, "w") as f:
    for i, w in enumerate(words):
      verb, chosen, rejected = ("say", w, w.upper()) if i % 2 == 0 else ("shout", w.upper(), w)
      f.write(json.dumps({"prompt": f"{verb} {w}", "chosen": chosen, "rejected": rejected}) + "\n")


def random_words(rng, n):
  return ["".join(rng.choice(list(LETTERS), 4)) for _ in range(n)]


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """The SFT stand-in: a tiny random model with the byte tokenizer, written as pretraining leaves a workdir
  (config.json, tokenizer, one checkpoint). Written, not trained: a pretraining run costs seconds of tracing and
  the toy task needs nothing a few pretraining steps would teach."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  os.makedirs(workdir)
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=ByteTokenizer.vocab_size, max_seq_len=64)
  (workdir / "config.json").write_text(json.dumps({"config": {}, "model": dataclasses.asdict(cfg)}))
  ByteTokenizer().save(str(workdir))
  mesh = sharding.make_mesh(-1, 1, 1, jax.devices()[:1])
  spec = modeling.model_spec(modeling.lm_factory(cfg), mesh)
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  meta = {"step": 3, "stage": "pretrain", "model": dataclasses.asdict(cfg)}
  checkpointer.save(3, modeling.init_params(modeling.lm_factory(cfg), spec, 0), None, None, meta)
  checkpointer.close()
  return str(workdir)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
  """Train and held-out pairs about disjoint random words: only the rule (lowercase), not the words, carries over."""
  tmp = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  words = list(dict.fromkeys(random_words(rng, 400)))
  train, held_out = words[:300], words[300:364]
  assert not set(train) & set(held_out)
  write_pairs(tmp / "train.jsonl", train)
  write_pairs(tmp / "held_out.jsonl", held_out)
  return str(tmp / "train.jsonl"), str(tmp / "held_out.jsonl")


def dpo_cfg(base_workdir, pair_files, **overrides):
  config = dpo_config.get_config()
  config.init_from, (config.data.path, config.data.eval_path) = base_workdir, pair_files
  config.batch_size, config.seq_len, config.learning_rate, config.warmup_steps = 16, 32, 1e-3, 0
  config.steps, config.eval_every, config.log_every, config.checkpoint_every = 24, 24, 1, 24
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def lora_cfg(base_workdir, pair_files):
  config = dpo_cfg(base_workdir, pair_files, learning_rate=1e-2)  # Adapters start at zero: a larger step.
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 8.0, "all"
  config.checkpoint_every = 12  # Step 12's checkpoint: where the resume test restarts.
  return config


def step_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def toy_run(base_workdir, pair_files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dpo") / "run")
  result = dpo.run(dpo_cfg(base_workdir, pair_files), workdir, devices=jax.devices()[:1])
  return workdir, result


@pytest.fixture(scope="module")
def lora_run(base_workdir, pair_files, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dpo_lora") / "run")
  result = dpo.run(lora_cfg(base_workdir, pair_files), workdir, devices=jax.devices()[:1])
  return workdir, result


def test_dpo_learns_a_preference_that_generalizes_to_unseen_words(toy_run):
  workdir, result = toy_run
  first = next(r for r in read_metrics(workdir) if r["step"] == 0 and "eval_loss" in r)
  # At step 0 the policy is the reference: every pair at loss log 2, zero rewards and KL proxy.
  assert first["eval_loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert abs(first["eval_margin"]) < 1e-5 and abs(first["eval_kl_proxy"]) < 1e-4
  assert result.last_eval["eval_accuracy"] > 0.9, result.last_eval
  assert result.last_eval["eval_margin"] > 0 and result.last_eval["eval_loss"] < np.log(2) - 0.1
  assert result.last_eval["eval_rewards_chosen"] > result.last_eval["eval_rewards_rejected"]
  for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "kl_proxy", "logps_chosen"):
    assert np.isfinite(result.last_metrics[key]), key


def test_stored_reference_log_probs_equal_a_fresh_forward_pass(toy_run, base_workdir, pair_files):
  """Each stored value, against the init model run on the pair alone (unpadded), log-softmax in float64."""
  workdir, _ = toy_run
  with np.load(os.path.join(workdir, dpo.REFERENCE_FILE), allow_pickle=False) as f:
    stored = {k: f[k] for k in f.files}
  assert json.loads(str(stored["fingerprint"]))["init_from"] == os.path.abspath(base_workdir)
  tokenizer = load_tokenizer(base_workdir)
  mesh = sharding.make_mesh(-1, 1, 1, jax.devices()[:1])
  spec, params, _ = load_model(base_workdir, mesh)
  model = spec.merge(params)
  _, eval_rows = dpo.prepare_pairs(dpo_cfg(base_workdir, pair_files), tokenizer)
  forward = jax.jit(
    lambda row: model(row[None], jnp.arange(row.shape[0])[None], jnp.ones((1, row.shape[0]), jnp.int32))
  )
  for side in ("chosen", "rejected"):
    expected = []
    for i in range(8):  # The first held-out pairs (eval pairs are in file order).
      length = int(eval_rows[f"{side}_segment_ids"][i].sum())
      row = eval_rows[side][i, :length]
      with jax.set_mesh(mesh):
        logits = np.asarray(forward(jnp.asarray(row)), np.float64)[0]
      log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      start = int(eval_rows[f"{side}_answer_start"][i])
      expected.append(sum(log_probs[t - 1, row[t]] for t in range(start, length)))
    np.testing.assert_allclose(stored[f"eval_{side}"][:8], expected, rtol=1e-5, atol=1e-5)
  assert stored["train_chosen"].shape == (300,) and stored["eval_chosen"].shape == (64,)


def test_simpo_trains_without_reference_log_probs(base_workdir, pair_files, tmp_path, monkeypatch):
  def no_reference_model(*args, **kwargs):
    raise AssertionError("SimPO has no reference model")

  monkeypatch.setattr(dpo, "compute_reference_log_probs", no_reference_model)
  config = dpo_cfg(base_workdir, pair_files, loss="simpo", beta=2.0, simpo_gamma=0.5, steps=20, eval_every=20)
  result = dpo.run(config, str(tmp_path / "simpo"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "simpo" / dpo.REFERENCE_FILE)
  assert "kl_proxy" not in result.last_metrics
  assert result.last_eval["eval_accuracy"] > 0.9, result.last_eval


def test_generate_reads_a_dpo_workdir(toy_run):
  """A DPO workdir holds a language model: generate (and every later stage) starts from it. In process, through
  the calls experiments/generate.py makes (its flag handling is tested with the other command-line tools)."""
  workdir, _ = toy_run
  workdir, step = resolve(workdir, "")
  sampler, tokenizer, meta = load_sampler(workdir, sharding.make_mesh(-1, 1, 1, jax.devices()[:1]), step)
  assert meta["stage"] == "dpo" and meta["step"] == 24
  chat_lib.check_chat_format(tokenizer)
  sampling = SamplingConfig(max_new_tokens=4, temperature=0.0)
  answers = sampler.complete(tokenizer, ["say wxyz", "shout wxyz"], sampling, jax.random.key(0), chat=True)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_grad_accum_gives_the_same_updates(toy_run, base_workdir, pair_files, tmp_path):
  """The reference columns split into microbatches with their pairs: two microbatches make the same updates as
  the toy run's single batch (its first 3 steps; stop_after keeps the 24-step schedule)."""
  workdir, _ = toy_run
  config = dpo_cfg(base_workdir, pair_files, grad_accum=2, eval_batches=1)
  dpo.run(config, str(tmp_path / "accum2"), devices=jax.devices()[:1], stop_after=3)
  whole, accum = step_losses(workdir), step_losses(str(tmp_path / "accum2"))
  assert sorted(accum) == [1, 2, 3] and abs(whole[3] - np.log(2)) > 1e-3  # The updates moved the policy.
  np.testing.assert_allclose([accum[k] for k in (1, 2, 3)], [whole[k] for k in (1, 2, 3)], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# LoRA: adapters on the frozen init_from model, which is also the reference.


def test_dpo_with_lora_trains_only_adapters_on_the_bit_identical_base(lora_run, toy_run, base_workdir):
  workdir, result = lora_run
  first = next(r for r in read_metrics(workdir) if r["step"] == 0 and "eval_loss" in r)
  # B = 0 at the start: the policy is the reference exactly (log 2, zero margin and KL proxy).
  assert first["eval_loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert abs(first["eval_margin"]) < 1e-5 and abs(first["eval_kl_proxy"]) < 1e-4
  assert result.last_eval["eval_accuracy"] > 0.9, result.last_eval  # Measured: 1.0.
  assert result.last_eval["eval_margin"] > 0 and result.last_eval["eval_loss"] < np.log(2) - 0.05  # 0.616.
  # The reference is the base without adapters: the same values as the full fine-tuning run's (same init_from).
  read = lambda w: dict(np.load(os.path.join(w, dpo.REFERENCE_FILE), allow_pickle=False))
  lora_ref, full_ref = read(workdir), read(toy_run[0])
  assert sorted(lora_ref) == sorted(full_ref)
  for key in full_ref:
    np.testing.assert_array_equal(lora_ref[key], full_ref[key])
  # The base weights the policy ran with are init_from's, bit for bit; only adapters trained.
  mesh = sharding.make_mesh(-1, 1, 1, jax.devices()[:1])
  _, base_params, _ = load_model(base_workdir, mesh)
  trainable, frozen = result.state.split(result.params)
  assert jax.tree.structure(frozen) == jax.tree.structure(base_params)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), frozen, base_params)
  assert all(p[-1] in ("lora_a", "lora_b") for p in lora.flatten(trainable))
  assert any(float(jnp.max(jnp.abs(v))) > 0 for p, v in lora.flatten(trainable).items() if p[-1] == "lora_b")
  # The checkpoint: adapters only (and their Adam moments), its meta naming the base.
  meta = ckpt_lib.workdir_meta(workdir)
  assert meta["stage"] == "dpo" and meta["lora"]["base"] == os.path.abspath(base_workdir)
  assert (meta["lora"]["base_step"], meta["lora"]["rank"], meta["lora"]["alpha"]) == (3, 4, 8.0)
  params_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, "24", "params")
  saved_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(params_dir) for f in fs)
  adapter_bytes = sum(x.size * 4 for x in jax.tree.leaves(trainable))
  base_bytes = sum(x.size * 4 for x in jax.tree.leaves(base_params))
  assert adapter_bytes < base_bytes / 4 and saved_bytes < base_bytes / 4, (saved_bytes, adapter_bytes, base_bytes)


def test_a_dpo_lora_workdir_loads_merged_for_generate_and_export(lora_run, tmp_path):
  workdir, result = lora_run
  mesh = sharding.make_mesh(-1, 1, 1, jax.devices()[:1])
  spec, params, meta = load_model(workdir, mesh)
  assert meta["step"] == 24 and not spec.frozen
  expected = lora.merge(result.params, LoraConfig(4, 8.0, tuple(LORA_TARGETS)))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), params, expected)
  tokens = jnp.asarray([list(range(8, 40))], jnp.int32)
  with jax.set_mesh(mesh):
    merged_logits = jax.jit(lambda p: spec.merge(p)(tokens))(params)
    adapter_logits = jax.jit(lambda p: result.state.merge(p)(tokens))(result.params)
  np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(adapter_logits), atol=2e-5)
  # generate.py's loader and the HF export read the same merged weights.
  sampler, _, _ = load_sampler(workdir, mesh)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), sampler.params, params)
  exported = hf.export_checkpoint(workdir, None, str(tmp_path / "hf"), mesh)
  _, _, _, params_back = hf.read_params(exported, mesh)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params_back, params)


def test_lora_resume_restores_base_and_adapters_reuses_the_reference_and_continues_exactly(
  lora_run, base_workdir, pair_files, tmp_path, monkeypatch
):
  """Resumed from step 12's checkpoint of the LoRA run (as a preemption after it leaves the workdir): the base
  comes back from init_from, the adapters and optimizer from the checkpoint, the reference values from the
  workdir; steps 13-24 give the uninterrupted run's losses."""
  workdir, _ = lora_run
  split = str(tmp_path / "split")
  shutil.copytree(workdir, split, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
  shutil.rmtree(os.path.join(split, ckpt_lib.CHECKPOINT_DIR, "24"))
  assert sorted(os.listdir(os.path.join(split, ckpt_lib.CHECKPOINT_DIR))) == ["12"]

  def no_reference_model(*args, **kwargs):
    raise AssertionError("the stored reference log-probs should have been reused")

  monkeypatch.setattr(dpo, "compute_reference_log_probs", no_reference_model)
  config, devices = lora_cfg(base_workdir, pair_files), jax.devices()[:1]
  dpo.run(config, split, devices=devices)
  whole = step_losses(workdir)
  assert sorted(whole) == list(range(1, 25))
  assert step_losses(split) == {k: v for k, v in whole.items() if k > 12}  # Only the resumed run's rows.
  # The same workdir with other data: its checkpoints were trained against other reference values.
  other = tmp_path / "other.jsonl"
  write_pairs(other, random_words(np.random.default_rng(1), 40))
  config.data.path = str(other)
  with pytest.raises(UserError, match=r"reference log-probs of another model, data or tokenizer .*data_sha256"):
    dpo.run(config, split, devices=devices)
