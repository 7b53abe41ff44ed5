"""RLHF: Bradley-Terry, GAE and group advantages against NumPy; PPO invariants; every algorithm learns a toy."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.metrics import read_metrics
from llm_jax.tokenizer import ByteTokenizer
from llm_jax.train import pretrain, reward, rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402
import reward_model as reward_config  # noqa: E402
import rlhf as rlhf_config  # noqa: E402

TOK = ByteTokenizer()


def numpy_gae(rewards, values, mask, gamma, lam):
  b, n = rewards.shape
  adv = np.zeros((b, n))
  for i in range(b):
    length = int(mask[i].sum())
    last = 0.0
    for t in reversed(range(length)):
      next_value = values[i, t + 1] if t + 1 < length else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  return adv, (adv + values) * mask


def test_gae_matches_numpy_reference():
  rng = np.random.default_rng(0)
  rewards, values = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
  lengths = np.array([9, 4, 1, 7, 0])
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.float64)
  rewards, values = rewards * mask, values * mask
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
    adv, ret = rl.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                      jnp.asarray(mask, jnp.float32), gamma, lam)
    expected_adv, expected_ret = numpy_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, expected_ret, rtol=1e-5, atol=1e-5)


def test_group_advantages_match_numpy():
  returns = np.random.default_rng(1).normal(size=12).astype(np.float32)
  groups = returns.reshape(3, 4)
  grpo = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
  rloo = np.stack([[g[i] - np.delete(g, i).mean() for i in range(4)] for g in groups])
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(returns), 4, "grpo"), grpo.reshape(-1), rtol=1e-5)
  np.testing.assert_allclose(rl.group_advantages(jnp.asarray(returns), 4, "rloo"), rloo.reshape(-1), rtol=1e-5,
                             atol=1e-6)


def test_policy_loss_at_ratio_one_and_clipping():
  rng = np.random.default_rng(2)
  log_probs = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  advantages = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  mask = jnp.ones((3, 5))
  loss, metrics = rl.policy_loss(log_probs, log_probs, advantages, mask, 0.2)
  assert float(loss) == pytest.approx(float(metrics["unclipped_loss"])) == pytest.approx(-float(advantages.sum()))
  assert float(metrics["clip_fraction"]) == 0 and float(metrics["approx_kl"]) == 0
  # A ratio of e (> 1.2) with a positive advantage is clipped: the gradient vanishes.
  grad = jax.grad(lambda lp: rl.policy_loss(lp, log_probs - 1.0, jnp.ones((3, 5)), mask, 0.2)[0])(log_probs)
  np.testing.assert_array_equal(grad, 0.0)


def test_bradley_terry_loss_value_and_gradient_sign():
  from flax import nnx
  from llm_jax.model import PRESETS
  model = reward.RewardModel(PRESETS["tiny"], rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {"chosen": rng.integers(8, 200, (4, 12)), "rejected": rng.integers(8, 200, (4, 12)),
           "chosen_segment_ids": np.ones((4, 12), np.int32), "rejected_segment_ids": np.ones((4, 12), np.int32),
           "pair_mask": np.array([1, 1, 1, 0], np.float32)}
  batch["rejected_segment_ids"][:, 9:] = 0  # Right padding: scores are read at the last real token.
  loss, sums = reward.bradley_terry_loss(model, batch, None)
  assert float(loss) == pytest.approx(3 * np.log(2), rel=1e-6)  # Zero head: σ(0) for the three real pairs.
  grads = nnx.grad(lambda m: reward.bradley_terry_loss(m, batch, None)[0])(model)
  model.head.w_D[...] -= 0.1 * grads.head.w_D[...]
  after, sums_after = reward.bradley_terry_loss(model, batch, None)
  assert float(after) < float(loss) and float(sums_after["margin"]) > 0
  # Read independently of the loss: the chosen answers now score higher, and the loss is −log σ(chosen − rejected).
  chosen = np.asarray(reward.sequence_scores(model, batch["chosen"], batch["chosen_segment_ids"]), np.float64)
  rejected = np.asarray(reward.sequence_scores(model, batch["rejected"], batch["rejected_segment_ids"]), np.float64)
  assert np.all(chosen[:3] > rejected[:3])
  np.testing.assert_allclose(float(after), np.sum(np.log1p(np.exp(-(chosen - rejected)[:3]))), rtol=1e-5)
  np.testing.assert_allclose(float(sums_after["margin"]), np.sum((chosen - rejected)[:3]), rtol=1e-5)


def test_min_answer_log_prob_matches_numpy():
  """The likelihood term reads the answer (after the last <|assistant|>) only, for left and right padding."""
  from flax import nnx
  from llm_jax.chat import ROLE_IDS
  from llm_jax.model import PRESETS
  model = reward.RewardModel(PRESETS["tiny"], True, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  assistant = ROLE_IDS["assistant"]
  tokens = rng.integers(8, 200, (3, 12)).astype(np.int32)
  segments = np.ones((3, 12), np.int32)
  tokens[0, [2, 6]] = assistant  # Two turns: only the tokens after position 6 are the answer.
  tokens[1, 3] = assistant
  segments[1, 9:] = 0  # Right padding.
  tokens[2, :4], segments[2, :4], tokens[2, 7] = 0, 0, assistant  # Left padding.
  positions = np.maximum(np.cumsum(segments != 0, axis=1) - 1, 0)
  h = model.transformer.backbone(tokens, positions, segments)
  got = reward.min_answer_log_prob(model, h, jnp.asarray(tokens), jnp.asarray(segments))
  logits = np.asarray(model.transformer.logits(h), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  answers = {0: range(7, 12), 1: range(4, 9), 2: range(8, 12)}
  expected = [min(log_probs[b, t - 1, tokens[b, t]] for t in answers[b]) for b in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The weight starts at zero (every pair at log 2); its gradient favours the likelier answer.
  chosen, rejected = tokens[:2].copy(), tokens[:2].copy()
  rejected[:, -1] = [int(np.argmin(log_probs[b, -2])) for b in range(2)]  # The least likely last token.
  batch = {"chosen": chosen, "rejected": rejected, "chosen_segment_ids": np.ones((2, 12), np.int32),
           "rejected_segment_ids": np.ones((2, 12), np.int32), "pair_mask": np.ones(2, np.float32)}
  loss, _ = reward.bradley_terry_loss(model, batch, None)
  assert float(loss) == pytest.approx(2 * np.log(2), rel=1e-6)
  grads = nnx.grad(lambda m: reward.bradley_terry_loss(m, batch, None)[0])(model)
  assert float(grads.likelihood_weight[...]) < 0  # Raising the weight lowers the loss.


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A (barely) pretrained tiny char model: the SFT stand-in for the RL tests."""
  tmp = tmp_path_factory.mktemp("base")
  (tmp / "corpus.txt").write_text("hello world. " * 300)
  config = pretrain_config.get_config()
  config.model, config.data.path, config.data.tokenizer = "tiny", str(tmp / "corpus.txt"), "char"
  config.steps, config.warmup_steps, config.batch_size, config.seq_len = 2, 0, 8, 32
  pretrain.run(config, str(tmp / "run"), devices=jax.devices()[:1])
  return str(tmp / "run")


LETTERS = set(TOK.encode("abcdefghijklmnopqrstuvwxyz"))
PROMPTS = [[2] + TOK.encode(w) for w in ["hi", "what", "tell me", "a", "xyz", "go on", "ok", "1 2 3"]]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_toy_task_reward_rises_above_0_9(algorithm, base_workdir, tmp_path):
  """Reward 1 when the answer starts with a lowercase letter (26 of 320 ids: ~8% at the start)."""
  config = rlhf_config.get_config()
  config.init_from, config.algorithm, config.value_init = base_workdir, algorithm, "policy_head"
  config.iterations, config.max_new_tokens, config.ppo_epochs, config.learning_rate = 35, 4, 4, 1e-2
  config.prompts_per_iteration, config.group_size = (32, 1) if algorithm == "ppo" else (16, 4)
  config.minibatch_size, config.kl_coef = (16 if algorithm == "ppo" else 32), 0.01
  history = rl.run(config, str(tmp_path / algorithm), devices=jax.devices()[:1], prompts=PROMPTS,
                   reward_fn=lambda response: float(len(response) > 0 and response[0] in LETTERS))
  scores = [h["score"] for h in history]
  assert np.mean(scores[:2]) < 0.3, scores
  moving_average = np.convolve(scores, np.ones(3) / 3, mode="valid")
  assert moving_average.max() > 0.9, scores  # Mean reward over 3 consecutive iterations.
  assert np.mean(scores[-5:]) > 0.8, scores
  # At the first minibatch the new policy is the rollout policy: ratio 1, clipped ≡ unclipped.
  assert history[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
  # Iteration 1 samples from the SFT policy itself: the KL to it is zero.
  assert abs(history[0]["kl_k1"]) < 1e-5 and abs(history[0]["kl_k3"]) < 1e-5
  assert all(np.isfinite(h["kl_k1"]) for h in history) and history[-1]["kl_k1"] > 0
  logged = read_metrics(str(tmp_path / algorithm))
  assert len(logged) == 35 and {"score", "kl_k1", "kl_k3", "clip_fraction", "approx_kl", "entropy",
                                "response_length"} <= set(logged[-1])
  if algorithm == "ppo":
    assert {"value_loss", "explained_variance"} <= set(logged[-1])


def test_sequence_scores_read_the_last_real_token_of_padded_rows():
  """A padded row scores as the row alone (the head at its last token), whether padded on the right or left."""
  from flax import nnx
  from llm_jax.model import PRESETS
  model = reward.RewardModel(PRESETS["tiny"], rngs=nnx.Rngs(0))
  model.head.w_D[...] = jax.random.normal(jax.random.key(1), model.head.w_D.shape)
  rng = np.random.default_rng(4)
  t, lengths = 12, (5, 9, 12)
  real = [rng.integers(8, 200, n).astype(np.int32) for n in lengths]
  tokens, segments = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
  tokens[0, :5], segments[0, :5] = real[0], 1  # Right padding.
  tokens[1, 3:], segments[1, 3:] = real[1], 1  # Left padding.
  tokens[2], segments[2] = real[2], 1
  np.testing.assert_array_equal(reward.last_token_index(jnp.asarray(segments)), [4, 11, 11])
  scores = nnx.jit(reward.sequence_scores)(model, jnp.asarray(tokens), jnp.asarray(segments))
  head = nnx.jit(lambda m, row: m(row[None], jnp.arange(len(row))[None], jnp.ones((1, len(row)), jnp.int32)))
  alone = [float(head(model, jnp.asarray(row))[0, -1]) for row in real]
  np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-6)
  assert len(set(np.round(alone, 4))) == 3  # Distinct rows score differently: reading a wrong token would show.


@pytest.mark.parametrize("likelihood_feature", [True, False])
def test_reward_model_learns_synthetic_preferences(likelihood_feature, base_workdir, tmp_path):
  """Chosen answers are polite full sentences, rejected ones are shouted fragments. Without the likelihood term
  the head alone must rank them: it reads the last real token, so reading any other token would not learn."""
  rng = np.random.default_rng(0)
  words = ["river", "city", "stone", "bread", "music", "garden", "window", "market"]
  lines = []
  for _ in range(240):
    w = rng.choice(words, 2)
    lines.append(json.dumps({"prompt": f"tell me about the {w[0]}",
                             "chosen": f"The {w[0]} is near the {w[1]}.",
                             "rejected": f"{w[1].upper()} {w[0].upper()}!!"}))
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
  config = reward_config.get_config()
  config.init_from, config.data.path = base_workdir, str(tmp_path / "pairs.jsonl")
  config.likelihood_feature = likelihood_feature
  config.steps, config.batch_size, config.seq_len, config.learning_rate = 60, 16, 64, 1e-3
  config.eval_every, config.log_every, config.warmup_steps = 60, 20, 5
  result = reward.run(config, str(tmp_path / "rm"), devices=jax.devices()[:1])
  first = next(r for r in read_metrics(str(tmp_path / "rm")) if r["step"] == 0)
  assert first["eval_loss"] == pytest.approx(np.log(2), rel=1e-4)  # The zero head starts at chance.
  assert result.last_eval["eval_accuracy"] >= 0.95 and result.last_eval["eval_margin"] > 1.0
