"""Compile the train and decode steps for a TPU pod topology on this machine; print per-chip memory vs HBM.

  pip install -e ".[tpu]"    # libtpu: TPU topologies and the TPU compiler, no TPU needed
  python experiments/aot_compile.py --config=configs/pretrain.py --config.model=llama_7b --topology=v5p:4x4x4 \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 --config.batch_size=256 --config.seq_len=2048

The mesh, batch, sequence length, grad_accum and model (`--config.model_overrides.remat=...`) come from the
config exactly as for training; nothing is allocated or run. Prints a table (compile seconds; argument, output,
aliased, temporary and peak bytes per device), a FITS / DOES NOT FIT line, the train step's FLOPs (XLA's count and
the model estimate) and its expected step time at 40 / 50 % MFU; exit status 0 either way, 1 if a
step did not compile (a bug: its error is in the table and the traceback in the log), 2 for a mistake (a mesh that
does not match the topology's chip count, an unknown topology, no libtpu).
`--config.mesh.sequence=N` compiles context parallelism (tokens split over N chips; configs/pretrain.py's rows).
`--lora_rank=16` compiles the LoRA fine-tuning step instead (adapters only trained; configs/sft.py's docstring).
See llm_jax/aot.py and configs/pretrain.py's docstring for measured settings.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile only: the host backend, plus the topology's TPU devices.

from absl import app, flags  # noqa: E402

from llm_jax import flag_parsing  # noqa: E402

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
flag_parsing.define_config_file("config", os.path.join(_CONFIGS, "pretrain.py"), "Config file.")
flags.DEFINE_string("topology", "v5p:2x2x2", "TPU slice, e.g. v5p:4x4x4 (v5p-128), v5e:16x16, v4:4x4x4, v6e:8x8.")
flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN).")
flags.DEFINE_float("hbm_gib", 0, "HBM per chip in GiB (0: the chip's data-sheet value).")
flags.DEFINE_bool("train", True, "Compile the train step.")
flags.DEFINE_bool("decode", True, "Compile prefill and decode.")
flags.DEFINE_integer("decode_batch", 0, "Prompts per decode batch (0: config.batch_size).")
flags.DEFINE_integer("prompt_len", 0, "Prompt tokens (0: half of cache_len).")
flags.DEFINE_integer("cache_len", 0, "KV-cache length = prompt + new tokens (0: config.seq_len).")
flags.DEFINE_integer("lora_rank", 0, "Compile the LoRA fine-tuning step (SFT's): adapters of this rank (0: full).")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (the scale alpha / rank does not change memory).")
flags.DEFINE_string("lora_targets", "all", "LoRA targets: q,k,v,o,mlp_in,mlp_gate,mlp_out or attention, mlp, all.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from llm_jax import aot, cli

  def run():
    from llm_jax import lora

    adapters = None
    if FLAGS.lora_rank:
      adapters = lora.LoraConfig(FLAGS.lora_rank, FLAGS.lora_alpha, lora.parse_targets(FLAGS.lora_targets))
    report = aot.compile_for_topology(
      FLAGS.config,
      FLAGS.topology,
      num_slices=FLAGS.num_slices,
      hbm_gib=FLAGS.hbm_gib,
      train=FLAGS.train,
      decode=FLAGS.decode,
      decode_batch=FLAGS.decode_batch,
      prompt_len=FLAGS.prompt_len,
      cache_len=FLAGS.cache_len,
      lora=adapters,
    )
    print(report.table(), flush=True)
    if report.errors:
      sys.exit(1)

  cli.run(run)


if __name__ == "__main__":
  from llm_jax import cli

  app.run(main, flags_parser=cli.parse_flags)
