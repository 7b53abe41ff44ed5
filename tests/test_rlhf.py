"""RLHF: Bradley-Terry, GAE and group advantages against NumPy; PPO invariants; every algorithm learns a toy."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.metrics import read_metrics
from llm_jax.sequences import positions_from_segments, prompt_response_rows
from llm_jax.tokenizer import ByteTokenizer
from llm_jax.train import pretrain, reward_model, rlhf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import pretrain as pretrain_config  # noqa: E402
import reward_model as reward_config  # noqa: E402
import rlhf as rlhf_config  # noqa: E402

TOK = ByteTokenizer()
SPECIAL_IDS = tuple(sorted(TOK.special_ids))  # 0-7.


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
    adv, ret = rlhf.gae(
      jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask, jnp.float32), gamma, lam
    )
    expected_adv, expected_ret = numpy_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, expected_ret, rtol=1e-5, atol=1e-5)


def test_policy_loss_at_ratio_one_and_clipping():
  rng = np.random.default_rng(2)
  log_probs = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  advantages = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  mask = jnp.ones((3, 5))
  loss, metrics = rlhf.policy_loss(log_probs, log_probs, advantages, mask, 0.2)
  assert float(loss) == pytest.approx(float(metrics["unclipped_loss"])) == pytest.approx(-float(advantages.sum()))
  assert float(metrics["clip_fraction"]) == 0 and float(metrics["approx_kl"]) == 0
  # A ratio of e (> 1.2) with a positive advantage is clipped: the gradient vanishes.
  grad = jax.grad(lambda lp: rlhf.policy_loss(lp, log_probs - 1.0, jnp.ones((3, 5)), mask, 0.2)[0])(log_probs)
  np.testing.assert_array_equal(grad, 0.0)


def test_bradley_terry_loss_value_and_gradient_sign():
  from flax import nnx

  from llm_jax.model import PRESETS

  model = reward_model.RewardModel(PRESETS["tiny"], rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = {
    "chosen": rng.integers(8, 200, (4, 12)),
    "rejected": rng.integers(8, 200, (4, 12)),
    "chosen_segment_ids": np.ones((4, 12), np.int32),
    "rejected_segment_ids": np.ones((4, 12), np.int32),
    "chosen_answer_start": np.full(4, 6, np.int32),
    "rejected_answer_start": np.full(4, 6, np.int32),
    "pair_mask": np.array([1, 1, 1, 0], np.float32),
  }
  batch["rejected_segment_ids"][:, 9:] = 0  # Right padding: scores are read at the last real token.
  loss, sums = reward_model.bradley_terry_loss(model, batch, None)
  assert float(loss) == pytest.approx(3 * np.log(2), rel=1e-6)  # Zero head: σ(0) for the three real pairs.
  grads = nnx.jit(nnx.grad(lambda m: reward_model.bradley_terry_loss(m, batch, None)[0]))(model)
  model.head.w_D[...] -= 0.1 * grads.head.w_D[...]
  after, sums_after = reward_model.bradley_terry_loss(model, batch, None)
  assert float(after) < float(loss) and float(sums_after["margin"]) > 0
  # Read independently of the loss: the chosen answers now score higher, and the loss is −log σ(chosen − rejected).
  chosen, rejected = (
    np.asarray(
      reward_model.sequence_scores(
        model, batch[side], batch[f"{side}_segment_ids"], batch[f"{side}_answer_start"], SPECIAL_IDS
      ),
      np.float64,
    )
    for side in ("chosen", "rejected")
  )
  assert np.all(chosen[:3] > rejected[:3])
  np.testing.assert_allclose(float(after), np.sum(np.log1p(np.exp(-(chosen - rejected)[:3]))), rtol=1e-5)
  np.testing.assert_allclose(float(sums_after["margin"]), np.sum((chosen - rejected)[:3]), rtol=1e-5)


def test_min_answer_log_prob_matches_numpy():
  """The likelihood term reads the answer (from its answer_start) only, for left and right padding."""
  from flax import nnx

  from llm_jax.model import PRESETS

  model = reward_model.RewardModel(PRESETS["tiny"], True, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  assistant = 6  # <|assistant|>: where a rendered answer starts (the start itself is data: answer_start below).
  tokens = rng.integers(8, 200, (3, 12)).astype(np.int32)
  segments = np.ones((3, 12), np.int32)
  tokens[0, [2, 6]] = assistant  # Two turns: only the tokens after position 6 are the answer.
  tokens[1, 3] = assistant
  segments[1, 9:] = 0  # Right padding.
  tokens[2, :4], segments[2, :4], tokens[2, 7] = 0, 0, assistant  # Left padding.
  positions = np.maximum(np.cumsum(segments != 0, axis=1) - 1, 0)
  h = model.transformer.backbone(tokens, positions, segments)
  answer_start = jnp.asarray([7, 4, 8], jnp.int32)
  got = reward_model.min_answer_log_prob(
    model, h, jnp.asarray(tokens), jnp.asarray(segments), answer_start, SPECIAL_IDS
  )
  logits = np.asarray(model.transformer.logits(h), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  answers = {0: range(7, 12), 1: range(4, 9), 2: range(8, 12)}
  expected = [min(log_probs[b, t - 1, tokens[b, t]] for t in answers[b]) for b in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The weight starts at zero (every pair at log 2); its gradient favours the likelier answer.
  chosen, rejected = tokens[:2].copy(), tokens[:2].copy()
  rejected[:, -1] = [int(np.argmin(log_probs[b, -2])) for b in range(2)]  # The least likely last token.
  batch = {
    "chosen": chosen,
    "rejected": rejected,
    "chosen_segment_ids": np.ones((2, 12), np.int32),
    "rejected_segment_ids": np.ones((2, 12), np.int32),
    "chosen_answer_start": np.full(2, 7, np.int32),
    "rejected_answer_start": np.full(2, 7, np.int32),
    "pair_mask": np.ones(2, np.float32),
  }
  loss, _ = reward_model.bradley_terry_loss(model, batch, None, special_ids=SPECIAL_IDS)
  assert float(loss) == pytest.approx(2 * np.log(2), rel=1e-6)
  grads = nnx.jit(nnx.grad(lambda m: reward_model.bradley_terry_loss(m, batch, None, special_ids=SPECIAL_IDS)[0]))(
    model
  )
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
def test_toy_task_reward_rises_from_chance_and_stays_high(algorithm, base_workdir, tmp_path):
  """Reward 1 when the answer starts with a lowercase letter (26 of 320 ids: ~8% at the start)."""
  config = rlhf_config.get_config()
  config.init_from, config.algorithm, config.value_init = base_workdir, algorithm, "policy_head"
  config.iterations, config.max_new_tokens, config.ppo_epochs, config.learning_rate = 35, 4, 4, 1e-2
  config.prompts_per_iteration, config.group_size = (32, 1) if algorithm == "ppo" else (16, 4)
  # One full-rollout minibatch per epoch: with two, PPO at this learning rate sometimes fell back to ~0.75 late
  # in the run (measured over seeds 0-5, on 1 and 8 simulated devices; full batch held ≥ 0.88 on all 12).
  config.minibatch_size, config.kl_coef = 32, 0.01
  config.missing_eos_penalty = 0.0  # 4-token answers are nearly always cut off; the toy reward ignores that.
  history = rlhf.run(
    config,
    str(tmp_path / algorithm),
    devices=jax.devices()[:1],
    prompts=PROMPTS,
    reward_fn=lambda response: float(len(response) > 0 and response[0] in LETTERS),
  )
  scores = [h["score"] for h in history]
  # Thresholds from 36 runs (seeds 0-5 × 3 algorithms × both XLA:CPU code generators): the first two iterations
  # scored ≤ 0.16, the best 3-iteration mean ≥ 0.90, the second half's mean ≥ 0.81. The last 5 iterations alone
  # are too noisy to judge (a late dip took them to 0.40 in one run), so "stays high" is the second half.
  assert np.mean(scores[:2]) < 0.3, scores
  moving_average = np.convolve(scores, np.ones(3) / 3, mode="valid")
  assert moving_average.max() > 0.85, scores  # Mean reward over 3 consecutive iterations.
  assert np.mean(scores[len(scores) // 2 :]) > 0.75, scores
  # At the first minibatch the new policy is the rollout policy: ratio 1, clipped ≡ unclipped.
  assert history[0]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
  # Iteration 1 samples from the SFT policy itself: the KL to it is zero.
  assert abs(history[0]["kl_k1"]) < 1e-5 and abs(history[0]["kl_k3"]) < 1e-5
  assert all(np.isfinite(h["kl_k1"]) for h in history) and history[-1]["kl_k1"] > 0
  logged = read_metrics(str(tmp_path / algorithm))
  assert len(logged) == 35 and {
    "score",
    "kl_k1",
    "kl_k3",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "response_length",
  } <= set(logged[-1])
  if algorithm == "ppo":
    assert {"value_loss", "explained_variance"} <= set(logged[-1])


def test_sequence_scores_read_the_last_real_token_of_padded_rows():
  """A padded row scores as the row alone (the head at its last token), whether padded on the right or left."""
  from flax import nnx

  from llm_jax.model import PRESETS

  model = reward_model.RewardModel(PRESETS["tiny"], rngs=nnx.Rngs(0))
  model.head.w_D[...] = jax.random.normal(jax.random.key(1), model.head.w_D.shape)
  rng = np.random.default_rng(4)
  t, lengths = 12, (5, 9, 12)
  real = [rng.integers(8, 200, n).astype(np.int32) for n in lengths]
  tokens, segments = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
  tokens[0, :5], segments[0, :5] = real[0], 1  # Right padding.
  tokens[1, 3:], segments[1, 3:] = real[1], 1  # Left padding.
  tokens[2], segments[2] = real[2], 1
  np.testing.assert_array_equal(reward_model.last_token_index(jnp.asarray(segments)), [4, 11, 11])
  starts = jnp.zeros(3, jnp.int32)
  scores = nnx.jit(lambda m, t, s: reward_model.sequence_scores(m, t, s, starts, SPECIAL_IDS))(
    model, jnp.asarray(tokens), jnp.asarray(segments)
  )
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
    lines.append(
      json.dumps(
        {
          "prompt": f"tell me about the {w[0]}",
          "chosen": f"The {w[0]} is near the {w[1]}.",
          "rejected": f"{w[1].upper()} {w[0].upper()}!!",
        }
      )
    )
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
  config = reward_config.get_config()
  config.init_from, config.data.path = base_workdir, str(tmp_path / "pairs.jsonl")
  config.likelihood_feature = likelihood_feature
  config.steps, config.batch_size, config.seq_len, config.learning_rate = 60, 16, 64, 1e-3
  config.eval_every, config.log_every, config.warmup_steps = 60, 20, 5
  result = reward_model.run(config, str(tmp_path / "rm"), devices=jax.devices()[:1])
  first = next(r for r in read_metrics(str(tmp_path / "rm")) if r["step"] == 0)
  assert first["eval_loss"] == pytest.approx(np.log(2), rel=1e-4)  # The zero head starts at chance.
  assert result.last_eval["eval_accuracy"] >= 0.95 and result.last_eval["eval_margin"] > 1.0


# ---------------------------------------------------------------------------------------------------------
# The pieces of the RL math, each against NumPy.


def test_kl_estimators_match_numpy():
  log_ratio = np.random.default_rng(4).normal(size=(3, 7))
  expected = {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": np.exp(-log_ratio) - 1 + log_ratio}
  for name, value in expected.items():
    np.testing.assert_allclose(
      rlhf.KL_ESTIMATORS[name](jnp.asarray(log_ratio, jnp.float32)), value, rtol=1e-5, atol=1e-6, err_msg=name
    )
  assert (np.asarray(rlhf.KL_ESTIMATORS["k3"](jnp.asarray(log_ratio))) >= 0).all()


def test_token_rewards_put_the_score_on_the_last_real_token_and_subtract_the_kl():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  kl = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
  scores = np.array([2.0, -1.0, 0.5], np.float32)
  got = rlhf.token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), 0.3)
  expected = -0.3 * kl * mask
  for b, last in enumerate([2, 0, 3]):
    expected[b, last] += scores[b]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_gae_ignores_whatever_lies_in_the_padding():
  rng = np.random.default_rng(6)
  mask = (np.arange(8)[None] < np.array([8, 3, 5, 1])[:, None]).astype(np.float64)
  rewards, values = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))  # Garbage beyond each row's length.
  adv, ret = rlhf.gae(
    jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask, jnp.float32), 1.0, 0.9
  )
  expected_adv, _ = numpy_gae(rewards * mask, values * mask, mask, 1.0, 0.9)
  np.testing.assert_allclose(np.asarray(adv) * mask, expected_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)


def test_masked_whiten_uses_the_masked_entries_only():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 6)) * 3 + 1
  mask = (np.arange(6)[None] < np.array([6, 2, 4])[:, None]).astype(np.float64)
  real = x[mask == 1]
  expected = np.where(mask == 1, (x - real.mean()) / np.sqrt(real.var() + 1e-8), 0.0)
  np.testing.assert_allclose(
    rlhf.masked_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32)), expected, rtol=1e-4, atol=1e-5
  )


def test_value_loss_clips_on_both_sides():
  old = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
  new = np.array([0.5, -0.5, 0.1, 0.5, 1.0])
  ret = np.array([1.0, -1.0, 2.0, -1.0, 3.0])
  clip = 0.2
  clipped = old + np.clip(new - old, -clip, clip)
  expected = 0.5 * np.maximum((new - ret) ** 2, (clipped - ret) ** 2)
  mask = np.ones(5)
  got = rlhf.value_loss(*(jnp.asarray(a, jnp.float32) for a in (new, old, ret, mask)), clip)
  assert float(got) == pytest.approx(expected.sum(), rel=1e-6)
  # Rows 0 and 1 moved 0.5 toward their return: clipping keeps the loss of the 0.2 step (larger).
  assert expected[0] == pytest.approx(0.5 * 0.8**2) and expected[1] == pytest.approx(0.5 * 0.8**2)


def test_policy_loss_clips_exactly_at_one_plus_and_minus_epsilon():
  clip = 0.2
  old = np.zeros(8, np.float32)
  ratios = np.array([1.1, 1.3, 1.1, 1.3, 0.9, 0.7, 0.9, 0.7], np.float32)
  adv = np.array([1, 1, -1, -1, 1, 1, -1, -1], np.float32)
  new = np.log(ratios)
  loss_each = np.maximum(-adv * ratios, -adv * np.clip(ratios, 1 - clip, 1 + clip))
  grad_each = np.where(-adv * ratios >= -adv * np.clip(ratios, 1 - clip, 1 + clip), -adv * ratios, 0.0)
  loss, metrics = rlhf.policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.ones(8), clip)
  assert float(loss) == pytest.approx(loss_each.sum(), rel=1e-5)
  grad = jax.grad(lambda lp: rlhf.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.ones(8), clip)[0])(
    jnp.asarray(new)
  )
  np.testing.assert_allclose(grad, grad_each, rtol=1e-5, atol=1e-6)
  # Clipped (zero gradient): ratio 1.3 with A > 0 and 0.7 with A < 0; the others still move.
  np.testing.assert_array_equal(np.asarray(grad) == 0, [0, 1, 0, 0, 0, 0, 0, 1])
  assert float(metrics["clip_fraction"]) == 4


def test_group_advantages_use_ddof_1_and_give_zero_to_groups_without_spread():
  returns = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.1, 0.7, 0.2, 0.4], np.float32)
  groups = returns.reshape(3, 4).astype(np.float64)
  grpo = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
  grpo[1] = 0.0
  rloo = groups - (groups.sum(1, keepdims=True) - groups) / 3
  rloo[1] = 0.0
  got_grpo = np.asarray(rlhf.group_advantages(jnp.asarray(returns), 4, "grpo")).reshape(3, 4)
  np.testing.assert_allclose(got_grpo, grpo, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_grpo[1], 0.0)  # Exactly zero: rounding noise is not a signal.
  # Three samples of 1.1: their float32 mean is not exactly 1.1, and that rounding error over a std of ~0
  # would be an advantage of -0.1 for every sample.
  tied = jnp.asarray([1.1, 1.1, 1.1, 0.0, 1.0, 0.5], jnp.float32)
  for algorithm in ("grpo", "rloo"):
    np.testing.assert_array_equal(np.asarray(rlhf.group_advantages(tied, 3, algorithm))[:3], 0.0)
  np.testing.assert_allclose(
    rlhf.group_advantages(jnp.asarray(returns), 4, "rloo").reshape(3, 4), rloo, rtol=1e-5, atol=1e-6
  )


def test_adaptive_kl_coefficient_follows_ziegler():
  for kl, target in ((0.5, 1.0), (3.0, 1.0), (1.1, 1.0), (0.0, 2.0)):
    error = np.clip(kl / target - 1, -0.2, 0.2)
    assert rlhf.adaptive_kl_coef(0.1, kl, target, 64, 10_000) == pytest.approx(0.1 * (1 + error * 64 / 10_000))


class _FakeState:
  """Stands in for a ModelSpec: `merge(params)` returns a model that outputs fixed logits (and values)."""

  def __init__(self, with_values: bool):
    self.with_values = with_values

  def merge(self, params):
    if self.with_values:
      return lambda tokens, positions, segments: (params["logits"], params["values"])
    return lambda tokens, positions, segments: params["logits"]


def _rl_config(algorithm, kl_in, estimator="k3", group_size=4, **overrides):
  fields = dict(
    algorithm=algorithm,
    prompt_len=2,
    group_size=group_size,
    gamma=1.0,
    lam=0.95,
    clip=0.2,
    value_clip=0.2,
    value_coef=0.5,
    whiten_rewards=False,
    reward_clip=0.0,
    temperature=1.0,
    banned_ids=(),
    kl_in=kl_in,
    kl_estimator=estimator,
    missing_eos_penalty=0.0,
  )
  return rlhf.RLConfig(**{**fields, **overrides})


def _rollout(scores, ended, seed=0, rows=8, new=3, vocab=6):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, 2 + new)).astype(np.int32)
  mask = np.ones((rows, new), np.float32)
  mask[1, 2:] = 0
  batch = {
    "tokens": tokens,
    "segment_ids": np.concatenate([np.ones((rows, 2)), mask], 1).astype(np.int32),
    "response_mask": mask,
    "rule_scores": np.asarray(scores, np.float32),
    "ended": np.asarray(ended, np.float32),
  }
  policy = {
    "logits": rng.normal(size=(rows, 2 + new, vocab)).astype(np.float32),
    "values": rng.normal(size=(rows, 2 + new)).astype(np.float32),
  }
  ref = {"logits": rng.normal(size=(rows, 2 + new, vocab)).astype(np.float32)}
  return batch, policy, ref


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_grpo_advantages_come_from_the_scores_alone(beta):
  """Tied groups get zero advantage whatever β and however far the policy is from the reference."""
  scores = [1, 1, 1, 1, 0, 1, 0, 0]  # Group 0 is all ties.
  batch, policy, ref = _rollout(scores, ended=np.ones(8))
  score = rlhf.make_scorer(
    _rl_config("grpo", "loss"), _FakeState(True), _FakeState(False), lambda p, b: b["rule_scores"]
  )
  out, stats = score(policy, ref, None, batch, jnp.float32(beta))
  adv = np.asarray(out["advantages"])
  np.testing.assert_array_equal(adv[:4], 0.0)
  group = np.array([0, 1, 0, 0], np.float64)
  expected = (group - group.mean()) / (group.std(ddof=1) + 1e-6)
  np.testing.assert_allclose(adv[4:], expected[:, None] * batch["response_mask"][4:], rtol=1e-5)
  assert stats["kl_k1"] != 0  # The policy differs from the reference, yet the advantages ignore it.


def test_kl_in_the_reward_moves_returns_and_missing_eos_is_penalized():
  batch, policy, ref = _rollout([1, 1, 1, 1, 0, 1, 0, 0], ended=[1, 1, 0, 1, 1, 1, 1, 0])
  config = _rl_config("rloo", "reward", estimator="k1", missing_eos_penalty=2.0)
  out, stats = rlhf.make_scorer(config, _FakeState(True), _FakeState(False), lambda p, b: b["rule_scores"])(
    policy, ref, None, batch, jnp.float32(0.5)
  )
  lp = jax.nn.log_softmax(policy["logits"][:, 1:-1])
  ref_lp = jax.nn.log_softmax(ref["logits"][:, 1:-1])
  take = lambda x: np.take_along_axis(np.asarray(x), batch["tokens"][:, 2:, None], -1)[..., 0]
  kl = (take(lp) - take(ref_lp)) * batch["response_mask"]
  returns = np.asarray(batch["rule_scores"]) - 2.0 * (1 - batch["ended"]) - 0.5 * kl.sum(1)
  groups = returns.reshape(2, 4)
  expected = (groups - (groups.sum(1, keepdims=True) - groups) / 3).reshape(-1)
  np.testing.assert_allclose(
    np.asarray(out["advantages"]), expected[:, None] * batch["response_mask"], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(out["old_log_probs"], take(lp), rtol=1e-5, atol=1e-6)
  assert float(stats["truncated_fraction"]) == pytest.approx(0.25)
  assert float(stats["reward"]) == pytest.approx(np.mean(batch["rule_scores"] - 2.0 * (1 - batch["ended"])))
  assert float(stats["kl_k1"]) == pytest.approx(kl.sum() / 8, rel=1e-4)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_adds_beta_times_the_estimator(estimator):
  batch, policy, ref = _rollout([1, 0, 0, 1, 0, 1, 1, 0], ended=np.ones(8), seed=3)
  config = _rl_config("grpo", "loss", estimator=estimator)
  lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(policy["logits"][:, 1:-1])), batch["tokens"][:, 2:, None], -1)[
    ..., 0
  ]
  ref_lp = lp + np.random.default_rng(9).normal(size=lp.shape).astype(np.float32) * 0.3
  mask = batch["response_mask"]
  full = {
    **batch,
    "old_log_probs": lp,
    "ref_log_probs": ref_lp,
    "advantages": np.zeros_like(lp),
    "kl_coef": np.full(8, 0.7, np.float32),
  }
  model = _FakeState(False).merge(policy)
  loss, metrics = rlhf.make_loss(config)(lambda *a: (model(*a), None), full, None)
  log_ratio = lp - ref_lp
  k = {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": np.exp(-log_ratio) - 1 + log_ratio}[estimator]
  assert float(loss) == pytest.approx(0.7 * (k * mask).sum(), rel=1e-4)  # Zero advantages: the KL term alone.
  assert float(metrics["kl_loss"]) == pytest.approx((k * mask).sum(), rel=1e-4)


def test_response_log_probs_align_with_the_sampler_at_any_temperature(base_workdir):
  """RL's log π of each sampled token (one full forward) equals what the sampler recorded while sampling it, with
  chat-mode banned tokens and temperature 0.7: ratios and KL are computed under the distribution sampled from."""
  from llm_jax import chat as chat_lib
  from llm_jax import sharding
  from llm_jax.inference.loading import load_sampler

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  sampler, _, _ = load_sampler(base_workdir, mesh)
  model = nnx_merge(sampler)
  sampling = chat_lib.chat_sampling(rlhf.SamplingConfig(max_new_tokens=6, temperature=0.7), TOK)
  out = sampler.generate(PROMPTS, sampling, jax.random.key(2))
  prompt_len = max(len(p) for p in PROMPTS)
  batch = prompt_response_rows(PROMPTS, out.tokens, prompt_len, 6)
  logits = model(
    jnp.asarray(batch["tokens"]),
    positions_from_segments(jnp.asarray(batch["segment_ids"])),
    jnp.asarray(batch["segment_ids"]),
  )
  config = _rl_config("ppo", "reward", prompt_len=prompt_len, temperature=0.7, banned_ids=sampling.banned_ids)
  log_probs, _ = config.log_probs(logits, jnp.asarray(batch["tokens"]))
  for b, recorded in enumerate(out.log_probs):
    np.testing.assert_allclose(np.asarray(log_probs)[b, : len(recorded)], recorded, rtol=1e-4, atol=1e-5)
    assert not set(out.tokens[b]) & set(sampling.banned_ids)


def nnx_merge(sampler):
  from flax import nnx

  return nnx.merge(sampler.graphdef, sampler.params)


@pytest.mark.parametrize(
  "override, message",
  [
    ({"algorithm": "grpo", "group_size": 1}, "group_size=1 must be >= 2 for grpo"),
    ({"algorithm": "rloo", "group_size": 1}, "group_size=1 must be >= 2 for rloo"),
    ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
    ({"kl_in": "advantage"}, "kl_in='advantage' must be one of"),
    ({"kl_estimator": "k4"}, "kl_estimator='k4' must be one of"),
    ({"grad_accum": 3}, "must be divisible by grad_accum"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty=-1.0 must be >= 0"),
  ],
)
def test_rl_config_errors(override, message):
  from llm_jax.errors import UserError

  config = rlhf_config.get_config()
  config.minibatch_size = 8
  for key, value in override.items():
    config[key] = value
  with pytest.raises(UserError, match=message):
    rlhf.validate(config, 1)


def test_kl_settings_follow_each_algorithm_unless_set():
  config = rlhf_config.get_config()
  assert rlhf.kl_settings(config) == ("reward", "k1")
  config.algorithm = "grpo"
  assert rlhf.kl_settings(config) == ("loss", "k3")
  config.kl_in, config.kl_estimator = "reward", "k2"
  assert rlhf.kl_settings(config) == ("reward", "k2")


def test_prompts_ending_with_an_assistant_turn_are_refused(tmp_path):
  from llm_jax.errors import UserError

  path = tmp_path / "prompts.jsonl"
  path.write_text(
    json.dumps({"prompt": "hi"})
    + "\n"
    + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    + "\n"
  )
  with pytest.raises(UserError, match=r"prompts.jsonl:2: 'messages' must end with a user turn"):
    rlhf.read_prompts(str(path))


def test_reward_model_with_another_tokenizer_is_refused(base_workdir, tmp_path):
  from llm_jax.errors import UserError
  from llm_jax.tokenizer import train_sentencepiece
  from llm_jax.train import stage

  other = tmp_path / "rm"
  other.mkdir()
  train_sentencepiece(["the cat sat on the mat. " * 20, "a dog ran. " * 30] * 20, 300).save(str(other))
  with pytest.raises(UserError, match="use different tokenizers"):
    stage.check_same_tokenizer(str(other), "reward_model", base_workdir, "init_from")
  stage.check_same_tokenizer(base_workdir, "reward_model", base_workdir, "init_from")  # The same one passes.


def test_grad_accum_in_rl_gives_the_same_update(base_workdir, tmp_path):
  """Two microbatches per minibatch update ≡ one (RL used to ignore grad_accum)."""
  rows = {}
  for accum in (1, 2):
    config = rlhf_config.get_config()
    config.init_from, config.algorithm, config.value_init = base_workdir, "ppo", "policy_head"
    config.iterations, config.max_new_tokens, config.ppo_epochs = 1, 4, 1
    config.prompts_per_iteration, config.minibatch_size, config.grad_accum = 8, 8, accum
    config.missing_eos_penalty = 0.5
    rows[accum] = rlhf.run(
      config,
      str(tmp_path / f"accum{accum}"),
      devices=jax.devices()[:1],
      prompts=PROMPTS,
      reward_fn=lambda response: float(len(response) > 0 and response[0] in LETTERS),
    )[0]
  for key in ("loss", "grad_norm", "value_loss", "score"):
    assert rows[2][key] == pytest.approx(rows[1][key], rel=1e-5, abs=1e-6), key
  # The penalty lands on exactly the answers that max_new_tokens cut off.
  assert rows[1]["reward"] == pytest.approx(rows[1]["score"] - 0.5 * rows[1]["truncated_fraction"], abs=1e-6)
  assert 0 < rows[1]["truncated_fraction"] <= 1


def test_an_empty_or_role_token_only_answer_never_beats_a_real_one():
  """The minimum log-probability over no answer tokens used to be 0: the best possible score."""
  from flax import nnx

  from llm_jax.model import PRESETS

  ROLE_IDS, END_ID = {"user": 5, "assistant": 6}, 7  # The project's ids (llm_jax/tokenizer.py).

  model = reward_model.RewardModel(PRESETS["tiny"], True, rngs=nnx.Rngs(0))
  model.likelihood_weight[...] = jnp.float32(1.0 / reward_model.LIKELIHOOD_WEIGHT_SCALE)  # w = 1: trained-like.
  prompt = [2, ROLE_IDS["user"], *TOK.encode("where?"), END_ID, ROLE_IDS["assistant"]]
  answers = {
    "real": TOK.encode("here it is") + [END_ID],
    "empty": [],
    "end only": [END_ID],
    "roles only": [ROLE_IDS["user"], ROLE_IDS["assistant"], END_ID],
  }
  length = len(prompt) + max(len(a) for a in answers.values())
  tokens = np.zeros((len(answers), length), np.int32)
  segments = np.zeros_like(tokens)
  for i, answer in enumerate(answers.values()):
    row = prompt + answer
    tokens[i, : len(row)], segments[i, : len(row)] = row, 1
  scores = dict(
    zip(
      answers,
      np.asarray(
        reward_model.sequence_scores(
          model, jnp.asarray(tokens), jnp.asarray(segments), jnp.full(len(answers), len(prompt)), SPECIAL_IDS
        )
      ),
    )
  )
  for name in ("empty", "end only", "roles only"):
    assert scores[name] == pytest.approx(reward_model.EMPTY_ANSWER_LOG_PROB, abs=1e-6), name
    assert scores[name] < scores["real"], scores


def test_init_params_skip_gives_the_full_inits_values_for_what_it_keeps():
  """RL and the reward model skip the entries they load (init_params(skip=...)): what is kept is bit-identical to a
  full init of the same seed, and the skipped entries are never computed."""
  import dataclasses

  from llm_jax import modeling, sharding
  from llm_jax.model import PRESETS

  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=96, num_layers=1)  # One layer: init compiles in a second.
  factory = lambda rngs: rlhf.ActorCritic(cfg, "reward_model", rngs=rngs)  # A random value network: not zeros.
  spec = modeling.model_spec(factory, sharding.make_mesh(devices=jax.devices()[:2]))
  full = modeling.init_params(factory, spec, seed=3)
  kept = modeling.init_params(factory, spec, seed=3, skip=("policy",))
  assert set(kept) == set(full) - {"policy"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(kept), jax.device_get({"value": full["value"]}))
  other_seed = modeling.init_params(factory, spec, seed=4, skip=("policy",))
  differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), kept["value"], other_seed["value"])
  assert any(jax.tree.leaves(differs))  # The seed still reaches the kept entries.
