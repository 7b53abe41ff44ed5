"""Orbax checkpoints: one format for every stage.

A checkpoint `WORKDIR/checkpoints/<step>/` holds these items:
  params     the model parameters (a pure dict of arrays),
  opt_state  the optax state,
  data_iter  the Grain iterator state (one file per process),
  meta       JSON: step, stage, model config,
  extra      (some stages) arrays kept beside the model, e.g. RLHF's value function.
`params` alone is what later stages (SFT, reward model, RLHF, generation) restore. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact; saves run asynchronously. Restoring takes abstract arrays that carry the target
shardings, so a checkpoint restores onto any mesh or device count. No pickle anywhere.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from llm_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not create and not os.path.isdir(self.directory):
      raise UserError(f"{self.directory}: no checkpoints here")
    # Several processes: process 0 lists the steps and broadcasts them, so all resume from the same step.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True,
                                           single_host_load_and_broadcast=jax.process_count() > 1)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, data_iter, meta: dict[str, Any], extra: Any = None
           ) -> None:
    """`extra`: more arrays a stage keeps beside its model parameters (e.g. RLHF's value function)."""
    items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if extra:
      items["extra"] = ocp.args.StandardSave(extra)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any = None, data_iter=None,
              abstract_extra: Any = None) -> dict[str, Any]:
    """Restores the items asked for (abstract trees carry the target shardings); `data_iter` in place."""
    items: dict[str, Any] = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if abstract_extra:
      items["extra"] = ocp.args.StandardRestore(abstract_extra)
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    path = os.path.join(self.directory, str(step))
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
      raise UserError(f"{path}: cannot restore the checkpoint (missing or truncated?): "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

  def read_meta(self, step: int) -> dict[str, Any]:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """Parameters (and meta) of the latest (or given) checkpoint of a workdir: how later stages initialize."""
  checkpointer = Checkpointer(workdir, create=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{checkpointer.directory}: no complete checkpoint")
    restored = checkpointer.restore(step, abstract_params)
    return restored["params"], restored["meta"]
  finally:
    checkpointer.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
