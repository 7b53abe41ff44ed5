"""Supervised fine-tuning: continue a pretrained model on chats, with the loss on assistant tokens only.

The stage contributes its data (chats rendered with the one chat template, packed without splitting a chat)
and its evaluation (greedy answers on held-out chats, exact match, through the inference sampler). Its loss is
pretraining's next-token loss: the chat's training mask is the `loss_mask`. Parameters come from the
`init_from` workdir; the optimizer starts fresh; the tokenizer is copied along. With `config.lora.rank` > 0 only
LoRA adapters train on the frozen init_from model (llm_jax/lora.py).

Over-long chats (more than seq_len + 1 tokens) are truncated (`data.overlong="truncate"`: the start of the
chat is kept, so what is trained on still sees its prompt) or dropped (`"drop"`); both are counted and
printed, as are chats with nothing to train on (no assistant turn, or truncated before it).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from llm_jax import chat as chat_lib
from llm_jax.data import text
from llm_jax.data.jsonl import held_out_split
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler, SamplingConfig
from llm_jax.modeling import lm_factory, load_params, model_spec
from llm_jax.sequences import next_token_loss
from llm_jax.tokenizer import Tokenizer
from llm_jax.train import loop, stage


@dataclasses.dataclass
class ChatData:
  train_rows: dict[str, np.ndarray]
  eval_rows: dict[str, np.ndarray]
  eval_chats: list[chat_lib.Chat]
  report: dict[str, int]


def render_chats(
  chats, tokenizer: Tokenizer, seq_len: int, overlong: str, report: dict[str, int]
) -> tuple[list[list[int]], list[list[int]]]:
  """Renders chats; applies the over-long policy; drops chats with nothing to train on. Counts everything."""
  sequences, masks = [], []
  for chat in chats:
    tokens, mask = chat_lib.render(tokenizer, chat)
    if len(tokens) > seq_len + 1:
      if overlong == "drop":
        report["dropped_overlong"] += 1
        continue
      tokens, mask = tokens[: seq_len + 1], mask[: seq_len + 1]
      report["truncated"] += 1
    if not any(mask[1:]):
      report["nothing_to_train"] += 1
      continue
    sequences.append(tokens)
    masks.append(mask)
  return sequences, masks


def prepare(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ChatData:
  if config.data.overlong not in ("truncate", "drop"):
    raise UserError(f"data.overlong={config.data.overlong!r} must be 'truncate' or 'drop'")
  if not config.data.path:
    raise UserError("data.path: give a JSONL chat file")
  train_file = chat_lib.read_chats(config.data.path, config.data.on_error)
  report = {
    "chats": len(train_file.chats),
    "skipped_lines": train_file.skipped_lines,
    "truncated": 0,
    "dropped_overlong": 0,
    "nothing_to_train": 0,
  }
  if config.data.eval_path:
    eval_file = chat_lib.read_chats(config.data.eval_path, config.data.on_error)
    train_chats, eval_chats = train_file.chats, eval_file.chats
    report["skipped_lines"] += eval_file.skipped_lines
  else:
    train_chats, eval_chats = held_out_split(
      train_file.chats, config.data.eval_fraction, config.seed, config.data.path, "chats"
    )
  sequences, masks = render_chats(train_chats, tokenizer, config.seq_len, config.data.overlong, report)
  if not sequences:
    raise UserError(f"{config.data.path}: no chat has assistant tokens to train on ({report})")
  eval_report = dict.fromkeys(report, 0)
  eval_sequences, eval_masks = render_chats(eval_chats, tokenizer, config.seq_len, config.data.overlong, eval_report)
  if not eval_sequences:
    raise UserError("no held-out chat has assistant tokens to evaluate on")
  return ChatData(
    text.pack_whole(sequences, masks, config.seq_len),
    text.pack_whole(eval_sequences, eval_masks, config.seq_len),
    [c for c in eval_chats if any(m.role == "assistant" for m in c)],
    report,
  )


def exact_match_eval(sampler: Sampler, tokenizer: Tokenizer, chats, max_answer_tokens: int):
  """Greedy answers to held-out chats (their last assistant turn) compared with the reference text."""
  prompts, answers = [], []
  for chat in chats:
    context, answer = chat_lib.prompt_and_answer(chat)
    prompts.append(chat_lib.render(tokenizer, context, generation_prompt=True)[0])
    answers.append(answer.strip())
  sampling = chat_lib.chat_sampling(SamplingConfig(max_new_tokens=max_answer_tokens, temperature=0.0), tokenizer)

  def evaluate(params) -> dict[str, float]:
    sampler.params = params  # Same shapes: the compiled decode loop is reused.
    generation = sampler.generate(prompts, sampling, jax.random.key(0), allow_context_cut=True)
    correct = [tokenizer.decode(out).strip() == answer for out, answer in zip(generation.tokens, answers)]
    # Prompts so long that fewer than max_answer_tokens fit after them: counted, never hidden.
    return {"eval_exact_match": float(np.mean(correct)), "eval_answers_cut_by_context": generation.cut_by_context}

  return evaluate


def run(
  config: ml_collections.ConfigDict, workdir: str, devices=None, stop_after: int | None = None
) -> loop.TrainResult:
  """SFT on `devices` (default: all); `stop_after=N` stops after N steps, as a preemption would."""
  devices = jax.devices() if devices is None else devices
  model_cfg, mesh, tokenizer = stage.continue_from(config, workdir, devices, "pretraining (or SFT)", stage_name="sft")
  data = prepare(config, tokenizer)
  print(
    f"chats: {data.report}; {len(data.train_rows['inputs'])} train rows, {len(data.eval_rows['inputs'])} "
    f"eval rows of {config.seq_len}; {len(data.eval_chats)} held-out chats for exact match",
    flush=True,
  )

  lora = stage.lora_start(config, model_cfg, mesh)  # None: full fine-tuning.
  factory = lm_factory(model_cfg, lora and lora.lora)
  state = model_spec(factory, mesh)
  sampler = Sampler(state.graphdef, None, mesh, model_cfg=model_cfg)  # With LoRA: decodes through the adapters.
  if lora is not None:
    initial_params = lambda s: lora.initial_params(factory, s, config.seed)
  else:
    initial_params = lambda s: load_params(config.init_from, s, mesh)[0]
  eval_chats = data.eval_chats[: config.exact_match_examples] if config.exact_match_examples else data.eval_chats
  pid, count = jax.process_index(), jax.process_count()
  return loop.train(
    config,
    workdir,
    mesh=mesh,
    model_factory=factory,
    loss_fn=next_token_loss,
    train_data=text.train_dataset(data.train_rows, config.batch_size, config.seed, pid, count),
    eval_data=text.eval_batches(data.eval_rows, config.batch_size, config.eval_batches, pid, count),
    tokens_per_step=config.batch_size * config.seq_len,
    flops_per_token=model_cfg.train_flops_per_token(config.seq_len),
    initial_params=initial_params,
    extra_eval=exact_match_eval(sampler, tokenizer, eval_chats, config.max_answer_tokens),
    eval_at_start=True,
    stop_after=stop_after,
    tokenizer=tokenizer,
    model_cfg=model_cfg,
    meta={
      "stage": "sft",
      "model": dataclasses.asdict(model_cfg),
      "init_from": config.init_from,
      "data_report": data.report,
      **({"lora": lora.record} if lora else {}),
    },
  )
