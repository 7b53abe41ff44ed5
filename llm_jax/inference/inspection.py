"""How a model goes from a prompt to each next token, read from its own forward pass (experiments/inspect.py).

    prompt ──tokenizer (chat: the template)──▶ ids ──Sampler.generate──▶ the answer's ids (the sampler's choices)
      └─ ONE forward pass over prompt + answer with `Transformer.forward_with_internals`: causal, so position
         P - 1 + t sees exactly what step t saw ──▶ logits, the residual stream after each layer, attention weights

The tokens are the sampler's own (`generate.py` picks the same ones with the same flags); the forward pass over the
whole sequence is what the inspection reads (models here are small: one pass, a few MB of weights and streams).

Definitions (inspect.json holds every number behind the figures; the figures are drawn from it alone):
- The distribution of a step: softmax(logits / temperature) (not divided when greedy, temperature 0), with the ids the
  sampler bans (chat: role and control tokens) at probability 0: what sampling draws from before top-k/top-p
  (`sequences.restrict_logits`). Rank 1 is the most likely token; entropy in nats.
- Logit lens: the residual stream after layer l (0 = the embeddings) through the final norm and the LM head, then the
  same distribution. After the last layer it is the model's own. A token *emerges* at the first layer from which it
  stays the top choice.
- Key step (default): the step writing the first token of the answer's first word that the prompt does not contain:
  the fact the model must supply ("Beijing" for "Where is the capital of China?"; "The capital of China is" is copied
  from the question). If every answer word is in the prompt: the least likely content token. `step` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llm_jax import modeling
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler, SamplingConfig, text_prompts
from llm_jax.sequences import restrict_logits
from llm_jax.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer

FIGURES = ("steps.png", "attention_mean.png", "attention_heads.png", "logit_lens.png", "logit_lens_steps.png")
_WORD = re.compile(r"\w+")


def logit_lens(model, residual_XD: jax.Array) -> jax.Array:
  """The LM head's float32 logits of residual-stream vectors [..., D]: final norm, then the head."""
  return model.logits(model.final_norm(residual_XD))


def _special_name(tokenizer: Tokenizer, token: int) -> str:
  if tokenizer.kind in ("char", "spm") and token < len(SPECIAL_TOKENS):
    return SPECIAL_TOKENS[token]
  fast = getattr(tokenizer, "_fast", None)  # Hugging Face tokenizers name their added tokens.
  return (fast.id_to_token(token) if fast is not None else None) or f"<special {token}>"


def pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
  """The text each token adds to the decoded sequence (so the pieces concatenate to `decode(ids)`); special tokens,
  which decode to nothing, by name."""
  out, plain, text = [], [], ""
  for token in ids:
    if token in tokenizer.special_ids:
      out.append(_special_name(tokenizer, token))
      continue
    plain.append(token)
    new = tokenizer.decode(plain)
    out.append(new[len(text) :] if new.startswith(text) else new)
    text = new
  return out


def _piece_after(tokenizer: Tokenizer, plain_context: list[int], context_text: str, token: int) -> str:
  if token in tokenizer.special_ids:
    return _special_name(tokenizer, token)
  new = tokenizer.decode([*plain_context, token])
  return new[len(context_text) :] if new.startswith(context_text) else new


def key_step(prompt: str, answer_pieces: Sequence[str], special: Sequence[bool], probs: Sequence[float]):
  """(step, why): the module docstring's definition."""
  prompt_words = {w.lower() for w in _WORD.findall(prompt)}
  starts, text = [], ""
  for piece, is_special in zip(answer_pieces, special):
    starts.append(len(text))
    text += "" if is_special else piece
  for word in _WORD.finditer(text):
    if word.group().lower() not in prompt_words:
      step = max(t for t, start in enumerate(starts) if start <= word.start() and not special[t])
      return step, f"the first token of {word.group()!r}, the answer's first word that the prompt does not contain"
  content = [t for t, (p, s) in enumerate(zip(answer_pieces, special)) if not s and p.strip()]
  if content:
    step = min(content, key=lambda t: probs[t])
    return step, "every answer word is in the prompt: the least likely content token"
  return 0, "the answer has no content token: the first step"


def _emergence(ranks: Sequence[int]) -> int | None:
  """The first layer from which the token stays the top choice (None: not the top choice after the last layer)."""
  if ranks[-1] != 1:
    return None
  layer = len(ranks) - 1
  while layer > 0 and ranks[layer - 1] == 1:
    layer -= 1
  return layer


def _captured_forward(graphdef, temperature: float, banned: tuple[int, ...], top_k: int):
  """A jitted (params, tokens [1, T], step positions [n], chosen ids [n]) → numbers of every step and layer."""

  def distribution(logits_XV, chosen_X):
    log_probs_XV = jax.nn.log_softmax(restrict_logits(logits_XV, temperature, banned))
    chosen_log_prob_X = jnp.take_along_axis(log_probs_XV, chosen_X[:, None], axis=-1)[:, 0]
    rank_X = 1 + jnp.sum(log_probs_XV > chosen_log_prob_X[:, None], axis=-1)
    top_log_probs_XK, top_ids_XK = jax.lax.top_k(log_probs_XV, top_k)
    entropy_X = -jnp.sum(jnp.exp(log_probs_XV) * log_probs_XV, axis=-1)
    return dict(
      prob=jnp.exp(chosen_log_prob_X),
      rank=rank_X,
      entropy=entropy_X,
      top_ids=top_ids_XK,
      top_probs=jnp.exp(top_log_probs_XK),
    )

  @jax.jit
  def run(params, tokens_1T, positions_N, chosen_N):
    model = nnx.merge(graphdef, params)
    logits_1TV, internals = model.forward_with_internals(tokens_1T)
    final = distribution(logits_1TV[0, positions_N], chosen_N)
    # The lens one layer at a time: [layers + 1, n, V] logits at once would be large for big vocabularies.
    lens = jax.lax.map(
      lambda residual_ND: distribution(logit_lens(model, residual_ND), chosen_N),
      internals.residual_stream[:, 0, positions_N],
    )
    return final, lens, internals.attention_probs[:, 0]

  return run


def inspect(
  graphdef,
  params,
  mesh: Mesh,
  tokenizer: Tokenizer,
  prompt: str,
  *,
  chat: bool = False,
  sampling: SamplingConfig | None = None,
  key: jax.Array | None = None,
  top_k_shown: int = 5,
  step: int | None = None,
  sampler: Sampler | None = None,
) -> dict:
  """Generates the answer to `prompt` with the sampler and returns the inspection (the JSON, module docstring)."""
  if not prompt.strip():
    raise UserError("the prompt is empty")
  if top_k_shown < 1:
    raise UserError(f"--top_k_shown={top_k_shown} must be >= 1")
  sampling = sampling or SamplingConfig()
  sampling.validate()
  sampler = sampler or Sampler(graphdef, params, mesh)
  cfg = sampler.model_cfg
  (prompt_ids,), sampling = text_prompts(tokenizer, [prompt], sampling, chat)
  key = jax.random.key(0) if key is None else key
  generation = sampler.generate([prompt_ids], sampling, key)
  answer, sampler_log_probs = generation.tokens[0], generation.log_probs[0]
  n = len(answer)
  if step is not None and not 0 <= step < n:
    raise UserError(f"--step={step}: the answer has {n} step(s), 0 to {n - 1}")

  top_k = min(top_k_shown, cfg.vocab_size)
  run = _captured_forward(graphdef, sampling.temperature, sampling.banned_ids, top_k)
  tokens_1T = np.asarray([prompt_ids + answer[:-1]], np.int32)
  positions_N = np.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + n, dtype=np.int32)
  final, lens, attention_LNTS = jax.device_get(run(params, tokens_1T, positions_N, np.asarray(answer, np.int32)))

  special = lambda ids: [t in tokenizer.special_ids for t in ids]
  prompt_pieces, answer_pieces = pieces(tokenizer, prompt_ids), pieces(tokenizer, answer)
  steps = []
  plain, text = [], ""
  for t, token in enumerate(answer):
    lens_ranks = lens["rank"][:, t].tolist()
    steps.append(
      {
        "step": t,
        "position": int(positions_N[t]),
        "id": token,
        "piece": answer_pieces[t],
        "special": token in tokenizer.special_ids,
        "prob": float(final["prob"][t]),
        "rank": int(final["rank"][t]),
        "entropy": float(final["entropy"][t]),
        "sampler_prob": float(np.exp(sampler_log_probs[t])),
        "top": [
          {"id": int(i), "piece": _piece_after(tokenizer, plain, text, int(i)), "prob": float(p)}
          for i, p in zip(final["top_ids"][t], final["top_probs"][t])
        ],
        "lens": {
          "prob": lens["prob"][:, t].tolist(),
          "rank": lens_ranks,
          "top_id": lens["top_ids"][:, t, 0].tolist(),
          "top_piece": [_piece_after(tokenizer, plain, text, int(i)) for i in lens["top_ids"][:, t, 0]],
          "top_prob": lens["top_probs"][:, t, 0].tolist(),
        },
        "emerges_at_layer": _emergence(lens_ranks),
      }
    )
    if token not in tokenizer.special_ids:
      plain.append(token)
      text = tokenizer.decode(plain)

  if step is None:
    chosen, why = key_step(prompt, answer_pieces, special(answer), [s["prob"] for s in steps])
  else:
    chosen, why = step, "chosen with --step"
  query = int(positions_N[chosen])
  weights_LNS = attention_LNTS[:, :, query, : query + 1]
  context = prompt_ids + answer[:chosen]
  return {
    "prompt": prompt,
    "chat": chat,
    "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(sampling).items()},
    "distribution": "softmax(logits / temperature) (not divided when greedy), banned ids at probability 0, "
    "before top-k/top-p; rank 1 = most likely; entropy in nats",
    "model": {
      "num_layers": cfg.num_layers,
      "num_heads": cfg.num_heads,
      "num_kv_heads": cfg.num_kv_heads,
      "d_model": cfg.d_model,
      "vocab_size": cfg.vocab_size,
    },
    "prompt_tokens": [
      {"id": t, "piece": p, "special": s} for t, p, s in zip(prompt_ids, prompt_pieces, special(prompt_ids))
    ],
    "answer": tokenizer.decode(answer),
    "steps": steps,
    "key_step": chosen,
    "key_step_reason": why,
    "lens_layers": "0 = the embeddings, l = after block l",
    "attention": {
      "step": chosen,
      "query_position": query,
      "context": [{"id": t, "piece": p} for t, p in zip(context, prompt_pieces + answer_pieces[:chosen])],
      "weights": weights_LNS.tolist(),  # [layer][head][context position]
      "head_mean": weights_LNS.mean(axis=1).tolist(),  # [layer][context position]
    },
  }


def inspect_workdir(workdir: str, mesh: Mesh, checkpoint_step: int | None = None, **kwargs) -> dict:
  """`inspect` on the latest (or `checkpoint_step`'s) checkpoint of any language-model workdir."""
  modeling.check_language_model(workdir, checkpoint_step)
  tokenizer = load_tokenizer(workdir)
  spec, params, meta = modeling.load_model(workdir, mesh, checkpoint_step)
  result = inspect(spec.graphdef, params, mesh, tokenizer, **kwargs)
  return {"workdir": os.path.abspath(workdir), "stage": meta.get("stage"), "checkpoint": meta.get("step"), **result}


# ---- what it writes: figures, INSPECT.md, inspect.json (all from the JSON dict) ----


def _label(piece: str) -> str:
  piece = piece.replace(" ", "␣").replace("\n", "⏎")
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in piece) or "∅"


def _quote(piece: str) -> str:
  return json.dumps(piece, ensure_ascii=False)


def plot(result: dict, out_dir: str) -> list[str]:
  """The figures of `FIGURES`, drawn from the inspection's numbers alone."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  steps, key = result["steps"], result["key_step"]
  step_labels = [_label(s["piece"]) for s in steps]
  attention = result["attention"]
  context_labels = [_label(c["piece"]) for c in attention["context"]]
  layers = len(attention["head_mean"])
  paths = []

  def save(fig, name):
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(steps) + 2), 3.2))
  colors = ["tab:red" if s["step"] == key else "tab:blue" for s in steps]
  ax.bar(range(len(steps)), [s["prob"] for s in steps], color=colors)
  ax.set_ylabel("p(chosen token)")
  ax.set_ylim(0, 1)
  ax.set_xticks(range(len(steps)), step_labels, rotation=90, fontsize=8)
  twin = ax.twinx()
  twin.plot(range(len(steps)), [s["entropy"] for s in steps], color="black", marker=".", label="entropy (nats)")
  twin.set_ylabel("entropy (nats)")
  twin.set_ylim(bottom=0)
  ax.set_title(f"each step: chosen token's probability (key step {key} in red), entropy")
  save(fig, "steps.png")

  width = max(5, 0.3 * len(context_labels) + 2)
  fig, ax = plt.subplots(figsize=(width, 1 + 0.4 * layers))
  image = ax.imshow(np.asarray(attention["head_mean"]), aspect="auto", cmap="viridis", vmin=0)
  ax.set_xticks(range(len(context_labels)), context_labels, rotation=90, fontsize=8)
  ax.set_yticks(range(layers), [f"layer {i + 1}" for i in range(layers)])
  ax.set_title(f"step {key}: where the last position attends (mean over heads)")
  fig.colorbar(image, ax=ax)
  save(fig, "attention_mean.png")

  weights = np.asarray(attention["weights"])
  heads = weights.shape[1]
  fig, axes = plt.subplots(layers, 1, figsize=(width, 0.8 + (0.25 * heads + 0.5) * layers), squeeze=False)
  for layer, ax in enumerate(axes[:, 0]):
    ax.imshow(weights[layer], aspect="auto", cmap="viridis", vmin=0, vmax=weights.max())
    ax.set_yticks(range(heads), [f"h{h}" for h in range(heads)], fontsize=7)
    ax.set_ylabel(f"layer {layer + 1}")
    ax.set_xticks(range(len(context_labels)), context_labels if layer == layers - 1 else [], rotation=90, fontsize=8)
  axes[0, 0].set_title(f"step {key}: attention of the last position, per layer and head")
  save(fig, "attention_heads.png")

  lens = steps[key]["lens"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
  left.plot(range(layers + 1), lens["prob"], marker="o")
  left.set_ylim(0, 1)
  left.set_ylabel("probability")
  right.plot(range(layers + 1), lens["rank"], marker="o")
  right.set_yscale("log")
  right.invert_yaxis()
  right.set_ylabel("rank (1 = top)")
  for ax in (left, right):
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_xticks(range(layers + 1))
  fig.suptitle(f"logit lens, step {key}: the chosen token {_quote(steps[key]['piece'])} after each layer")
  save(fig, "logit_lens.png")

  fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(steps) + 2), 1.2 + 0.35 * (layers + 1)))
  grid = np.asarray([s["lens"]["prob"] for s in steps]).T
  image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
  ax.set_xticks(range(len(steps)), step_labels, rotation=90, fontsize=8)
  ax.set_yticks(range(layers + 1), ["emb"] + [str(i) for i in range(1, layers + 1)])
  ax.set_ylabel("layer")
  ax.set_title("logit lens: p(chosen token) after each layer, every step")
  fig.colorbar(image, ax=ax)
  save(fig, "logit_lens_steps.png")
  return paths


def _top(step: dict, k: int | None = None) -> str:
  return ", ".join(f"{_quote(c['piece'])} {c['prob']:.2f}" for c in step["top"][:k])


def _strongest(row: Sequence[float], context: list[dict], k: int = 3) -> str:
  order = np.argsort(row)[::-1][:k]
  return ", ".join(f"{_quote(context[i]['piece'])} {row[i]:.2f}" for i in order)


def _emerges(step: dict, layers: int) -> str:
  layer = step["emerges_at_layer"]
  if layer is None:
    return f"not the top choice after the last layer (rank {step['lens']['rank'][-1]})"
  return "the top choice from the embeddings on" if layer == 0 else f"emerges at layer {layer} of {layers}"


def markdown(result: dict, figures_dir: str = ".") -> str:
  steps, key, attention = result["steps"], result["key_step"], result["attention"]
  layers = len(attention["head_mean"])
  where = f"{result['workdir']} ({result['stage']}, step {result['checkpoint']})" if "workdir" in result else "a model"
  s = result["sampling"]
  lines = [
    f"# How {where} continues {_quote(result['prompt'])}",
    "",
    f"Settings: chat={result['chat']}, temperature={s['temperature']}, top_k={s['top_k']}, top_p={s['top_p']}, "
    f"max_new_tokens={s['max_new_tokens']}. Answer: {_quote(result['answer'])}",
    "",
    "Every number comes from the model's own forward pass over the prompt and the sampler's answer "
    "(llm_jax/inference/inspection.py); inspect.json holds them all.",
    "",
    f"## Tokens: the prompt as the model sees it ({len(result['prompt_tokens'])} tokens, special ones in bold)",
    "",
    " ".join(
      f"**{t['piece']}**" if t["special"] else f"`{_quote(t['piece'])}`({t['id']})" for t in result["prompt_tokens"]
    ),
    "",
    "## Each generated step",
    "",
    f"Distribution: {result['distribution']}. The sampler's own probability of its choice (after top-k/top-p) is in "
    "inspect.json (`sampler_prob`).",
    "",
    "| step | chosen | p | rank | entropy | top choices |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for st in steps:
    mark = " **(key)**" if st["step"] == key else ""
    lines.append(
      f"| {st['step']}{mark} | {_quote(st['piece'])} | {st['prob']:.3f} | {st['rank']} | {st['entropy']:.2f} | "
      f"{_top(st)} |"
    )
  lens = steps[key]["lens"]
  lines += [
    "",
    f"![steps]({figures_dir}/steps.png)",
    "",
    f"## Key step {key}: {_quote(steps[key]['piece'])}",
    "",
    f"Why this step: {result['key_step_reason']}. Override with `--step=N`.",
    "",
    f"### Attention: where position {attention['query_position']} (the last one at step {key}) looks",
    "",
    "| layer | strongest context tokens (mean over heads) |",
    "| --- | --- |",
  ]
  lines += [
    f"| {layer + 1} | {_strongest(row, attention['context'])} |" for layer, row in enumerate(attention["head_mean"])
  ]
  lines += [
    "",
    f"![attention_mean]({figures_dir}/attention_mean.png)",
    "",
    f"![attention_heads]({figures_dir}/attention_heads.png)",
    "",
    f"### Logit lens: the chosen token after each layer ({_emerges(steps[key], layers)})",
    "",
    "| layer | rank of the chosen token | its p | the lens's top token (p) |",
    "| --- | --- | --- | --- |",
  ]
  for layer in range(layers + 1):
    name = "embeddings" if layer == 0 else str(layer)
    lines.append(
      f"| {name} | {lens['rank'][layer]} | {lens['prob'][layer]:.3f} | "
      f"{_quote(lens['top_piece'][layer])} ({lens['top_prob'][layer]:.3f}) |"
    )
  lines += [
    "",
    f"![logit_lens]({figures_dir}/logit_lens.png)",
    "",
    f"![logit_lens_steps]({figures_dir}/logit_lens_steps.png)",
  ]
  return "\n".join(lines) + "\n"


def text_view(result: dict, top_k: int = 3) -> str:
  """The compact view experiments/inspect.py prints."""
  steps, key, attention = result["steps"], result["key_step"], result["attention"]
  layers = len(attention["head_mean"])
  prompt = " ".join(f"[{t['piece']}]" if t["special"] else _quote(t["piece"]) for t in result["prompt_tokens"])
  lines = [f"prompt ({len(result['prompt_tokens'])} tokens): {prompt}", f"answer: {_quote(result['answer'])}", ""]
  lines.append(f"{'step':>4}  {'p':>5}  {'H':>5}  {'chosen':<16} top {top_k}")
  for st in steps:
    mark = "*" if st["step"] == key else " "
    lines.append(
      f"{st['step']:>3}{mark}  {st['prob']:5.3f}  {st['entropy']:5.2f}  {_quote(st['piece']):<16} {_top(st, top_k)}"
    )
  lens = steps[key]["lens"]
  ranks = "  ".join(f"{'emb' if i == 0 else i}:{r}/{p:.2f}" for i, (r, p) in enumerate(zip(lens["rank"], lens["prob"])))
  lines += [
    "",
    f"key step {key} {_quote(steps[key]['piece'])}: {result['key_step_reason']}",
    f"logit lens (rank/p by layer): {ranks}  → {_emerges(steps[key], layers)}",
    "attention of the last position (mean over heads), strongest per layer:",
  ]
  lines += [f"  layer {i + 1}: {_strongest(row, attention['context'])}" for i, row in enumerate(attention["head_mean"])]
  return "\n".join(lines)


def write(result: dict, out_dir: str) -> list[str]:
  """Writes OUT/inspect.json, OUT/INSPECT.md and the figures; returns their paths."""
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--output={out_dir}: cannot create it ({e.strerror})") from None
  json_path, md_path = os.path.join(out_dir, "inspect.json"), os.path.join(out_dir, "INSPECT.md")
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  figures = plot(result, out_dir)
  with open(md_path, "w") as f:
    f.write(markdown(result))
  return [md_path, json_path, *figures]


def comparison_markdown(inspections: Sequence[tuple[str, dict, str]]) -> list[str]:
  """Report lines comparing inspections of one prompt, [(label, result, figure dir relative to the report)]: a
  table, a few sentences generated from the numbers, and the figures (attention for the last one only)."""
  lines = [
    "| model | answer | top choices after the prompt | key token (p) | logit lens |",
    "| --- | --- | --- | --- | --- |",
  ]
  for label, result, _ in inspections:
    key = result["steps"][result["key_step"]]
    layers = len(result["attention"]["head_mean"])
    lines.append(
      f"| {label} | {_quote(result['answer'])} | {_top(result['steps'][0], 3)} | {_quote(key['piece'])} "
      f"({key['prob']:.2f}) | {_emerges(key, layers)} |"
    )
  lines.append("")
  for label, result, _ in inspections:
    steps, key = result["steps"], result["steps"][result["key_step"]]
    first = steps[0]["top"]
    last_layer = result["attention"]["head_mean"][-1]
    lines.append(
      f"- {label}: after the prompt its top choices are {_top(steps[0], 3)}"
      f"{' (a near tie)' if len(first) > 1 and first[0]['prob'] - first[1]['prob'] < 0.1 else ''}; "
      f"it picks {_quote(steps[0]['piece'])} and answers {_quote(result['answer'])}. "
      f"Its key token {_quote(key['piece'])} (step {key['step']}: {result['key_step_reason']}) has p = "
      f"{key['prob']:.2f} among {len(key['top'])} shown alternatives led by {_top(key, 2)}; in the logit lens it "
      f"{_emerges(key, len(key['lens']['rank']) - 1)} (rank {key['lens']['rank'][0]} after the embeddings); the "
      f"last layer's heads attend most to {_strongest(last_layer, result['attention']['context'], 2)}."
    )
  lines.append("")
  for i, (label, _, figures) in enumerate(inspections):
    names = ["steps.png", "logit_lens.png"] + (["attention_mean.png"] if i == len(inspections) - 1 else [])
    lines += [f"![{label}: {name}]({figures}/{name})" for name in names]
  return lines
