"""Mutation check: does the test suite notice single-line bugs in the core math?

Each `Mutant` below replaces one exact source snippet (it must occur exactly once in its file) with a wrong
version, the kind of bug a careful reviewer fears: an off-by-one in the learning-rate schedule, a mask that
lets a token see the future, a reward read at the wrong token. For each mutant the check copies the repository's
code (llm_jax/, tests/, configs/, experiments/) into a temporary directory, applies the replacement there (the
working tree is never modified), and runs only the tests named for it. A failing test kills the mutant; a
mutant whose tests all pass survived, and the test suite has a hole.

    python tests/mutation_check.py                    # every mutant (84): ~10 min on 2 CPU cores, warm cache
    python tests/mutation_check.py --baseline         # first runs the named tests unmodified (+3-7 min)
    python tests/mutation_check.py --only lr_logged_off_by_one,causal_mask_strict
    python tests/mutation_check.py --list

Prints a table (mutant, status, seconds, the test that killed it) and the kill rate; exits 1 if the kill rate is
below --min_kill_rate. A timeout counts as killed (the mutant hung the tests), a pytest error that is not a test
failure (no tests collected, a usage error) as an error, which is not a kill. The compilation cache is the
repository's .jax_cache, so repeated runs compile little.

Adding a mutant is one entry in MUTANTS; tests/test_mutants.py checks that every `original` snippet still occurs
exactly once, so the list follows the code as it changes. Not collected by pytest (its name does not start with
test_).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("llm_jax", "tests", "configs", "experiments", "setup.cfg", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
  """A single-line bug: `original` (exact text, once in `file`) becomes `replacement`.

  `tests`: pytest arguments, one invocation each, run in order until one fails: a node id
  ("tests/test_x.py::test_name") or a file with a -k expression ("tests/test_x.py -k 'causality or packed'").
  """

  name: str
  file: str  # Relative to the repository root.
  original: str
  replacement: str
  tests: tuple[str, ...]
  why: str = ""  # The bug, in words.


T_TRAIN, T_MODEL, T_INF, T_DATA, T_SFT, T_RLHF = (
  f"tests/test_{n}.py" for n in ("train", "model", "inference", "data", "sft", "rlhf")
)
LOOP, MODEL, SAMPLER = "llm_jax/train/loop.py", "llm_jax/model.py", "llm_jax/inference/sampler.py"
RL, SEQ = "llm_jax/train/rlhf.py", "llm_jax/sequences.py"
HF, T_HF = "llm_jax/hf.py", "tests/test_hf.py"

MUTANTS: tuple[Mutant, ...] = (
  # ---- the training loop and optimizer (llm_jax/train/loop.py, pretrain.py) ----
  Mutant(
    "grad_divided_by_grad_accum",
    LOOP,
    "grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)",
    "grads = jax.tree.map(lambda g: g / grad_accum, grads)",
    (f"{T_TRAIN} -k total_weight",),
    "the gradient is averaged over microbatches instead of divided by the batch's total weight",
  ),
  Mutant(
    "lr_schedule_shifted",
    LOOP,
    "lambda count: schedule(count + 1),",
    "lambda count: schedule(count),",
    (f"{T_TRAIN} -k adam_update",),
    "update k uses the rate of step k - 1 (the first update at lr 0)",
  ),
  Mutant(
    "lr_warmup_one_step_late",
    LOOP,
    "warmup = max(config.warmup_steps, 1)",
    "warmup = config.warmup_steps + 1",
    (f"{T_TRAIN} -k adam_update",),
    "the peak is reached one step after warmup_steps",
  ),
  Mutant(
    "lr_logged_off_by_one",
    LOOP,
    "self.trainer.schedule(self.trainer.last_update + 1)",
    "self.trainer.schedule(self.trainer.last_update)",
    (f"{T_TRAIN}::test_logged_learning_rate_is_the_rate_each_update_used",),
    "metrics.jsonl logs the previous step's rate",
  ),
  Mutant(
    "weight_decay_on_norms_and_biases",
    LOOP,
    'return not (name == "scale" or name.startswith("bias"))',
    "return True",
    (f"{T_TRAIN} -k weight_decay",),
    "weight decay also shrinks norm scales and biases",
  ),
  Mutant(
    "resume_without_data_iterator",
    LOOP,
    "data_iter=None if self._global_data_state else self.data_iter,",
    "data_iter=None,",
    (f"{T_TRAIN}::test_resume_continues_exactly",),
    "a resumed run restarts the data from the first batch",
  ),
  Mutant(
    "prepared_position_counts_local_rows",
    "llm_jax/data/prepared.py",
    "self.position += self.global_batch",
    "self.position += self.global_batch // self.process_count",
    ("tests/test_prepared_data.py::test_global_position_resumes_with_another_process_count",),
    "the saved data position counts one process's rows: a run resumed on other processes repeats rows",
  ),
  Mutant(
    "prepared_row_misses_the_next_token",
    "llm_jax/data/prepared.py",
    "tokens, docs = stream.read(r0 * L, r1 * L + 1)",
    "tokens, docs = stream.read(r0 * L, r1 * L)",
    ("tests/test_prepared_data.py::test_prepared_rows_equal_the_in_memory_packing",),
    "the last row of each block loses the target that crosses into the next row",
  ),
  Mutant(
    "loss_ignores_mask",
    SEQ,
    'return jnp.sum(loss_BL * mask_BL), {"weight"',
    'return jnp.sum(loss_BL), {"weight"',
    (f"{T_SFT}::test_a_batch_with_nothing_to_train_on_adds_zero_loss", f"{T_TRAIN} -k total_weight"),
    "masked tokens (prompts, padding, document boundaries) are trained on",
  ),
  Mutant(
    "accuracy_argmax_takes_the_last_tie",
    SEQ,
    "return jnp.min(jnp.where(is_max, iota, x.shape[-1]), axis=-1)",
    "return jnp.max(jnp.where(is_max, iota, -1), axis=-1)",
    (f"{T_TRAIN} -k first_argmax",),
    "the accuracy's argmax picks the last of tied maxima (np.argmax picks the first)",
  ),
  Mutant(
    "init_skip_keeps_the_skipped_entries",
    "llm_jax/modeling.py",
    "tree = {k: v for k, v in tree.items() if k not in skip}",
    "tree = {k: v for k, v in tree.items() if k in skip or not skip}",
    (f"{T_RLHF} -k init_params_skip",),
    "init_params(skip=...) still computes and returns the entries the caller loads from elsewhere",
  ),
  Mutant(
    "init_seed_ignored_by_kept_entries",
    "llm_jax/modeling.py",
    "model_factory(_rngs(jax.random.key(seed)))",
    "model_factory(_rngs(jax.random.key(0)))",
    (f"{T_RLHF} -k init_params_skip",),
    "the seed never reaches the initialised parameters",
  ),
  Mutant(
    "sampler_jits_per_instance",
    SAMPLER,
    "return _jitted_pieces(self.graphdef, self.mesh, self.cache_dtype, self.model_cfg)",
    "return _jitted_pieces.__wrapped__(self.graphdef, self.mesh, self.cache_dtype, self.model_cfg)",
    (f"{T_INF} -k share_their_compiled",),
    "every Sampler jits its own prefill/decode again (RL and evaluation re-trace at every call)",
  ),
  Mutant(
    "train_step_seed_ignored",
    LOOP,
    "self.many_jitted, self.seed = many, np.int32(seed)",
    "self.many_jitted, self.seed = many, np.int32(0)",
    (f"{T_TRAIN} -k seed_sweep",),
    "every run's train step draws seed 0's randomness, whatever the config's seed",
  ),
  Mutant(
    "model_spec_rebuilt_every_call",
    "llm_jax/modeling.py",
    "return _language_model_spec(model_factory, mesh)",
    "return _model_spec(model_factory, mesh)",
    (f"{T_MODEL} -k once_per_model",),
    "every stage, loader and sampler builds the model's spec again",
  ),
  Mutant(
    "rng_stream_count_not_advanced",
    "llm_jax/modeling.py",
    "self.count.set_value(self.count.get_value() + 1)",
    "self.count.set_value(self.count.get_value())",
    (f"{T_MODEL} -k flax_rngs",),
    "init_params's key stream repeats one key: every parameter of a shape gets the same values",
  ),
  Mutant(
    "init_retraced_every_call",
    "llm_jax/modeling.py",
    "return _cached_init_fn(model_factory, spec, trainable_only, skip)(seed)",
    "return _init_fn(model_factory, spec, trainable_only, skip)(seed)",
    (f"{T_MODEL} -k flax_rngs",),
    "every init of a model traces and lowers its program again",
  ),
  Mutant(
    "cpu_checkpoints_slice_replicated_arrays",
    "llm_jax/checkpoint.py",
    'if jax.default_backend() != "cpu":',
    "if True:",
    (f"{T_TRAIN} -k cpu_checkpoints",),
    "CPU checkpoints keep Orbax's replica-parallel save: a program per replica slice shape at the first save",
  ),
  Mutant(
    "kl_to_reference_retraced_every_call",
    "llm_jax/evaluation.py",
    "ref = _response_log_probs(",
    "ref = jax.clear_caches() or _response_log_probs(",
    ("tests/test_evaluation.py -k traces_nothing",),
    "every KL measurement traces and compiles the reference's log-probs again",
  ),
  Mutant(
    "kl_reference_without_the_answer_bans",
    "llm_jax/evaluation.py",
    "banned = sampling.banned_ids",
    "banned = ()",
    ("tests/test_evaluation.py -k traces_nothing",),
    "the KL's reference log-probs leave in role tokens the answers could never be sampled with",
  ),
  Mutant(
    "study_recomputes_dpo_reference_per_seed",
    "llm_jax/tasks/world_facts/alignment_study.py",
    "if os.path.exists(source) and not os.path.exists(target):",
    "if False:",
    ("tests/test_end_to_end.py -k study_runs",),
    "each seed's DPO run computes the same reference log-probs again",
  ),
  Mutant(
    "workdir_checked_by_each_process",
    "llm_jax/checkpoint.py",
    "found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))",
    "found = found",
    ("tests/test_multiprocess.py -k agree",),
    "processes decide apart whether a workdir has checkpoints: one late process waits in another collective forever",
  ),
  Mutant(
    "loss_weight_counts_every_token",
    SEQ,
    '{"weight": jnp.sum(mask_BL), "accuracy"',
    '{"weight": jnp.sum(jnp.ones_like(mask_BL)), "accuracy"',
    (f"{T_TRAIN} -k total_weight",),
    "the loss is averaged over all tokens, masked ones included",
  ),
  # ---- the model (llm_jax/model.py) ----
  Mutant(
    "causal_mask_strict",
    MODEL,
    "causal = q_positions_BL[:, :, None] >= kv_positions_BS[:, None, :]",
    "causal = q_positions_BL[:, :, None] > kv_positions_BS[:, None, :]",
    (f"{T_MODEL} -k causality",),
    "a token may not attend to itself (the first token then attends to everything)",
  ),
  Mutant(
    "document_mask_dropped",
    MODEL,
    "return (same_doc & causal)[:, None, :, :]",
    "return causal[:, None, :, :]",
    (f"{T_MODEL} -k packed_document",),
    "packed documents attend to each other",
  ),
  Mutant(
    "rope_rotation_reversed",
    MODEL,
    "jnp.concatenate([-sin_BLH2, sin_BLH2], -1)",
    "jnp.concatenate([sin_BLH2, -sin_BLH2], -1)",
    (f"{T_MODEL} -k 'rope or numpy_reference'",),
    "RoPE rotates the other way (still relative, but not the Llama/HF convention)",
  ),
  Mutant(
    "rope_frequency_base",
    MODEL,
    "inv_freq = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)",
    "inv_freq = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / (h // 2))",
    (f"{T_MODEL} -k 'rope or numpy_reference'",),
    "RoPE frequencies θ^(-2i/(H/2)) instead of θ^(-2i/H)",
  ),
  Mutant(
    "gqa_tiled_instead_of_repeated",
    MODEL,
    "k_BSKH, v_BSKH = jnp.repeat(k_BSKH, n // k, axis=2), jnp.repeat(v_BSKH, n // k, axis=2)",
    "k_BSKH, v_BSKH = jnp.tile(k_BSKH, (1, 1, n // k, 1)), jnp.tile(v_BSKH, (1, 1, n // k, 1))",
    (f"{T_MODEL} -k attention_matches_numpy",),
    "query head j uses K/V head j % K instead of j // (N/K)",
  ),
  Mutant(
    "gqa_decode_grouping",
    MODEL,
    "q_BLKGH = q_BLNH.reshape(b, l, k, n // k, h)",
    "q_BLKGH = q_BLNH.reshape(b, l, n // k, k, h).swapaxes(2, 3)",
    (f"{T_INF} -k cached_logits",),
    "decoding groups query heads with the wrong K/V head",
  ),
  Mutant(
    "softmax_scale",
    MODEL,
    "q_BLNH = q_BLNH * jnp.asarray(1 / math.sqrt(h), q_BLNH.dtype)",
    "q_BLNH = q_BLNH * jnp.asarray(1 / h, q_BLNH.dtype)",
    (f"{T_MODEL} -k attention_matches_numpy",),
    "scores scaled by 1/H instead of 1/√H",
  ),
  Mutant(
    "rmsnorm_centers",
    MODEL,
    "return nnx.RMSNorm(cfg.d_model, **kwargs)",
    "return nnx.LayerNorm(cfg.d_model, use_bias=False, **kwargs)",
    (f"{T_MODEL} -k numpy_reference",),
    "RMSNorm subtracts the mean (a LayerNorm)",
  ),
  Mutant(
    "attention_residual_dropped",
    MODEL,
    "x_BLD = x_BLD + attn_BLD",
    "x_BLD = attn_BLD",
    (f"{T_MODEL} -k numpy_reference",),
    "the attention sublayer replaces the residual stream instead of adding to it",
  ),
  Mutant(
    "kv_cache_write_slot",
    MODEL,
    "start = (layer, 0, 0, self.index, 0)",
    "start = (layer, 0, 0, 0, 0)",
    (f"{T_INF} -k cached_logits",),
    "every step writes its keys/values into slot 0",
  ),
  Mutant(
    "kv_cache_index_advance",
    MODEL,
    "index=cache.index + tokens_BL.shape[1])",
    "index=cache.index + 1)",
    (f"{T_INF} -k cached_logits",),
    "after a prefill the next write overwrites the prompt",
  ),
  # ---- the sampler (llm_jax/inference/sampler.py) ----
  Mutant(
    "log_probs_without_temperature",
    SAMPLER,
    "return token_B, _log_prob(log_probs_BV, token_B)",
    "return token_B, _log_prob(jax.nn.log_softmax(logits_BV * temperature), token_B)",
    (f"{T_INF} -k recorded_log_probs",),
    "the recorded log-probs are the untempered policy's, not those of the distribution sampled from",
  ),
  Mutant(
    "temperature_ignored",
    SEQ,
    "return logits_BV / temperature if temperature else logits_BV",
    "return logits_BV",
    (f"{T_INF} -k 'recorded_log_probs or sampled_frequencies'",),
    "sampling ignores the temperature",
  ),
  Mutant(
    "top_k_drops_kth",
    SAMPLER,
    "logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)",
    "logits_BV = jnp.where(logits_BV > kth_B1, logits_BV, -jnp.inf)",
    (f"{T_INF} -k 'sampled_frequencies or sampling_limits'",),
    "top-k keeps k - 1 tokens",
  ),
  Mutant(
    "top_p_mass_boundary",
    SAMPLER,
    "jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf)",
    "jnp.where(mass_before_BV <= top_p, sorted_BV, jnp.inf)",
    (f"{T_INF} -k 'top_p or sampled_frequencies'",),
    "top-p keeps one token more when the kept mass equals top_p exactly",
  ),
  Mutant(
    "top_p_drops_crossing_token",
    SAMPLER,
    "mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV",
    "mass_before_BV = jnp.cumsum(probs_BV, axis=-1)",
    (f"{T_INF} -k 'top_p or sampled_frequencies'",),
    "top-p drops the token that crosses top_p",
  ),
  Mutant(
    "decode_position_frozen",
    SAMPLER,
    "next_position_B=s.next_position_B + 1,",
    "next_position_B=s.next_position_B,",
    (f"{T_INF} -k greedy_equals",),
    "every generated token gets the same position",
  ),
  Mutant(
    "prefill_positions_ignore_padding",
    SAMPLER,
    "positions_BP = jnp.maximum(jnp.arange(prompt_len)[None, :] - (prompt_len - prompt_lengths_B[:, None]), 0)",
    "positions_BP = jnp.broadcast_to(jnp.arange(prompt_len)[None, :], tokens_BP.shape)",
    (f"{T_INF} -k mixed_batch",),
    "a left-padded prompt's positions count the padding",
  ),
  Mutant(
    "stop_tokens_ignored",
    SAMPLER,
    "done_B = s.done_B | jnp.isin(token_B, stop_ids)",
    "done_B = s.done_B",
    (f"{T_INF} -k stop_token",),
    "rows never stop at a stop token",
  ),
  # ---- data: packing, the chat template's mask (llm_jax/data/text.py, llm_jax/chat.py) ----
  Mutant(
    "pack_segment_ids_constant",
    "llm_jax/data/text.py",
    "segment_ids = np.where(input_docs > 0, input_docs - input_docs[:, :1] + 1, 0).astype(np.int32)",
    "segment_ids = np.where(input_docs > 0, 1, 0).astype(np.int32)",
    (f"{T_DATA} -k pack_matches_reference",),
    "every document piece of a row gets segment 1 (documents attend to each other)",
  ),
  Mutant(
    "pack_positions_never_restart",
    "llm_jax/data/text.py",
    "starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]",
    "starts[:, 1:] = False",
    (f"{T_DATA} -k pack_matches_reference",),
    "positions run on across documents instead of restarting",
  ),
  Mutant(
    "pack_loss_mask_crosses_documents",
    "llm_jax/data/text.py",
    "loss_mask = ((input_docs == target_docs) & (input_docs > 0)).astype(np.float32)",
    "loss_mask = (input_docs > 0).astype(np.float32)",
    (f"{T_DATA} -k pack_matches_reference",),
    "the last token of a document is trained to predict the next document's <bos>",
  ),
  Mutant(
    "pack_whole_mask_shifted",
    "llm_jax/data/text.py",
    'out["loss_mask"][r, start:end] = mask[1:]',
    'out["loss_mask"][r, start:end] = mask[:-1]',
    (f"{T_SFT} -k pack_whole",),
    "the SFT mask is aligned with the inputs instead of the targets",
  ),
  Mutant(
    "sft_trains_on_every_role",
    "llm_jax/chat.py",
    'trained = int(message.role == "assistant")',
    "trained = 1",
    (f"{T_SFT} -k 'mask_equals_hand_computed or forge'",),
    "SFT trains on user and system text too",
  ),
  # ---- DPO (llm_jax/train/dpo.py) ----
  Mutant(
    "dpo_log_ratio_sign",
    "llm_jax/train/dpo.py",
    "ratio = {side: logp_B[side] - ref_B[side] for side in SIDES}",
    "ratio = {side: ref_B[side] - logp_B[side] for side in SIDES}",
    ("tests/test_dpo.py -k sigmoid_loss",),
    "DPO's implicit reward is the reference's log-ratio over the policy's: it learns the rejected answers",
  ),
  Mutant(
    "ipo_not_length_normalized",
    "llm_jax/train/dpo.py",
    'loss_B = ipo_loss(mean(ratio["chosen"], "chosen") - mean(ratio["rejected"], "rejected"), s.beta)',
    'loss_B = ipo_loss(ratio["chosen"] - ratio["rejected"], s.beta)',
    ("tests/test_dpo.py -k ipo",),
    "IPO on summed instead of per-token mean log-ratios (not TRL's definition)",
  ),
  Mutant(
    "dpo_answer_includes_prompt",
    "llm_jax/train/dpo.py",
    "mask_BT = answer_mask(answer_start_B, segment_ids_BT)",
    "mask_BT = segment_ids_BT[:, 1:] != 0",
    ("tests/test_dpo.py::test_stored_reference_log_probs_equal_a_fresh_forward_pass",),
    "the answers' log-probs also sum the prompt's tokens",
  ),
  Mutant(
    "dpo_lora_adapters_dropped",
    "llm_jax/train/dpo.py",
    "factory = lm_factory(model_cfg, lora and lora.lora)",
    "factory = lm_factory(model_cfg)",
    ("tests/test_dpo.py::test_dpo_with_lora_trains_only_adapters_on_the_bit_identical_base",),
    "DPO with config.lora builds the policy without adapters: it trains (and saves) a freshly initialised model",
  ),
  # ---- the reward model (llm_jax/train/reward_model.py) ----
  Mutant(
    "reward_reads_first_token",
    "llm_jax/train/reward_model.py",
    "return jnp.max(jnp.where(segment_ids_BT != 0, jnp.arange(t)[None, :], 0), axis=1)",
    "return jnp.argmax(segment_ids_BT != 0, axis=1)",
    (f"{T_RLHF} -k sequence_scores", f"{T_RLHF}::test_reward_model_learns_synthetic_preferences[False]"),
    "the reward head reads each row's first real token instead of its last",
  ),
  Mutant(
    "bradley_terry_sign",
    "llm_jax/train/reward_model.py",
    "diff_B = chosen_B - rejected_B",
    "diff_B = rejected_B - chosen_B",
    (f"{T_RLHF} -k bradley_terry",),
    "the reward model learns to prefer the rejected answer",
  ),
  Mutant(
    "answer_mask_includes_role_token",
    "llm_jax/train/reward_model.py",
    "return (jnp.arange(1, t)[None, :] >= answer_start_B[:, None]) & (segment_ids_BT[:, 1:] != 0)",
    "return (jnp.arange(1, t)[None, :] >= answer_start_B[:, None] - 1) & (segment_ids_BT[:, 1:] != 0)",
    (f"{T_RLHF} -k min_answer_log_prob",),
    "the likelihood term counts the <|assistant|> token as part of the answer",
  ),
  Mutant(
    "empty_answer_scores_best",
    "llm_jax/train/reward_model.py",
    "return jnp.where(has_text_B, least_B, EMPTY_ANSWER_LOG_PROB)",
    "return least_B",
    (f"{T_RLHF} -k empty_or_role_token_only",),
    "an answer with no text token gets the best possible likelihood term (0)",
  ),
  Mutant(
    "prompt_may_end_with_assistant",
    "llm_jax/train/reward_model.py",
    'if chat[-1].role != "user":',
    "if False:",
    (f"{T_RLHF} -k ending_with_an_assistant_turn",),
    "a prompt ending with an assistant turn renders two assistant turns in a row",
  ),
  # ---- generation budget and chat-mode banned tokens (llm_jax/inference/sampler.py, chat.py) ----
  Mutant(
    "bucket_eats_budget",
    SAMPLER,
    "prompt_len = max(longest, min(bucket(longest), context - sampling.max_new_tokens))",
    "prompt_len = max(longest, min(bucket(longest), context - 1))",
    (f"{T_INF} -k every_requested_token",),
    "the power-of-two prompt bucket eats the token budget (a 70-token prompt gets 1 of 32 tokens)",
  ),
  Mutant(
    "banned_ids_not_applied",
    SEQ,
    "logits_BV = jnp.where(banned_V, BANNED_LOGIT, logits_BV)",
    "logits_BV = logits_BV",
    (f"{T_INF} -k banned_ids",),
    "role and control tokens can still be sampled",
  ),
  Mutant(
    "chat_sampling_bans_nothing",
    "llm_jax/chat.py",
    "return tuple(sorted(tokenizer.special_ids - set(answer_stop_ids(tokenizer))))",
    "return ()",
    (f"{T_INF} -k chat_sampling",),
    "chat answers may contain <|user|>, <|assistant|>, <bos>, <pad>",
  ),
  # ---- RLHF (llm_jax/train/rlhf.py) ----
  Mutant(
    "kl_penalty_sign",
    RL,
    "return (score_BN - beta * kl_BN) * mask_BN",
    "return (score_BN + beta * kl_BN) * mask_BN",
    (f"{T_RLHF} -k token_rewards",),
    "the per-token KL term rewards moving away from the reference",
  ),
  Mutant(
    "score_on_first_token",
    RL,
    "last_B = jnp.maximum(mask_BN.sum(1).astype(jnp.int32) - 1, 0)",
    "last_B = jnp.zeros(mask_BN.shape[0], jnp.int32)",
    (f"{T_RLHF} -k token_rewards",),
    "the sequence's score is paid at its first response token",
  ),
  Mutant(
    "ppo_clip_range_widened",
    RL,
    "jnp.clip(ratio, 1 - clip, 1 + clip)",
    "jnp.clip(ratio, 1 - clip, 1 + 2 * clip)",
    (f"{T_RLHF} -k clips_exactly",),
    "the PPO clip range is [1 - eps, 1 + 2 eps]",
  ),
  Mutant(
    "ppo_objective_min_not_max",
    RL,
    "loss = jnp.maximum(unclipped, clipped)",
    "loss = jnp.minimum(unclipped, clipped)",
    (f"{T_RLHF} -k clips_exactly",),
    "the surrogate takes the optimistic instead of the pessimistic bound",
  ),
  Mutant(
    "value_clipping_removed",
    RL,
    "loss = 0.5 * jnp.maximum((new_values - returns) ** 2, (clipped - returns) ** 2)",
    "loss = 0.5 * (new_values - returns) ** 2",
    (f"{T_RLHF} -k value_loss_clips",),
    "the value loss is not clipped",
  ),
  Mutant(
    "gae_ignores_mask",
    RL,
    "advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B",
    "advantage_B = delta_B + gamma * lam * next_advantage_B",
    (f"{T_RLHF} -k 'gae_ignores or gae_matches'",),
    "GAE bootstraps from the padding after a response",
  ),
  Mutant(
    "gae_lambda_dropped",
    RL,
    "advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B",
    "advantage_B = delta_B + gamma * next_mask_B * next_advantage_B",
    (f"{T_RLHF} -k gae_matches",),
    "GAE with lambda = 1 whatever the config says",
  ),
  Mutant(
    "whiten_over_padding",
    RL,
    "mean, var = masked_mean_var(x, mask)",
    "mean, var = jnp.mean(x), jnp.var(x)",
    (f"{T_RLHF} -k masked_whiten",),
    "whitening counts the padding",
  ),
  Mutant(
    "grpo_ddof_0",
    RL,
    "(r_GK.std(1, ddof=1, keepdims=True) + 1e-6)",
    "(r_GK.std(1, keepdims=True) + 1e-6)",
    (f"{T_RLHF} -k ddof_1",),
    "the group std uses ddof 0 (not TRL's ddof 1)",
  ),
  Mutant(
    "grpo_ties_get_noise",
    RL,
    "return jnp.where(spread_G1 > 0, adv_GK, 0.0).reshape(-1)",
    "return adv_GK.reshape(-1)",
    (f"{T_RLHF} -k ddof_1",),
    "a group of equal scores gets rounding noise divided by a tiny std as its advantage",
  ),
  Mutant(
    "grpo_kl_in_advantages",
    RL,
    'rewards = token_rewards(scores, kl_BN if rl.kl_in == "reward" else jnp.zeros_like(kl_BN), mask, beta)',
    "rewards = token_rewards(scores, kl_BN, mask, beta)",
    (f"{T_RLHF} -k from_the_scores_alone",),
    "the KL is folded into GRPO's returns before the group normalization (advantages of KL noise)",
  ),
  Mutant(
    "kl_k3_wrong",
    RL,
    '"k3": lambda log_ratio: jnp.expm1(-log_ratio) + log_ratio,',
    '"k3": lambda log_ratio: jnp.expm1(log_ratio) - log_ratio,',
    (f"{T_RLHF} -k kl_estimators",),
    "k3 computed with the ratio inverted",
  ),
  Mutant(
    "kl_loss_term_dropped",
    RL,
    'loss = loss + jnp.sum(batch["kl_coef"][:, None] * kl_BN)',
    "loss = loss",
    (f"{T_RLHF} -k kl_in_the_loss",),
    "kl_in=loss adds no KL term",
  ),
  Mutant(
    "missing_eos_not_penalized",
    RL,
    'scores = raw_scores - rl.missing_eos_penalty * (1 - batch["ended"])',
    "scores = raw_scores",
    (f"{T_RLHF} -k missing_eos",),
    "answers cut off by max_new_tokens are scored as if complete",
  ),
  Mutant(
    "rl_log_probs_without_temperature",
    RL,
    "return response_log_probs(logits_BTV, tokens_BT, self.prompt_len, self.temperature, self.banned_ids)",
    "return response_log_probs(logits_BTV, tokens_BT, self.prompt_len, 1.0, self.banned_ids)",
    (f"{T_RLHF} -k align_with_the_sampler",),
    "RL ratios and KL at temperature 1 while rollouts sample at another temperature",
  ),
  Mutant(
    "rl_log_probs_off_by_one",
    SEQ,
    "logits_BNV = restrict_logits(logits_BTV[:, prompt_len - 1 : -1], temperature, banned_ids)",
    "logits_BNV = restrict_logits(logits_BTV[:, prompt_len:], temperature, banned_ids)",
    (f"{T_RLHF} -k align_with_the_sampler",),
    "log pi of token t read from the logits at t instead of t - 1",
  ),
  Mutant(
    "adaptive_kl_sign",
    RL,
    "return beta * (1 + error * batch_size / horizon)",
    "return beta * (1 - error * batch_size / horizon)",
    (f"{T_RLHF} -k adaptive_kl",),
    "the adaptive controller lowers beta when the KL is above target",
  ),
  # ---- Hugging Face conversion (llm_jax/hf.py, the model features it needs) ----
  Mutant(
    "llama3_rope_without_smoothing",
    MODEL,
    "return jnp.where(medium, smoothed, scaled).astype(jnp.float32)",
    "return scaled.astype(jnp.float32)",
    (f"{T_HF} -k 'imported_logits and llama3'",),
    "Llama 3.1 RoPE scaling without the interpolated middle band",
  ),
  Mutant(
    "qwen2_qkv_bias_dropped",
    HF,
    'qkv_bias=hf.architecture == "Qwen2ForCausalLM",',
    "qkv_bias=False,",
    (f"{T_HF} -k 'imported_logits and qwen2'",),
    "Qwen2's q/k/v biases not read (a leftover tensor would also be refused)",
  ),
  Mutant(
    "gpt2_qkv_split_order",
    HF,
    "split_qkv = lambda w: tuple(x.reshape(*w.shape[:-1], n, h) for x in np.split(w, 3, axis=-1))",
    "split_qkv = lambda w: tuple(x.reshape(*w.shape[:-1], n, h) for x in np.split(w, 3, axis=-1)[::-1])",
    (f"{T_HF} -k 'imported_logits and gpt2'",),
    "GPT-2's fused c_attn split as v, k, q",
  ),
  Mutant(
    "linear_weight_not_transposed",
    HF,
    "lambda w: (np.ascontiguousarray(w.T).reshape(our_shape),),",
    "lambda w: (np.ascontiguousarray(w).reshape(our_shape),),",
    (f"{T_HF} -k 'imported_logits and mistral'",),
    "an nn.Linear [out, in] weight read as [in, out] (square q_proj hides it from shape checks)",
  ),
  Mutant(
    "lora_merge_without_scale",
    "llm_jax/lora.py",
    "(weight.astype(jnp.float32) + lora.scale * delta.reshape(weight.shape))",
    "(weight.astype(jnp.float32) + delta.reshape(weight.shape))",
    ("tests/test_lora.py -k merged_weights",),
    "merged LoRA weights that forget alpha/rank: export and generation differ from the trained adapter model",
  ),
  Mutant(
    "lora_base_trained",
    "llm_jax/lora.py",
    "frozen = {p for p in paths if p not in adapters and any(p[: len(q)] == q for q in prefixes)}",
    "frozen = {p for p in paths if p not in adapters and any(p[: len(q)] == q for q in prefixes) and False}",
    ("tests/test_lora.py -k init_equals",),
    "LoRA that trains (and saves) the whole base instead of only the adapters",
  ),
  Mutant(
    "lens_without_final_norm",
    "llm_jax/inference/inspection.py",
    "return model.logits(model.final_norm(residual_XD))",
    "return model.logits(residual_XD)",
    ("tests/test_inspect.py -k numpy_attention",),
    "the logit lens reads the residual stream without the final norm (the last row is no longer the logits)",
  ),
  Mutant(
    "inspect_probs_without_temperature",
    "llm_jax/inference/inspection.py",
    "log_probs_XV = jax.nn.log_softmax(restrict_logits(logits_XV, temperature, banned))",
    "log_probs_XV = jax.nn.log_softmax(restrict_logits(logits_XV, 1.0, banned))",
    ("tests/test_inspect.py -k softmax_top_k",),
    "the inspector's probabilities ignore the sampling temperature",
  ),
  Mutant(
    "inspect_rank_off_by_one",
    "llm_jax/inference/inspection.py",
    "rank_X = 1 + jnp.sum(log_probs_XV > chosen_log_prob_X[:, None], axis=-1)",
    "rank_X = jnp.sum(log_probs_XV > chosen_log_prob_X[:, None], axis=-1)",
    ("tests/test_inspect.py -k softmax_top_k",),
    "the chosen token's rank counts from 0",
  ),
  Mutant(
    "study_spread_ddof_0",
    "llm_jax/tasks/world_facts/alignment_study.py",
    "float(values.std(ddof=1))",
    "float(values.std(ddof=0))",
    ("tests/test_end_to_end.py -k mean_and_spread",),
    "the study's spread over seeds as a population std (ddof 0)",
  ),
  Mutant(
    "judge_prefilter_swapped",
    "llm_jax/tasks/world_facts/data.py",
    "if c in answer and re.search(",
    "if answer in c and re.search(",
    ("tests/test_world_facts.py -k judge_grades",),
    "the gold judge's substring pre-test asks whether the answer is inside the capital's name",
  ),
  Mutant(
    "shard_source_boundary_off_by_one",
    "llm_jax/data/prepared.py",
    "s = bisect.bisect_right(self.starts, i) - 1",
    "s = bisect.bisect_left(self.starts, i) - 1",
    ("tests/test_prepared_data.py -k in_memory_packing",),
    "the prepared reader maps a shard's first row to the previous shard",
  ),
  Mutant(
    "splash_unscaled_queries",
    "llm_jax/attention_kernels.py",
    "q_BLNH = q_BLNH * jnp.asarray(1 / math.sqrt(h), q_BLNH.dtype)",
    "q_BLNH = q_BLNH * jnp.asarray(1.0, q_BLNH.dtype)",
    ("tests/test_attention_kernels.py -k reference_attention",),
    "splash attention without the 1/sqrt(head_dim) scale",
  ),
)


def check_mutants(mutants=MUTANTS, root: str = ROOT) -> list[str]:
  """Problems with the list itself: unknown files, snippets not found exactly once, no-op replacements."""
  problems = []
  names = [m.name for m in mutants]
  problems += [f"duplicate mutant name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
  for m in mutants:
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
      problems.append(f"{m.name}: no file {m.file}")
      continue
    with open(path, encoding="utf-8") as f:
      count = f.read().count(m.original)
    if count != 1:
      problems.append(f"{m.name}: `{m.original}` occurs {count} times in {m.file} (must be exactly once)")
    if m.original == m.replacement or "\n" in m.original or "\n" in m.replacement:
      problems.append(f"{m.name}: the replacement must be a different single line")
    if not m.tests:
      problems.append(f"{m.name}: no tests")
    for spec in m.tests:
      test_file = shlex.split(spec)[0].split("::")[0]
      if not os.path.isfile(os.path.join(root, test_file)):
        problems.append(f"{m.name}: no test file {test_file}")
  return problems


def copy_repo(destination: str) -> None:
  for name in COPIED:
    source = os.path.join(ROOT, name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(destination, name), ignore=shutil.ignore_patterns("__pycache__"))
    elif os.path.isfile(source):
      shutil.copy2(source, destination)


def apply(mutant: Mutant, root: str) -> None:
  path = os.path.join(root, mutant.file)
  with open(path, encoding="utf-8") as f:
    source = f.read()
  assert source.count(mutant.original) == 1, mutant.name
  with open(path, "w", encoding="utf-8") as f:
    f.write(source.replace(mutant.original, mutant.replacement))


def environment(root: str) -> dict[str, str]:
  env = dict(
    os.environ,
    PYTHONPATH=root,
    JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PLATFORMS="cpu",
  )
  env.pop("XLA_FLAGS", None)  # conftest.py sets the 8 simulated devices.
  return env


@dataclasses.dataclass
class Result:
  mutant: Mutant
  status: str  # killed | survived | timeout | error
  seconds: float
  detail: str = ""  # The test invocation that killed it, or the error.

  @property
  def killed(self) -> bool:
    return self.status in ("killed", "timeout")


def run_mutant(mutant: Mutant | None, timeout: float, verbose: bool = False) -> Result:
  """Copies the repository, applies the mutant (None: the unmodified code) and runs its tests."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
    copy_repo(tmp)
    if mutant is not None:
      apply(mutant, tmp)
    specs = mutant.tests if mutant is not None else tuple(dict.fromkeys(s for m in MUTANTS for s in m.tests))
    deadline = start + timeout
    for spec in specs:
      command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(spec)]
      try:
        proc = subprocess.run(
          command,
          cwd=tmp,
          env=environment(tmp),
          capture_output=True,
          text=True,
          timeout=max(deadline - time.perf_counter(), 1),
        )
      except subprocess.TimeoutExpired:
        return Result(mutant, "timeout", time.perf_counter() - start, spec)
      tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
      if verbose:
        print(f"  $ pytest {spec}  -> exit {proc.returncode}\n" + "\n".join("    " + l for l in tail.splitlines()))
      if proc.returncode == 1:  # Tests ran and failed.
        return Result(mutant, "killed", time.perf_counter() - start, spec)
      if proc.returncode != 0:  # 2 interrupted (e.g. import error), 4 usage error, 5 nothing collected.
        return Result(mutant, "error", time.perf_counter() - start, f"{spec}: pytest exit {proc.returncode}\n{tail}")
  return Result(mutant, "survived", time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
  parser.add_argument("--min_kill_rate", type=float, default=0.9)
  parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (all its tests)")
  parser.add_argument(
    "--baseline", action="store_true", help="first run every named test on the unmodified code (they must pass)"
  )
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("-v", "--verbose", action="store_true", help="show the end of each pytest run")
  args = parser.parse_args(argv)

  problems = check_mutants()
  if problems:
    print("the mutant list is out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 2
  mutants = list(MUTANTS)
  if args.only:
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
    if unknown:
      print(f"unknown mutants {unknown}; --list shows them", file=sys.stderr)
      return 2
    mutants = [m for m in MUTANTS if m.name in wanted]
  if args.list:
    for m in mutants:
      print(f"{m.name:<34} {m.file:<30} {m.why}")
    return 0

  if args.baseline:
    print("baseline: every named test on the unmodified code ...", flush=True)
    base = run_mutant(None, timeout=args.timeout * 4, verbose=args.verbose)
    if base.status != "survived":
      print(f"baseline failed ({base.status}, {base.seconds:.0f} s): {base.detail}", file=sys.stderr)
      return 2
    print(f"baseline passed in {base.seconds:.0f} s", flush=True)

  results = []
  total_start = time.perf_counter()
  print(f"{'mutant':<34} {'file':<30} {'status':<9} {'seconds':>7}  test", flush=True)
  for m in mutants:
    r = run_mutant(m, args.timeout, args.verbose)
    results.append(r)
    detail = r.detail if r.status != "error" else r.detail.splitlines()[0]
    print(f"{m.name:<34} {m.file:<30} {r.status:<9} {r.seconds:>7.1f}  {detail}", flush=True)
  killed = sum(r.killed for r in results)
  rate = killed / len(results) if results else 1.0
  total = time.perf_counter() - total_start
  print(
    f"\nkilled {killed}/{len(results)} = {100 * rate:.1f}% (minimum {100 * args.min_kill_rate:.0f}%); "
    f"{total / 60:.1f} min"
  )
  for r in results:
    if r.status == "survived":
      print(f"  survived: {r.mutant.name}: {r.mutant.why} ({r.mutant.file}: `{r.mutant.replacement}`)")
    elif r.status == "error":
      print(f"  error: {r.mutant.name}: {r.detail}")
  return 0 if rate >= args.min_kill_rate else 1


if __name__ == "__main__":
  sys.exit(main())
