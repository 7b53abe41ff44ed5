"""lm-evaluation-harness tasks on the project's model: an `lm_eval` model class, in-process, batched and sharded.

    requests ──tokenize as lm-eval's HF backend──▶ (context ids, continuation ids)
        └─ one row per distinct input (MC answers that share it share the row), sorted by length, cut into batches
           of `batch_size` rows, left-padded to a power-of-two bucket (few compiled shapes)
            └─ jitted scorer: backbone on [B, T] (batch over the mesh's batch axes), LM head on the last C columns
               only, log-softmax in float32 → per request (log p, is_greedy)

Tokenization is lm-eval's own (this class is a `TemplateLM`: its `_encode_pair` and empty-context rule), with
`tok_encode` doing what the HF backend's does: the model tokenizer's default specials (BOS for Llama, none for
GPT-2/Qwen2) unless the text already starts with the prefix token; `prefix_token_id` is BOS, else EOS. Inputs
longer than the context keep their last `max_length` tokens, as the HF backend cuts them. So on a checkpoint
imported from Hugging Face the per-request log-likelihoods equal the HF backend's to float32 rounding.

`loglikelihood_rolling` scores a document in the harness's disjoint rolling windows (the HF backend's call,
including its quirk: a tokenizer that adds BOS by default scores p(BOS | prefix) in the first window).
`generate_until` runs the KV-cache sampler; a row stops at the tokenizer's stop ids, at `max_gen_toks`, or once
its text contains a stop string; the text is cut at the first stop string as the HF backend cuts it.

Processes: every process runs the harness on all requests (the harness sees one rank); each batch's rows are
spread over the mesh, so each process computes the rows of its devices, and the small per-request results are
replicated to every process. Only process 0 should write files.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from llm_jax import chat as chat_lib
from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.inference.loading import load_sampler
from llm_jax.inference.sampler import Sampler, SamplingConfig, bucket
from llm_jax.model import ModelConfig, Transformer
from llm_jax.sequences import PAD_FILL, left_pad, positions_from_segments
from llm_jax.tokenizer import Tokenizer

# experiments/lm_eval.py is named like the package: a tool run from experiments/ (its directory first on sys.path)
# would import that script as `lm_eval`. The package is imported with that directory off the path.
_EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments")
_saved_path = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _EXPERIMENTS]
try:
  import lm_eval
  from lm_eval import utils as lm_eval_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError:  # The `eval` extra is not installed: the class below cannot exist; `require_lm_eval` says so.
  lm_eval = None
  TemplateLM = object
finally:
  sys.path[:] = _saved_path

LM_EVAL_VERSION = "0.4.13"  # The request API implemented here (setup.cfg's `eval` extra pins it).
# Generation settings this class honours; any other key in a task's generation_kwargs is refused by name.
SUPPORTED_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"})
STOP_CHECK_EVERY = 8  # Tokens decoded between two looks for stop strings on the host.


def require_lm_eval() -> None:
  if lm_eval is None:
    raise UserError(f'lm-eval is not installed: pip install -e ".[eval]" (lm-eval=={LM_EVAL_VERSION})')
  if lm_eval.__version__ != LM_EVAL_VERSION:
    logging.warning(
      "lm-eval %s is installed; this model class implements %s's API", lm_eval.__version__, LM_EVAL_VERSION
    )


@dataclasses.dataclass
class _Row:
  """One row of a scoring batch: its input ids and the requests it answers."""

  inputs: list[int]
  requests: list[tuple[int, list[int]]]  # (request index, continuation ids).


class JaxLM(TemplateLM):
  """An lm-eval model over parameters sharded on `mesh` (see the module docstring).

  Attributes:
    params: The parameters; assign new ones (same shapes) to evaluate them with the compiled functions.
  """

  backend = "causal"

  def __init__(
    self,
    graphdef,
    params,
    mesh: Mesh,
    tokenizer: Tokenizer,
    model_cfg: ModelConfig | None = None,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    seed: int = 0,
    name: str = "llm_jax",
  ):
    require_lm_eval()
    super().__init__()
    self.graphdef, self.params, self.mesh, self.project_tokenizer = graphdef, params, mesh, tokenizer
    self.model_cfg = model_cfg or nnx.merge(graphdef, params).cfg
    shards = sharding.num_batch_shards(mesh)
    if batch_size < 1:
      raise UserError(f"batch_size={batch_size} must be >= 1")
    self.batch_size = -(-batch_size // shards) * shards  # Whole rows on every batch shard.
    self._max_length = max_length or self.model_cfg.max_seq_len
    if self._max_length > self.model_cfg.max_seq_len:
      raise UserError(f"max_length={max_length} exceeds the model's context ({self.model_cfg.max_seq_len})")
    self._max_gen_toks, self.seed, self.name = max_gen_toks, seed, name
    self.sampler = Sampler(graphdef, params, mesh, model_cfg=self.model_cfg)
    self._generate_calls = 0

  # ---- what the harness reads ----

  @property
  def eot_token_id(self) -> int:
    return self.project_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    """The HF backend's: BOS, or EOS for tokenizers without one (the context of an empty-context request)."""
    bos = self.project_tokenizer.bos_id
    return bos if bos is not None else self.project_tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return f"{self.name}:{self.project_tokenizer.fingerprint()}".replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return self.project_tokenizer.chat_template or "llm_jax"

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as text in the model's Jinja template (Hugging Face models); the project's own template
    inserts role tokens by id and has no text form, so `--apply_chat_template` is refused for it."""
    tokenizer = self.project_tokenizer
    if tokenizer.chat_template is None:
      raise UserError(
        "--apply_chat_template: this model uses the project's chat template (role tokens inserted by id, no text "
        "form); only a model with a Hugging Face chat_template can be evaluated in chat format"
      )
    messages = [chat_lib.Message(m["role"], m["content"]) for m in chat_history]
    if not add_generation_prompt:  # lm-eval continues an unfinished assistant turn: render, then cut its end.
      raise UserError("--apply_chat_template: continuing a final assistant message is not supported")
    return chat_lib.render_text(tokenizer, messages, generation_prompt=True)

  def _token_text(self, token_id: int) -> str | None:
    """The text of a special token (e.g. "<s>"), as the HF backend's decode(skip_special_tokens=False) gives it."""
    tokenizer = self.project_tokenizer
    for text in tokenizer.special_tokens.values():
      try:
        if tokenizer.token_id(text) == token_id:
          return text
      except UserError:
        continue
    return None

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **_):
    """The HF backend's `tok_encode`: the tokenizer's default specials (None), or with / without them."""
    tokenizer = self.project_tokenizer
    if add_special_tokens is None:
      prefix = self._token_text(self.prefix_token_id)
      add_special_tokens = not (prefix and string.startswith(prefix))
    ids = tokenizer.encode_default(string) if add_special_tokens else tokenizer.encode(string)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Iterable[int]) -> str:
    return self.project_tokenizer.decode(tokens)

  # ---- log-likelihood ----

  @functools.cached_property
  def _score(self):
    graphdef = self.graphdef

    def score(params, tokens_BT, segments_BT, rows_R, targets_RC, mask_RC):
      model: Transformer = nnx.merge(graphdef, params)
      h_BTD = model.backbone(tokens_BT, positions_from_segments(segments_BT), segments_BT)
      num_scored = targets_RC.shape[1]
      # Rows are left-padded: every row's predictions for its continuation lie in its last columns.
      logits_BCV = model.logits(h_BTD[:, -num_scored:]).astype(jnp.float32)
      log_probs_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
      greedy_BC = jnp.argmax(logits_BCV, axis=-1)
      columns_C = jnp.arange(num_scored)
      chosen_RC = log_probs_BCV[rows_R[:, None], columns_C[None, :], targets_RC]
      log_prob_R = jnp.sum(jnp.where(mask_RC, chosen_RC, 0.0), axis=-1)
      is_greedy_R = jnp.all((greedy_BC[rows_R] == targets_RC) | ~mask_RC, axis=-1)
      return log_prob_R, is_greedy_R

    return jax.jit(score, out_shardings=sharding.replicated(self.mesh))

  def _place(self, array: np.ndarray, batch_sharded: bool) -> jax.Array:
    """A global array from the same host array on every process; each process fills its own devices."""
    target = sharding.batch_sharding(self.mesh, array.ndim) if batch_sharded else sharding.replicated(self.mesh)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

  def _loglikelihood_tokens(
    self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, override_bs=None
  ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each (key, context ids, continuation ids), in order."""
    del disable_tqdm, override_bs
    limit = self.max_length
    rows: dict[tuple[int, ...], _Row] = {}
    for index, (_, context, continuation) in enumerate(requests):
      if not context or not continuation or len(continuation) > limit:
        raise UserError(
          f"loglikelihood request {index}: context of {len(context)} and continuation of {len(continuation)} "
          f"tokens (both must be non-empty, the continuation at most the context window of {limit})"
        )
      inputs = (context + continuation)[-(limit + 1) :][:-1]  # The HF backend's left truncation.
      rows.setdefault(tuple(inputs), _Row(inputs, [])).requests.append((index, continuation))
    ordered = sorted(rows.values(), key=lambda row: (-len(row.inputs), row.inputs))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(ordered), self.batch_size):
      batch = ordered[start : start + self.batch_size]
      for (index, _), answer in zip((r for row in batch for r in row.requests), self._score_batch(batch), strict=True):
        results[index] = answer
        key = requests[index][0]
        if key is not None:
          self.cache_hook.add_partial("loglikelihood", key, answer)
    return results

  def _score_batch(self, batch: list[_Row]) -> list[tuple[float, bool]]:
    length = min(bucket(len(batch[0].inputs)), self.max_length)  # Inputs are at most max_length long.
    num_scored = min(bucket(max(len(c) for row in batch for _, c in row.requests), minimum=1), length)
    num_requests = sum(len(row.requests) for row in batch)
    request_slots = self.batch_size * bucket(-(-num_requests // self.batch_size), minimum=1)
    inputs = [row.inputs for row in batch] + [[PAD_FILL]] * (self.batch_size - len(batch))  # Dummy rows.
    tokens_BT, segments_BT = left_pad(inputs, length)
    rows_R = np.zeros(request_slots, np.int32)
    targets_RC = np.zeros((request_slots, num_scored), np.int32)
    mask_RC = np.zeros((request_slots, num_scored), bool)
    r = 0
    for b, row in enumerate(batch):
      for _, continuation in row.requests:
        rows_R[r] = b
        targets_RC[r, num_scored - len(continuation) :] = continuation
        mask_RC[r, num_scored - len(continuation) :] = True
        r += 1
    with jax.set_mesh(self.mesh):
      log_prob_R, is_greedy_R = self._score(
        self.params,
        self._place(tokens_BT, True),
        self._place(segments_BT, True),
        self._place(rows_R, False),
        self._place(targets_RC, False),
        self._place(mask_RC, False),
      )
    log_prob_R, is_greedy_R = (np.asarray(x.addressable_data(0)) for x in (log_prob_R, is_greedy_R))
    return [(float(log_prob_R[i]), bool(is_greedy_R[i])) for i in range(num_requests)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's total log-likelihood over the harness's disjoint rolling windows of the context."""
    windows, owners = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      token_windows = lm_eval_utils.get_rolling_token_windows(
        token_list=self.tok_encode(string),
        prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for context, continuation in map(lm_eval_utils.make_disjoint_window, token_windows):
        windows.append((None, context, continuation))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
      totals[owner] += log_prob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # ---- generation ----

  def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
    unsupported = sorted(set(gen_kwargs) - SUPPORTED_GEN_KWARGS)
    if unsupported:
      raise UserError(f"generation_kwargs {unsupported} are not supported (supported: {sorted(SUPPORTED_GEN_KWARGS)})")
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=self._token_text(self.eot_token_id))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    sampling = SamplingConfig(
      max_new_tokens=int(kwargs["max_gen_toks"]),
      temperature=temperature,
      top_k=int(kwargs.get("top_k") or 0) if temperature else 0,
      top_p=float(kwargs.get("top_p") or 1.0) if temperature else 1.0,
      stop_ids=tuple(self.project_tokenizer.stop_ids),
    )
    sampling.validate()
    return sampling, until

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of each context until a stop string, a stop id or `max_gen_toks`, cut at the first stop
    string; requests with the same generation settings are decoded together, longest first."""
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
    results: list[str | None] = [None] * len(requests)
    for indices in groups.values():
      sampling, until = self._sampling(requests[indices[0]].args[1])
      room = self.max_length - sampling.max_new_tokens
      if room < 1:
        raise UserError(f"max_gen_toks={sampling.max_new_tokens} leaves no room in the context of {self.max_length}")
      # The HF backend's context: default specials, the last (context - max_gen_toks) tokens.
      prompts = {
        i: self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id] for i in indices
      }
      order = sorted(indices, key=lambda i: (-len(prompts[i]), requests[i].args[0]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start : start + self.batch_size]
        texts = self._generate([prompts[i] for i in chunk], sampling, until)
        for i, text in zip(chunk, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return results

  def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, until: list[str]) -> list[str]:
    decode = self.project_tokenizer.decode
    stops = [s for s in until if s]

    def stopped(tokens_BN: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
      return np.array([any(s in decode(tokens_BN[b, : lengths_B[b]]) for s in stops) for b in range(len(lengths_B))])

    rows = prompts + [prompts[-1]] * (self.batch_size - len(prompts))  # One compiled shape per bucket.
    self.sampler.params = self.params
    key = jax.random.fold_in(jax.random.key(self.seed), self._generate_calls)
    self._generate_calls += 1
    generation = self.sampler.generate(
      rows, sampling, key, stop_when=stopped if stops else None, check_every=STOP_CHECK_EVERY
    )
    return [postprocess_generated_text(decode(t), until, None) for t in generation.tokens[: len(prompts)]]


def load_lm(workdir: str, mesh: Mesh, step: int | None = None, **kwargs) -> JaxLM:
  """The model class over the latest (or `step`'s) checkpoint of a language-model workdir, sharded on `mesh`."""
  require_lm_eval()
  sampler, tokenizer, meta = load_sampler(workdir, mesh, step)
  name = f"{os.path.basename(os.path.abspath(workdir))}@{meta.get('step')}"
  return JaxLM(sampler.graphdef, sampler.params, mesh, tokenizer, sampler.model_cfg, name=name, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Running tasks.

# The repo's task YAML (world facts): always on the include path.
PROJECT_TASKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tasks", "world_facts", "harness")


def task_manager(task_names: Sequence[str], include_path: str | Sequence[str] = (), search_defaults: bool = True):
  """A TaskManager that knows `task_names`; the harness's ~15k built-in tasks are indexed (~12 s) only when a
  name is not in the include path or the project's tasks (and `search_defaults`). An unknown name is a
  UserError."""
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  paths = [PROJECT_TASKS] + ([include_path] if isinstance(include_path, str) else list(include_path))
  for path in paths[1:]:
    if path and not os.path.isdir(path):
      raise UserError(f"--include_path={path}: not a directory")
  paths = [p for p in paths if p]
  manager = TaskManager(include_path=paths, include_defaults=False)
  if search_defaults and set(task_names) - set(manager.all_tasks):
    manager = TaskManager(include_path=paths)
  unknown = sorted(set(task_names) - set(manager.all_tasks))
  if unknown:
    raise UserError(f"unknown lm-eval task(s) {unknown} (see `lm_eval ls tasks`, or give --include_path)")
  return manager


def parse_tasks(tasks: str) -> list[str]:
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  if not names:
    raise UserError("no task: give --tasks=T1,T2")
  return names


def quiet_harness_logs() -> None:
  """lm-eval logs every request batch and task build at INFO/WARNING; keep its errors."""
  for name in ("lm_eval", "lm-eval"):
    std_logging.getLogger(name).setLevel(std_logging.ERROR)


def run_tasks(
  lm: JaxLM,
  task_names: Sequence[str],
  *,
  manager=None,
  num_fewshot: int | None = None,
  limit: int | float | None = None,
  log_samples: bool = False,
  apply_chat_template: bool = False,
  evaluation_tracker=None,
  seed: int = 0,
  bootstrap_iters: int = 0,
) -> dict:
  """`lm_eval.simple_evaluate` with this model: the harness's results dict (and samples with `log_samples`).

  `bootstrap_iters=0` skips the harness's bootstrap standard errors (the `lm_eval` command's default: 100000).
  """
  manager = manager or task_manager(task_names)
  return lm_eval.simple_evaluate(
    model=lm,
    tasks=list(task_names),
    num_fewshot=num_fewshot,
    limit=limit,
    log_samples=log_samples,
    apply_chat_template=apply_chat_template,
    evaluation_tracker=evaluation_tracker,
    task_manager=manager,
    random_seed=seed,
    numpy_random_seed=seed,
    torch_random_seed=seed,
    fewshot_random_seed=seed,
    bootstrap_iters=bootstrap_iters,
  )


def flat_metrics(results: dict, prefix: str = "harness") -> dict[str, float]:
  """{"harness/<task>/<metric>": value} for every numeric metric (filter "none" dropped from the name, other
  filters appended: "exact_match_strict-match"); standard errors are left out."""
  flat = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      metric, filter_name = key.split(",", 1)
      name = metric if filter_name == "none" else f"{metric}_{filter_name}"
      flat[f"{prefix}/{task}/{name}"] = float(value)
  return flat
