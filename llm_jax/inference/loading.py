"""Load a trained model from any stage's workdir (or one checkpoint of it) onto a mesh, ready to sample."""

from __future__ import annotations

import os

from jax.sharding import Mesh

from llm_jax import checkpoint as ckpt_lib
from llm_jax import modeling
from llm_jax.errors import UserError
from llm_jax.inference.sampler import Sampler
from llm_jax.tokenizer import Tokenizer, load_tokenizer


def split_checkpoint_path(path: str) -> tuple[str, int]:
  """`WORKDIR/checkpoints/STEP` → (WORKDIR, STEP)."""
  path = os.path.abspath(path.rstrip("/"))
  parent, step = os.path.split(path)
  if not step.isdigit() or os.path.basename(parent) != ckpt_lib.CHECKPOINT_DIR:
    raise UserError(f"--checkpoint={path}: expected WORKDIR/{ckpt_lib.CHECKPOINT_DIR}/STEP")
  return os.path.dirname(parent), int(step)


def resolve(workdir: str, checkpoint: str) -> tuple[str, int | None]:
  """The --workdir / --checkpoint pair of the command-line tools → (workdir, step or None for the latest)."""
  if bool(workdir) == bool(checkpoint):
    raise UserError("give exactly one of --workdir or --checkpoint")
  return split_checkpoint_path(checkpoint) if checkpoint else (workdir, None)


def load_sampler(workdir: str, mesh: Mesh, step: int | None = None) -> tuple[Sampler, Tokenizer, dict]:
  """The latest (or `step`'s) parameters of `workdir`, sharded on `mesh`, with the workdir's tokenizer."""
  modeling.check_language_model(workdir, step)
  tokenizer = load_tokenizer(workdir)
  spec, params, meta = modeling.load_model(workdir, mesh, step)
  return Sampler(spec.graphdef, params, mesh), tokenizer, meta
