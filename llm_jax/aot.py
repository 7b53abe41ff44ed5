"""Ahead-of-time compilation for TPU pod topologies, on a machine without TPUs.

`jax.experimental.topologies.get_topology_desc("v5p:4x4x4")` (with the `libtpu` package installed: `pip install
-e ".[tpu]"`) describes the devices of a TPU slice; a mesh over those devices lets XLA compile — not run — the
real sharded steps for that slice. The executables' memory analysis then says, per chip, how many bytes the
arguments (parameters, optimizer state, batch), outputs and temporaries (activations, gradients, collectives'
buffers) take, against the chip's HBM. Nothing is allocated: every input is a `jax.ShapeDtypeStruct` that
carries its target sharding.

Compiled here:
  train    `loop.make_train_step` with the stage's loss (pretraining's next-token loss), exactly the function
           `loop.train` runs, for the config's mesh, batch, sequence length, grad_accum and model (remat, scan).
           With `lora` (a model.LoraConfig): the LoRA step, adapters trained on a frozen base (SFT's step: SFT
           and pretraining share the next-token loss).
  prefill  `Sampler.prefill` for `decode_batch` prompts of `prompt_len` tokens into a `cache_len` KV cache.
  decode   `Sampler.decode`: the while_loop that samples up to `cache_len - prompt_len` tokens.

Per-device "peak" = arguments + outputs − aliased (donated buffers reused for outputs) + temporaries; that is
what must fit in HBM (XLA's own estimate; the runtime adds a little for itself, so aim below ~95 %).

FLOPs: XLA's count for the compiled train step (`compiled.cost_analysis()["flops"]`, per device; it cannot see
inside Pallas kernels, so with splash the attention matmuls are missing from it, and it counts a while loop's
body once, so a scanned layer stack counts one layer) beside the model estimate
`ModelConfig.train_flops_per_token(seq_len) × tokens per step` (6·N + 12·layers·heads·head_dim·seq, no causal
discount), and the step time that estimate gives at 40 % and 50 % MFU of the chips' data-sheet bf16 peak.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import ml_collections
from absl import logging

from llm_jax import config as config_lib
from llm_jax.errors import UserError

GiB = 1024**3

# HBM per chip (data sheets). Keys: the topology name's prefix (before ':') and `device_kind` strings.
HBM_GIB = {
  "v4": 32,
  "TPU v4": 32,
  "v5p": 95,
  "TPU v5": 95,
  "TPU v5p": 95,
  "v5e": 16,
  "v5litepod": 16,
  "TPU v5 lite": 16,
  "TPU v5e": 16,
  "v6e": 32,
  "TPU v6 lite": 32,
  "TPU v6e": 32,
}


@dataclasses.dataclass
class StepReport:
  name: str
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  note: str = ""  # Why it does not fit when the compiler itself refused (out of HBM).
  error: str = ""  # The step did not compile for another reason (a bug): the message.
  xla_flops: float = 0.0  # Per device, XLA's cost analysis of the compiled step (0: not available).

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass
class Report:
  topology: str
  device_kind: str
  num_devices: int
  num_processes: int
  hbm_bytes: int
  mesh: dict[str, int]
  model: str
  num_params: int
  description: str
  steps: list[StepReport]
  model_flops_per_step: float = 0.0  # Global train step: ModelConfig.train_flops_per_token × tokens.
  peak_flops_per_device: float | None = None  # Data-sheet bf16 peak of the device kind (llm_jax.perf).

  def fits(self, step: StepReport) -> bool:
    return not step.note and not step.error and step.peak_bytes <= self.hbm_bytes

  @property
  def errors(self) -> list[StepReport]:
    return [s for s in self.steps if s.error]

  def table(self) -> str:
    unit, scale = ("GiB", GiB) if max(s.peak_bytes for s in self.steps) >= GiB else ("MiB", 1024**2)
    lines = [
      f"topology {self.topology}: {self.num_devices} devices ({self.device_kind}) on {self.num_processes} "
      f"hosts, {self.hbm_bytes / GiB:.1f} GiB HBM per device",
      f"model {self.model}: {_count(self.num_params)} parameters; mesh {self.mesh}; {self.description}",
      f"per device ({unit}):",
      f"{'step':<8} {'compile s':>9} {'arguments':>10} {'outputs':>9} {'aliased':>9} {'temp':>9} "
      f"{'peak':>9} {'of HBM':>7}  fits",
    ]
    for s in self.steps:
      if s.error:
        lines.append(f"{s.name:<8} did not compile: {s.error}")
        continue
      lines.append(
        f"{s.name:<8} {s.compile_seconds:>9.1f} {s.argument_bytes / scale:>10.2f} "
        f"{s.output_bytes / scale:>9.2f} {s.alias_bytes / scale:>9.2f} {s.temp_bytes / scale:>9.2f} "
        f"{s.peak_bytes / scale:>9.2f}"
        f" {100 * s.peak_bytes / self.hbm_bytes:>6.0f}%  {'yes' if self.fits(s) else 'NO'}"
        + (f"  ({s.note})" if s.note else "")
      )
    worst = max(self.steps, key=lambda s: s.peak_bytes)
    if self.errors:
      lines.append(f"ERROR: {', '.join(s.name for s in self.errors)} did not compile (see above)")
    elif all(self.fits(s) for s in self.steps):
      lines.append(
        f"FITS: every step fits in {self.hbm_bytes / GiB:.0f} GiB per device (largest: {worst.name}, "
        f"{worst.peak_bytes / GiB:.2f} GiB)"
      )
    else:
      over = [s.name for s in self.steps if not self.fits(s)]
      lines.append(
        f"DOES NOT FIT: {', '.join(over)} {'needs' if len(over) == 1 else 'need'} more than "
        f"{self.hbm_bytes / GiB:.0f} GiB per device "
        f"(largest: {worst.name}, {worst.peak_bytes / GiB:.2f} GiB)"
      )
    lines += self.flops_lines()
    return "\n".join(lines)

  def flops_lines(self) -> list[str]:
    """The train step's FLOPs (XLA's count and the model estimate) and its step time at 40 % and 50 % MFU."""
    train = next((s for s in self.steps if s.name == "train" and not s.error and not s.note), None)
    if train is None or not self.model_flops_per_step:
      return []
    xla = (
      f"XLA {train.xla_flops:.3g} per device × {self.num_devices} = {train.xla_flops * self.num_devices:.3g} "
      "(without FLOPs inside Pallas kernels: splash declares none)"
      if train.xla_flops
      else "XLA: no cost analysis"
    )
    lines = [
      f"train FLOPs per step: {xla}; model (6·N + 12·layers·N_heads·H·seq per token) {self.model_flops_per_step:.3g}"
    ]
    if self.peak_flops_per_device:
      at = lambda mfu: self.model_flops_per_step / (mfu * self.peak_flops_per_device * self.num_devices)
      lines.append(
        f"expected step time at 40 % / 50 % MFU: {at(0.4):.3g} s / {at(0.5):.3g} s "
        f"({self.peak_flops_per_device / 1e12:.0f} TFLOP/s bf16 per device × {self.num_devices})"
      )
    return lines


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _count(n: int) -> str:
  return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """The devices of a TPU slice named like "v5p:2x2x2" or "v5e:4x4" (needs the libtpu package)."""
  # No TPU here: keep libtpu from waiting for the lockfile other jax processes hold, and from printing warnings
  # about the metadata server of a TPU VM (its accelerator type is not the topology's; it only silences them).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  if ":" not in topology:
    raise UserError(f"topology={topology!r}: expected e.g. 'v5p:4x4x4', 'v5e:4x4', 'v4:2x2x2' or 'v6e:8x8'")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise UserError("ahead-of-time compilation for TPU needs the libtpu package: pip install -e '.[tpu]'") from None
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices)
  except Exception as e:  # libtpu reports unknown names and shapes as runtime errors.
    raise UserError(f"topology={topology!r}: {_first_line(e) or type(e).__name__}") from None
  return list(desc.devices)


def hbm_bytes_for(topology: str, device_kind: str, num_devices: int, hbm_gib: float = 0) -> int:
  """HBM per device: the chip's, split between devices where a chip shows as several (v4: 2 per chip)."""
  if hbm_gib:
    return int(hbm_gib * GiB)
  for key in (topology.split(":")[0], device_kind):
    if key in HBM_GIB:
      try:
        chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
      except ValueError:
        chips = num_devices
      return HBM_GIB[key] * GiB * chips // max(num_devices, chips)
  raise UserError(f"HBM per chip of {device_kind!r} ({topology}) unknown: pass --hbm_gib")


def _compile(name: str, lowered_fn) -> tuple[Any, StepReport]:
  """Compiles; a step the TPU compiler rejects for lack of HBM becomes a report row (compiled = None)."""
  start = time.perf_counter()
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: ... temporaries (98.16G) exceeds ...
    found = re.search(r"RESOURCE_EXHAUSTED.*?required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if not found:
      raise
    temp = float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024
    return None, StepReport(
      name, time.perf_counter() - start, 0, 0, 0, int(temp), 0, note="compiler: out of HBM (temporaries alone)"
    )
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  try:
    cost = compiled.cost_analysis()  # A dict; a list of one dict per executable in older jax versions.
  except NotImplementedError:
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return compiled, StepReport(
    name,
    seconds,
    int(m.argument_size_in_bytes),
    int(m.output_size_in_bytes),
    int(m.alias_size_in_bytes),
    int(m.temp_size_in_bytes),
    int(m.generated_code_size_in_bytes),
    xla_flops=float((cost or {}).get("flops", 0.0)),
  )


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *, devices=None, **kwargs) -> Report:
  """Compiles the train step (and prefill + decode) of a pretraining `config` for a TPU `topology`.

  `devices` replaces the topology's devices (tests pass CPU devices to exercise the code without libtpu).
  Keyword arguments: num_slices, hbm_gib, train, decode, decode_batch, prompt_len, cache_len, lora.
  """
  import jax

  if devices is not None:
    return _compile_all(config, topology, devices, **kwargs)
  # Executables compiled for a topology (no client) cannot be read back from the persistent compilation cache
  # ("PjRtCompiler must be constructed with a Client"): don't fill the cache with them.
  # (jax decides once per process whether to use the cache: reset that decision on the way in and out.)
  from jax.experimental.compilation_cache import compilation_cache

  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    return _compile_all(config, topology, None, **kwargs)
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


def _compile_all(
  config: ml_collections.ConfigDict,
  topology: str,
  devices,
  num_slices: int = 1,
  hbm_gib: float = 0,
  train: bool = True,
  decode: bool = True,
  decode_batch: int = 0,
  prompt_len: int = 0,
  cache_len: int = 0,
  lora=None,
) -> Report:
  """The work of `compile_for_topology`. Decoding defaults: `decode_batch` = config.batch_size, `cache_len` =
  config.seq_len, `prompt_len` = half of it."""
  import jax
  import jax.numpy as jnp

  from llm_jax import attention_kernels, perf, sharding
  from llm_jax.modeling import lm_factory, model_spec

  if not (train or decode):
    raise UserError("nothing to compile: --train and --decode are both off")
  devices = topology_devices(topology, num_slices) if devices is None else list(devices)
  num_processes = len({d.process_index for d in devices})
  model_cfg = config_lib.resolve_model_config(config)
  config_lib.validate_training_config(config, len(devices), num_processes, model_cfg=model_cfg)
  device_kind = devices[0].device_kind
  hbm = hbm_bytes_for(topology, device_kind, len(devices), hbm_gib)
  decode_batch = decode_batch or config.batch_size
  cache_len = cache_len or config.seq_len
  prompt_len = prompt_len or max(cache_len // 2, 1)
  if decode:
    if not 0 < prompt_len < cache_len <= model_cfg.max_seq_len:
      raise UserError(
        f"need 0 < prompt_len={prompt_len} < cache_len={cache_len} <= model.max_seq_len={model_cfg.max_seq_len}"
      )
  mesh = sharding.mesh_from_config(config.mesh, devices)
  if decode and decode_batch % sharding.num_batch_shards(mesh):
    raise UserError(
      f"decode_batch={decode_batch} must be divisible by mesh.data*mesh.fsdp = {sharding.num_batch_shards(mesh)}"
    )

  state = model_spec(lm_factory(model_cfg), mesh)
  trained = model_spec(lm_factory(model_cfg, lora), mesh) if lora else state  # LoRA: adapters on a frozen base.
  step_number = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  steps = [_compile_train_step(config, trained, mesh, step_number)] if train else []
  if decode:
    steps += _compile_decoding(state, model_cfg, mesh, decode_batch, prompt_len, cache_len, step_number)

  tokens_per_device = config.batch_size * config.seq_len // len(devices)
  description = (
    f"train batch {config.batch_size} × {config.seq_len} tokens ({tokens_per_device:,} per device), "
    f"grad_accum {config.grad_accum}, remat {model_cfg.remat}, scan_layers {model_cfg.scan_layers}, attention "
    f"{attention_kernels.resolve(model_cfg.attention_impl, model_cfg.dtype, devices[0].platform)}, "
    f"{model_cfg.dtype} compute / {model_cfg.param_dtype} params"
  )
  if lora:
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(trained.split(trained.abstract_params)[0]))
    description += f"; LoRA rank {lora.rank} on {','.join(lora.targets)} ({_count(adapters)} trained)"
  if decode:
    description += f"; decode {decode_batch} × ({prompt_len} prompt + {cache_len - prompt_len} new)"
  return Report(
    topology=topology,
    device_kind=device_kind,
    num_devices=len(devices),
    num_processes=num_processes,
    hbm_bytes=hbm,
    mesh=dict(mesh.shape),
    model=config.model,
    num_params=model_cfg.num_params(),
    description=description,
    steps=steps,
    # LoRA skips the frozen weights' gradients: 6·N does not describe it.
    model_flops_per_step=0.0
    if lora or not train
    else model_cfg.train_flops_per_token(config.seq_len) * config.batch_size * config.seq_len,
    peak_flops_per_device=perf.datasheet_peak_flops(device_kind),
  )


def _compile_train_step(config: ml_collections.ConfigDict, state, mesh, step_number) -> StepReport:
  """Compiles `loop.make_train_step` with pretraining's loss: exactly the step `loop.train` runs."""
  import jax

  from llm_jax import sharding
  from llm_jax.data import text
  from llm_jax.sequences import next_token_loss
  from llm_jax.train import loop

  example = text.pack([[8, 9, 10]], 4, bos_id=None, eos_id=0)  # The row fields and dtypes pretraining feeds the step.
  shape = (config.batch_size, config.seq_len)
  batch_shardings = {k: sharding.token_sharding(mesh, shape) for k in example}  # Tokens split on "sequence".
  abstract_batch = {k: jax.ShapeDtypeStruct(shape, v.dtype, sharding=batch_shardings[k]) for k, v in example.items()}
  optimization = loop.make_optimization(config, state, next_token_loss, mesh, batch_shardings)
  trainable, frozen = state.split(state.abstract_params)  # LoRA: the base is a separate, non-donated argument.
  _, report = _compile(
    "train",
    lambda: optimization.train_step.lower(
      trainable, optimization.abstract_opt_state, abstract_batch, step_number, frozen
    ),
  )
  return report


def _compile_decoding(
  state, model_cfg, mesh, decode_batch: int, prompt_len: int, cache_len: int, step_number
) -> list[StepReport]:
  """Compiles `Sampler.prefill` and `Sampler.decode` (the decode loop takes the prefill's output shardings)."""
  import jax
  import jax.numpy as jnp

  from llm_jax import sharding
  from llm_jax.inference.sampler import Sampler, SamplingConfig

  steps = []
  sampler = Sampler(state.graphdef, state.abstract_params, mesh, model_cfg=model_cfg)
  prefill = jax.jit(sampler.prefill, static_argnames=("cache_length",))
  prompts = jax.ShapeDtypeStruct((decode_batch, prompt_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
  try:
    with jax.set_mesh(mesh):  # As Sampler.generate traces it: the attention kernel follows the mesh's platform.
      compiled_prefill, report = _compile(
        "prefill", lambda: prefill.lower(state.abstract_params, prompts, prompts, cache_length=cache_len)
      )
  except Exception as e:
    logging.exception("prefill did not compile")
    compiled_prefill, report = (
      None,
      StepReport("prefill", 0.0, 0, 0, 0, 0, 0, error=f"{type(e).__name__}: {_first_line(e)}"),
    )
  steps.append(report)
  if compiled_prefill is not None:
    # The decode loop's input is the prefill's output, with the shardings the partitioner chose for it.
    shapes = jax.eval_shape(
      lambda p, t, s: sampler.prefill(p, t, s, cache_len), state.abstract_params, prompts, prompts
    )
    decode_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, compiled_prefill.output_shardings
    )
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))
    decode_fn = jax.jit(sampler.decode, static_argnames=("sampling",), donate_argnames=("state",))
    try:
      _, report = _compile(
        "decode",
        lambda: decode_fn.lower(
          state.abstract_params,
          decode_state,
          key,
          step_number,
          sampling=SamplingConfig(max_new_tokens=cache_len - prompt_len, temperature=1.0, top_k=0, top_p=0.9),
        ),
      )
    except Exception as e:  # A bug in the decode path: report it beside the train step's numbers.
      logging.exception("decode did not compile")
      report = StepReport("decode", 0.0, 0, 0, 0, 0, 0, error=f"{type(e).__name__}: {_first_line(e)}")
    steps.append(report)
  return steps
