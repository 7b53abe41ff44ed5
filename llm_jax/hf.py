"""Hugging Face checkpoints in and out, exactly: Llama 2/3, Mistral, Qwen2/2.5 and GPT-2.

    import_checkpoint(hf_dir, workdir, dtype, mesh)      an HF directory → a workdir every tool accepts
    export_checkpoint(workdir, step, export_dir, ...)    a workdir's checkpoint → an HF directory

Each family is two small tables:
- `config.json` ↔ `ModelConfig`. Every field that changes what the model computes is read; a feature the
  model does not have (sliding windows, other RoPE scalings, MoE, quantized weights, ...) is refused by name,
  never approximated.
- HF tensors ↔ our parameters (`Rule`): the names on both sides and the layout change each way. The two
  directions are inverse transposes/reshapes/splits, so import → export gives every tensor back bit for bit.
  Our layouts are the model's (`wq_DNH` is [D, N, H]); HF `nn.Linear` weights are [out, in], GPT-2's
  `Conv1D` weights [in, out] with q, k and v fused in one `c_attn`.
HF Llama checkpoints already hold q/k in the "rotate half" RoPE layout that `model.apply_rope` uses, so no
permutation is needed (Meta's original interleaved checkpoints are not read here).

Memory. Import reads one tensor at a time and places it in its sharding at once; the Orbax checkpoint is
written sharded for the mesh, at most 1 GB staged at a time. Export restores the parameters once (1 GB
staged at a time) and streams each tensor into its safetensors file (files of at most `max_shard_bytes`).
Peak host memory is the model once plus about 1 GB: measured at the llama_1b shape (2.30 GiB of bf16),
3.6 GiB either way (experiments/bench_convert.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax import modeling, tokenizer_export
from llm_jax import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.files import write_atomically
from llm_jax.model import ModelConfig

IMPORT_STAGE = "hf_import"  # The `stage` of an imported checkpoint's meta: a language model, like "pretrain".
HF_CONFIG_COPY = "hf_config.json"  # The source's config.json, kept in the workdir (export starts from it).
LLAMA_LIKE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
GPT2 = "GPT2LMHeadModel"
SUPPORTED = (*LLAMA_LIKE, GPT2)
DTYPES = ("float32", "bfloat16", "float16")
# Buffers that some GPT-2 checkpoints carry; they are constants (the causal mask), not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

Path = tuple[Any, ...]  # A parameter's key path in the pure-dict parameter tree, e.g. ("blocks", 0, "attn", ...).


# ----------------------------------------------------------------------------------------------------------
# config.json ↔ ModelConfig


class _HFConfig:
  """config.json's fields, each read once; a missing required field or a refused feature is one UserError."""

  def __init__(self, raw: dict, path: str):
    self.raw, self.path = raw, path
    self.architecture = self._architecture()

  def _architecture(self) -> str:
    archs = self.raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED:
      raise UserError(
        f"{self.path}: architectures={archs} is not supported; supported: {', '.join(SUPPORTED)} "
        "(nothing is converted approximately)"
      )
    return archs[0]

  def get(self, key: str, default=None):
    value = self.raw.get(key)
    return default if value is None else value

  def need(self, key: str):
    if self.raw.get(key) is None:
      raise UserError(f"{self.path}: field '{key}' is missing ({self.architecture})")
    return self.raw[key]

  def refuse(self, feature: str):
    raise UserError(f"{self.path}: {feature} is not supported ({self.architecture}); not converted")

  def rope(self) -> dict:
    """θ and scaling, from transformers 4's `rope_theta`/`rope_scaling` or transformers 5's `rope_parameters`."""
    params = dict(self.raw.get("rope_scaling") or {})
    params.update(self.raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", self.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
      return dict(rope_theta=float(theta))
    if kind != "llama3":
      self.refuse(f"RoPE scaling {kind!r} (only 'llama3' is)")
    if params.get("attention_factor") not in (None, 1, 1.0):
      self.refuse(f"rope attention_factor={params['attention_factor']}")
    return dict(
      rope_theta=float(theta),
      rope_scaling="llama3",
      rope_scaling_factor=float(params["factor"]),
      rope_low_freq_factor=float(params["low_freq_factor"]),
      rope_high_freq_factor=float(params["high_freq_factor"]),
      rope_original_max_len=int(params["original_max_position_embeddings"]),
    )


def model_config_from_hf(raw: dict, path: str, dtype: str) -> tuple[str, ModelConfig]:
  """(architecture, ModelConfig) of an HF config.json; `dtype` is the parameter and compute dtype."""
  hf = _HFConfig(raw, path)
  if hf.raw.get("quantization_config"):
    hf.refuse("a quantized checkpoint (quantization_config)")
  common = dict(vocab_size=int(hf.need("vocab_size")), dtype=dtype, param_dtype=dtype)
  if hf.architecture == GPT2:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
      hf.refuse(f"activation_function={act!r}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
      hf.refuse("attention scores not scaled by 1/sqrt(head_dim) (scale_attn_weights / _by_inverse_layer_idx)")
    if hf.get("add_cross_attention", False):
      hf.refuse("cross-attention")
    d = int(hf.need("n_embd"))
    return hf.architecture, ModelConfig(
      num_layers=int(hf.need("n_layer")),
      d_model=d,
      num_heads=int(hf.need("n_head")),
      num_kv_heads=int(hf.need("n_head")),
      d_ff=int(hf.get("n_inner", 4 * d)),
      max_seq_len=int(hf.need("n_positions")),
      position="learned",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      mlp="gelu",
      gelu_approximate=act != "gelu",
      use_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      **common,
    )
  if hf.get("hidden_act", "silu") != "silu":
    hf.refuse(f"hidden_act={hf.raw['hidden_act']!r} (the SwiGLU MLP uses silu)")
  if hf.architecture == "MistralForCausalLM" and hf.raw.get("sliding_window") is not None:
    hf.refuse(f"sliding-window attention (sliding_window={hf.raw['sliding_window']})")
  if hf.architecture == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
    hf.refuse("sliding-window attention (use_sliding_window=true)")
  attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
  if attention_bias != mlp_bias:
    hf.refuse(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (only both or neither)")
  d, n = int(hf.need("hidden_size")), int(hf.need("num_attention_heads"))
  return hf.architecture, ModelConfig(
    num_layers=int(hf.need("num_hidden_layers")),
    d_model=d,
    num_heads=n,
    num_kv_heads=int(hf.get("num_key_value_heads", n)),
    head_dim=int(hf.get("head_dim", d // n)),
    d_ff=int(hf.need("intermediate_size")),
    max_seq_len=int(hf.need("max_position_embeddings")),
    position="rope",
    norm="rmsnorm",
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    mlp="swiglu",
    use_bias=attention_bias,
    qkv_bias=hf.architecture == "Qwen2ForCausalLM",
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    **hf.rope(),
    **common,
  )


def architecture_for(cfg: ModelConfig) -> str:
  """The HF architecture that computes exactly what `cfg` does, or a UserError saying why none does."""
  if cfg.position == "learned":
    if cfg.norm != "layernorm" or cfg.mlp != "gelu" or cfg.qkv_bias and not cfg.use_bias:
      raise UserError(
        f"model with learned positions, {cfg.norm}, {cfg.mlp}: GPT-2 (the only learned-position family) "
        "needs layernorm and gelu"
      )
    if cfg.num_kv_heads != cfg.num_heads or cfg.resolved_head_dim * cfg.num_heads != cfg.d_model:
      raise UserError("GPT-2 export needs num_kv_heads == num_heads and head_dim == d_model / num_heads")
    return GPT2
  if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
    raise UserError(f"a RoPE model with {cfg.norm} and {cfg.mlp}: Llama-family exports need rmsnorm and swiglu")
  return "Qwen2ForCausalLM" if cfg.qkv_bias and not cfg.use_bias else "LlamaForCausalLM"


def hf_config_from_model(cfg: ModelConfig, architecture: str, tokenizer, base: dict | None = None) -> dict:
  """config.json for `cfg`; fields of `base` (an imported model's own config.json) are kept unless derived."""
  out = dict(base or {})
  out.pop("rope_parameters", None)  # Rewritten below as rope_theta/rope_scaling, which both majors read.
  out.update(
    architectures=[architecture],
    vocab_size=cfg.vocab_size,
    tie_word_embeddings=cfg.tie_embeddings,
    torch_dtype=cfg.param_dtype,
    bos_token_id=tokenizer.bos_id,
    eos_token_id=_one_or_list(tokenizer.stop_ids),
  )
  if architecture == GPT2:
    out.update(
      model_type="gpt2",
      n_embd=cfg.d_model,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.d_ff,
      n_positions=cfg.max_seq_len,
      n_ctx=cfg.max_seq_len,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function="gelu_new" if cfg.gelu_approximate else "gelu",
      scale_attn_weights=True,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
    )
    return out
  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = dict(
      rope_type="llama3",
      factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  out.update(
    model_type=LLAMA_LIKE[architecture],
    hidden_size=cfg.d_model,
    intermediate_size=cfg.d_ff,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.resolved_head_dim,
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_theta,
    rope_scaling=rope_scaling,
    hidden_act="silu",
    attention_dropout=0.0,
  )
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
  if architecture in ("MistralForCausalLM", "Qwen2ForCausalLM"):
    out.update(sliding_window=None, use_sliding_window=False)
  return out


def _one_or_list(ids) -> int | list[int] | None:
  ids = list(ids)
  return None if not ids else ids[0] if len(ids) == 1 else ids


# ----------------------------------------------------------------------------------------------------------
# Tensors: HF names ↔ our parameter paths


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF tensors `hf` ↔ our parameters `ours`; `to_ours(*hf arrays)` and `to_hf(*our arrays)` are inverses."""

  hf: tuple[str, ...]
  ours: tuple[Path, ...]
  to_ours: Callable[..., tuple[np.ndarray, ...]]
  to_hf: Callable[..., tuple[np.ndarray, ...]]


def _same(*xs):
  return xs


def _transposed(x):
  return (np.ascontiguousarray(x.T),)


def _copy(hf: str, ours: Path) -> Rule:
  return Rule((hf,), (ours,), _same, _same)


def _linear(hf: str, ours: Path, our_shape: tuple[int, ...]) -> Rule:
  """An nn.Linear weight [out, in] ↔ ours [in, *out] (the output axis split as the model's layout has it)."""
  fan_in = our_shape[0]
  return Rule(
    (hf,),
    (ours,),
    lambda w: (np.ascontiguousarray(w.T).reshape(our_shape),),
    lambda w: (np.ascontiguousarray(w.reshape(fan_in, -1).T),),
  )


def tensor_rules(cfg: ModelConfig, architecture: str, prefix: str = "") -> list[Rule]:
  """Every tensor of an `architecture` checkpoint of `cfg`, in file order. GPT-2 names may carry `prefix`
  ("transformer." in checkpoints saved by transformers, "" in the original OpenAI ones)."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  rules: list[Rule] = []
  if architecture == GPT2:
    p = prefix
    rules += [_copy(f"{p}wte.weight", ("embed", "embedding")), _copy(f"{p}wpe.weight", ("pos_embed", "embedding"))]
    split_qkv = lambda w: tuple(x.reshape(*w.shape[:-1], n, h) for x in np.split(w, 3, axis=-1))
    fuse_qkv = lambda *xs: (np.concatenate([x.reshape(*x.shape[:-2], n * h) for x in xs], axis=-1),)
    for i in range(cfg.num_layers):
      hp, ours = f"{p}h.{i}.", ("blocks", i)
      rules += [
        _copy(f"{hp}ln_1.weight", (*ours, "attn_norm", "scale")),
        _copy(f"{hp}ln_1.bias", (*ours, "attn_norm", "bias")),
        Rule(
          (f"{hp}attn.c_attn.weight",),
          tuple((*ours, "attn", w) for w in ("wq_DNH", "wk_DKH", "wv_DKH")),
          split_qkv,
          fuse_qkv,
        ),
        Rule(
          (f"{hp}attn.c_attn.bias",),
          tuple((*ours, "attn", b) for b in ("bias_q_NH", "bias_k_KH", "bias_v_KH")),
          split_qkv,
          fuse_qkv,
        ),
        Rule(
          (f"{hp}attn.c_proj.weight",),
          ((*ours, "attn", "wo_NHD"),),
          lambda w: (w.reshape(n, h, d),),
          lambda w: (w.reshape(n * h, d),),
        ),
        _copy(f"{hp}attn.c_proj.bias", (*ours, "attn", "bias_o_D")),
        _copy(f"{hp}ln_2.weight", (*ours, "mlp_norm", "scale")),
        _copy(f"{hp}ln_2.bias", (*ours, "mlp_norm", "bias")),
        _copy(f"{hp}mlp.c_fc.weight", (*ours, "mlp", "w_in_DF")),
        _copy(f"{hp}mlp.c_fc.bias", (*ours, "mlp", "bias_in_F")),
        _copy(f"{hp}mlp.c_proj.weight", (*ours, "mlp", "w_out_FD")),
        _copy(f"{hp}mlp.c_proj.bias", (*ours, "mlp", "bias_out_D")),
      ]
    rules += [_copy(f"{p}ln_f.weight", ("final_norm", "scale")), _copy(f"{p}ln_f.bias", ("final_norm", "bias"))]
    if not cfg.tie_embeddings:
      rules.append(Rule(("lm_head.weight",), (("lm_head_DV",),), _transposed, _transposed))
    return rules

  rules.append(_copy("model.embed_tokens.weight", ("embed", "embedding")))
  bias = lambda name, path, shape: Rule((name,), (path,), lambda x: (x.reshape(shape),), lambda x: (x.reshape(-1),))
  for i in range(cfg.num_layers):
    hp, ours = f"model.layers.{i}.", ("blocks", i)
    attn, mlp = (*ours, "attn"), (*ours, "mlp")
    rules += [
      _copy(f"{hp}input_layernorm.weight", (*ours, "attn_norm", "scale")),
      _linear(f"{hp}self_attn.q_proj.weight", (*attn, "wq_DNH"), (d, n, h)),
      _linear(f"{hp}self_attn.k_proj.weight", (*attn, "wk_DKH"), (d, k, h)),
      _linear(f"{hp}self_attn.v_proj.weight", (*attn, "wv_DKH"), (d, k, h)),
    ]
    if cfg.use_bias or cfg.qkv_bias:
      rules += [
        bias(f"{hp}self_attn.q_proj.bias", (*attn, "bias_q_NH"), (n, h)),
        bias(f"{hp}self_attn.k_proj.bias", (*attn, "bias_k_KH"), (k, h)),
        bias(f"{hp}self_attn.v_proj.bias", (*attn, "bias_v_KH"), (k, h)),
      ]
    rules.append(
      Rule(
        (f"{hp}self_attn.o_proj.weight",),
        ((*attn, "wo_NHD"),),
        lambda w: (np.ascontiguousarray(w.T).reshape(n, h, d),),
        lambda w: (np.ascontiguousarray(w.reshape(n * h, d).T),),
      )
    )
    rules += [
      _copy(f"{hp}post_attention_layernorm.weight", (*ours, "mlp_norm", "scale")),
      Rule((f"{hp}mlp.gate_proj.weight",), ((*mlp, "w_gate_DF"),), _transposed, _transposed),
      Rule((f"{hp}mlp.up_proj.weight",), ((*mlp, "w_in_DF"),), _transposed, _transposed),
      Rule((f"{hp}mlp.down_proj.weight",), ((*mlp, "w_out_FD"),), _transposed, _transposed),
    ]
    if cfg.use_bias:
      rules += [
        _copy(f"{hp}self_attn.o_proj.bias", (*attn, "bias_o_D")),
        _copy(f"{hp}mlp.gate_proj.bias", (*mlp, "bias_gate_F")),
        _copy(f"{hp}mlp.up_proj.bias", (*mlp, "bias_in_F")),
        _copy(f"{hp}mlp.down_proj.bias", (*mlp, "bias_out_D")),
      ]
  rules.append(_copy("model.norm.weight", ("final_norm", "scale")))
  if not cfg.tie_embeddings:
    rules.append(Rule(("lm_head.weight",), (("lm_head_DV",),), _transposed, _transposed))
  return rules


# ----------------------------------------------------------------------------------------------------------
# Reading an HF directory


class SafetensorsReader:
  """The tensors of `model.safetensors` or of the shards an index names, read one at a time.

  Each read opens and closes its file: safetensors maps a file and the pages a read touches stay in this
  process's memory while the file is open, which for a checkpoint read whole is the model a second time
  (measured reading llama_1b's 2.3 GiB file into memory: peak RSS 4.8 GiB with one open file, 2.5 opened per
  tensor).
  """

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index_path):
      weight_map = _read_json(index_path).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path}: field 'weight_map' is missing or empty")
      self.file_of = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    elif os.path.exists(single):
      with self._open(single) as f:
        self.file_of = dict.fromkeys(f.keys(), single)
    else:
      found = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
      hint = f" (found {', '.join(found)}: pickle-based or other formats are not read)" if found else ""
      raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")

  @staticmethod
  def _open(path: str):
    if not os.path.exists(path):
      raise UserError(f"{path}: missing (named by the checkpoint's index)")
    try:
      return safetensors.safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError and OSError)
      raise UserError(f"{path}: not a readable safetensors file ({e})") from None

  def names(self) -> set[str]:
    return set(self.file_of)

  def read(self, name: str) -> np.ndarray:
    if name not in self.file_of:
      raise UserError(f"{self.hf_dir}: tensor '{name}' is missing from the checkpoint")
    path = self.file_of[name]
    with self._open(path) as f:
      try:
        return f.get_tensor(name)
      except Exception as e:  # noqa: BLE001  (a truncated file fails here, in safetensors' own words)
        raise UserError(f"{path}: tensor '{name}' does not read ({e})") from None


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: not found") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable JSON ({e})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object")
  return data


def _stored_dtype(reader: SafetensorsReader, rules: list[Rule]) -> str:
  """The checkpoint's floating dtype (its first tensor's), as a ModelConfig dtype string."""
  dtype = str(reader.read(rules[0].hf[0]).dtype)
  return dtype if dtype in DTYPES else "float32"


# ----------------------------------------------------------------------------------------------------------
# Import


def read_params(hf_dir: str, mesh: Mesh, dtype: str = "") -> tuple[str, ModelConfig, dict, dict]:
  """(architecture, ModelConfig, config.json, parameters placed on `mesh`) of an HF directory.

  `dtype`: the parameters' dtype; "" keeps the checkpoint's own.
  """
  if not os.path.isdir(hf_dir):
    raise UserError(f"--hf_dir={hf_dir}: not a directory")
  if dtype and dtype not in DTYPES:
    raise UserError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
  config_path = os.path.join(hf_dir, "config.json")
  raw = _read_json(config_path)
  architecture, cfg = model_config_from_hf(raw, config_path, dtype or "float32")
  reader = SafetensorsReader(hf_dir)
  prefix = "transformer." if architecture == GPT2 and "transformer.wte.weight" in reader.names() else ""
  rules = tensor_rules(cfg, architecture, prefix)
  _check_tensor_names(reader, rules, cfg)
  if not dtype:
    dtype = _stored_dtype(reader, rules)
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)

  spec = modeling.model_spec(modeling.lm_factory(cfg), mesh)
  shardings, abstract = _flatten(spec.param_shardings), _flatten(spec.abstract_params)
  params: dict[Path, jax.Array] = {}
  progress = _Progress("import", len(rules))
  for rule in rules:
    hf_arrays = [reader.read(name) for name in rule.hf]
    for path, value in zip(rule.ours, rule.to_ours(*hf_arrays)):
      expected = abstract[path]
      if value.shape != expected.shape:
        raise UserError(
          f"{hf_dir}: tensor {rule.hf[0]} has shape {hf_arrays[0].shape}, which does not fit "
          f"{'.'.join(map(str, path))} {expected.shape} of the model config.json describes"
        )
      params[path] = jax.device_put(value.astype(expected.dtype), shardings[path])
    progress.step(sum(a.nbytes for a in hf_arrays))
  missing = set(abstract) - set(params)
  if missing:  # A table bug, not a user error: every parameter must come from some tensor.
    raise AssertionError(f"parameters without a source tensor: {sorted(missing)}")
  progress.done()
  return architecture, cfg, raw, _unflatten(params)


def import_checkpoint(hf_dir: str, workdir: str, mesh: Mesh, dtype: str = "") -> ModelConfig:
  """Writes a workdir (config.json, tokenizer, checkpoint 0 of stage `hf_import`) from an HF directory.

  Refuses a workdir that already holds a config or checkpoints: nothing is overwritten.
  """
  _check_new_workdir(workdir)
  tokenizer = tokenizer_lib.HFTokenizer.from_hf_dir(hf_dir) if os.path.isdir(hf_dir) else None
  architecture, cfg, raw, params = read_params(hf_dir, mesh, dtype)
  os.makedirs(workdir, exist_ok=True)
  record = {
    "config": {"stage": IMPORT_STAGE, "hf_dir": os.path.abspath(hf_dir), "hf_architecture": architecture},
    "model": dataclasses.asdict(cfg),
  }
  if jax.process_index() == 0:
    write_atomically(os.path.join(workdir, modeling.WORKDIR_CONFIG), json.dumps(record, indent=2, sort_keys=True))
    write_atomically(os.path.join(workdir, HF_CONFIG_COPY), json.dumps(raw, indent=2, sort_keys=True))
    tokenizer.save(workdir)
  meta = {"step": 0, "stage": IMPORT_STAGE, "model": dataclasses.asdict(cfg), "hf_dir": os.path.abspath(hf_dir)}
  checkpointer = ckpt_lib.Checkpointer(workdir, params_only_gb=1)
  try:
    checkpointer.save(0, params, None, None, meta)
    checkpointer.wait()
  finally:
    checkpointer.close()
  return cfg


def _check_tensor_names(reader: SafetensorsReader, rules: list[Rule], cfg: ModelConfig) -> None:
  """Every tensor the config implies is present, and none is left over (a feature we would silently drop)."""
  expected = {name for rule in rules for name in rule.hf}
  missing = sorted(expected - reader.names())
  if missing:
    raise UserError(f"{reader.hf_dir}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
  unused = sorted(
    name
    for name in reader.names() - expected
    if not name.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and name == "lm_head.weight")
  )
  if unused:
    raise UserError(
      f"{reader.hf_dir}: tensor '{unused[0]}' ({len(unused)} in all) has no place in the model config.json "
      "describes: an unsupported feature, not converted"
    )


def _check_new_workdir(workdir: str) -> None:
  if not workdir:
    raise UserError("--workdir: give a directory")
  for existing in (modeling.WORKDIR_CONFIG, ckpt_lib.CHECKPOINT_DIR):
    if os.path.exists(os.path.join(workdir, existing)):
      raise UserError(f"--workdir={workdir} already holds {existing}: choose a new directory (nothing is overwritten)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: exists and is not a directory")


# ----------------------------------------------------------------------------------------------------------
# Export


def export_checkpoint(
  workdir: str, step: int | None, export_dir: str, mesh: Mesh, max_shard_bytes: int = 5 << 30
) -> str:
  """Writes `export_dir` (config.json, safetensors, generation_config.json, tokenizer files) from a workdir.

  Written under `export_dir.partial` and renamed when complete: a failed export leaves no half directory
  under the final name. Refuses an existing `export_dir`.
  """
  if os.path.exists(export_dir):
    raise UserError(f"--export_dir={export_dir} exists: choose a new directory (nothing is overwritten)")
  meta = modeling.check_language_model(workdir, step)
  cfg = modeling.read_model_config(workdir)
  base_path = os.path.join(workdir, HF_CONFIG_COPY)
  base = _read_json(base_path) if os.path.exists(base_path) else None
  architecture = architecture_for(cfg)
  if base and architecture == "LlamaForCausalLM" and base.get("architectures") == ["MistralForCausalLM"]:
    architecture = "MistralForCausalLM"  # The same computation; keep the name the model came with.
  tokenizer = tokenizer_lib.load_tokenizer(workdir)
  spec = modeling.model_spec(modeling.lm_factory(cfg), mesh)
  # A LoRA workdir is exported merged (W + scale·A·B on its base): a plain model for any consumer.
  params, meta = modeling.load_params(workdir, spec, mesh, meta["step"], params_only_gb=1)
  flat = _flatten(params)
  if architecture == GPT2 and not cfg.use_bias:
    flat = _with_zero_biases(cfg, flat)  # GPT-2 always has biases; zeros compute exactly what ours does.
  rules = tensor_rules(cfg, architecture, prefix="transformer.")

  partial = export_dir.rstrip("/") + ".partial"
  if os.path.exists(partial):
    shutil.rmtree(partial)  # Our own leftover from an export that did not finish.
  os.makedirs(partial)
  progress = _Progress("export", len(rules))
  shards = list(_plan_shards(rules, flat, max_shard_bytes))
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    converted = lambda rule: rule.to_hf(*(np.asarray(jax.device_get(flat[path])) for path in rule.ours))
    written = _write_safetensors(os.path.join(partial, name), shard, converted, progress)
    weight_map.update(dict.fromkeys(written, name))
    total += sum(written.values())
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(partial, "model.safetensors.index.json"), index)
  _write_json(os.path.join(partial, "config.json"), hf_config_from_model(cfg, architecture, tokenizer, base))
  generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": _one_or_list(tokenizer.stop_ids)}
  if tokenizer.pad_id is not None:
    generation["pad_token_id"] = tokenizer.pad_id
  _write_json(os.path.join(partial, "generation_config.json"), generation)
  tokenizer_export.export_hf_tokenizer(tokenizer, partial)
  os.rename(partial, export_dir)
  progress.done()
  return export_dir


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int32": "I32"}


def _write_safetensors(path: str, rules: list[Rule], converted, progress: _Progress) -> dict[str, int]:
  """Writes one safetensors file of the rules' HF tensors, one tensor in memory at a time; returns their sizes.

  safetensors' own writer (`save_file`) takes every tensor of the file at once, i.e. the model a second time
  for a single-file export. The format is an 8-byte little-endian header length, a JSON header (dtype, shape
  and byte range of each tensor) padded to 8 bytes, then the bytes in that order; so a first pass converts
  each tensor for its shape (and drops it), the second converts it again and writes it.
  """
  header, sizes, offset = {"__metadata__": {"format": "pt"}}, {}, 0
  for rule in rules:
    for name, array in zip(rule.hf, converted(rule)):
      header[name] = dict(
        dtype=_SAFETENSORS_DTYPES[array.dtype.name],
        shape=list(array.shape),
        data_offsets=[offset, offset + array.nbytes],
      )
      sizes[name], offset = array.nbytes, offset + array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little") + encoded)
    for rule in rules:
      arrays = converted(rule)
      for array in arrays:
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
      progress.step(sum(a.nbytes for a in arrays))
  return sizes


def _plan_shards(rules: list[Rule], flat: dict, max_shard_bytes: int) -> Iterator[list[Rule]]:
  """Rules grouped in file order into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
  shard, size = [], 0
  for rule in rules:
    nbytes = sum(math.prod(flat[p].shape) * flat[p].dtype.itemsize for p in rule.ours)
    if shard and size + nbytes > max_shard_bytes:
      yield shard
      shard, size = [], 0
    shard.append(rule)
    size += nbytes
  if shard:
    yield shard


def _with_zero_biases(cfg: ModelConfig, flat: dict) -> dict:
  with_bias = dataclasses.replace(cfg, use_bias=True)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: modeling.build_model(with_bias, nnx.Rngs(0)))))
  zeros = {p: np.zeros(a.shape, a.dtype) for p, a in _flatten(abstract).items() if p not in flat}
  return {**flat, **zeros}


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _unflatten(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class _Progress:
  """A line every few seconds: tensors done, MB, MB/s, ETA (a 7B checkpoint takes minutes); one at the end."""

  def __init__(self, what: str, total: int, every_s: float = 5.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.count, self.bytes, self.start = 0, 0, time.perf_counter()
    self.last = self.start

  def step(self, nbytes: int) -> None:
    self.count += 1
    self.bytes += nbytes
    now = time.perf_counter()
    if now - self.last >= self.every_s and self.count < self.total:
      self.last, elapsed = now, now - self.start
      print(
        f"{self.what}: {self.count}/{self.total} tensors, {self.bytes / 1e6:.0f} MB, "
        f"{self.bytes / 1e6 / elapsed:.0f} MB/s, ETA {elapsed / self.count * (self.total - self.count):.0f}s",
        file=sys.stderr,
        flush=True,
      )

  def done(self) -> None:
    elapsed = time.perf_counter() - self.start
    print(f"{self.what}: {self.total} tensors, {self.bytes / 1e6:.0f} MB in {elapsed:.1f}s", file=sys.stderr)
