"""Orbax checkpoints: one format for every stage.

A checkpoint `WORKDIR/checkpoints/<step>/` holds these items:
  params     the model parameters (a pure dict of arrays),
  opt_state  the optax state,
  data_iter  the Grain iterator state (one file per process); prepared data (llm_jax/data/prepared.py) saves
             none: its one global row position is `meta["data_state"]`, which any process count resumes,
  meta       JSON: step, stage, model config,
  extra      (some stages) arrays kept beside the model, e.g. RLHF's value function.
`params` alone is what later stages (SFT, reward model, RLHF, generation) restore. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact; saves run asynchronously. Restoring takes abstract arrays that carry the target
shardings, so a checkpoint restores onto any mesh or device count. No pickle anywhere.

Checkpoints that do not restore. A disk that filled up, a copy that was cut short or a bad sector leaves a
checkpoint that Orbax lists but cannot read: a truncated OCDBT data file (TensorStore's OUT_OF_RANGE or
DATA_LOSS inside a bare `Exception`), unparsable metadata JSON, a missing item directory. Such a checkpoint is
reported in one line that names the checkpoint, the file and the reason (`UnreadableCheckpoint`).
- Where "the latest checkpoint" is wanted (`Checkpointer.restore_latest`: training and RLHF resume,
  `restore_params(step=None)`: init_from of later stages, generate.py, evaluate.py), the newest checkpoint that
  restores is used instead, and a line on stderr says which checkpoint was bad, why, and which one is used. If
  none restores, a UserError names them all: a run never silently starts from scratch.
- A checkpoint named by its step (`--checkpoint=W/checkpoints/6`) never falls back: one line, exit 2.
- Nothing is ever deleted. A resumed run that fell back will save the bad checkpoint's step again, and Orbax
  refuses to save onto an existing step directory; so the run renames each newer unreadable `checkpoints/<step>`
  to `checkpoints/<step>.corrupt` (`.corrupt.1`, ... if taken) and prints that it did. Orbax neither lists nor
  garbage-collects such names, so the evidence stays until a person removes it. Readers of a workdir
  (`restore_params`) never rename anything.
- Several processes: each process reads its own shards, so each tries the same step and they agree (an
  all-gather of "restored") before moving on; process 0 renames and prints.
After a failed restore, Orbax's other reads still in flight fail later in background threads; those leftover
errors are silenced (they would print dozens of tracebacks after the one-line report).
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import os
import re
import sys
import warnings
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from llm_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"  # Not a step name to Orbax: neither listed nor garbage-collected.
_PYTREE_ITEMS = ("params", "opt_state", "extra")  # Saved with StandardSave: each has a _METADATA file.


class UnreadableCheckpoint(UserError):
  """A checkpoint that Orbax lists but cannot restore: names the checkpoint, the file and the reason."""

  def __init__(self, path: str, step: int, file: str, reason: str):
    self.path, self.step, self.file, self.reason = path, step, file, reason
    where = file if file != path else "(no single file)"
    super().__init__(f"checkpoint {path} does not restore: {where}: {reason}")


@functools.cache
def _save_replicated_arrays_whole_on_cpu() -> None:
  """Orbax's replica-parallel save has each replica of a replicated array write a slice of it: TPU hosts spread
  their device-to-host copies that way, but CPU devices share one host's memory, so the slicing only adds work (a
  small program per slice shape, compiled at the first save). Orbax already turns it off for GPUs; this does for
  CPUs, once per process (the handler registry is Orbax's, global). Measured on 8 simulated CPU devices, the
  tiny model's first save: 0.6-0.8 s → 0.1 s; later saves 0.13 s → 0.08 s."""
  if jax.default_backend() != "cpu":
    return
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns on every override, meant or not.
  try:
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


def _isdir_as_process_0_sees_it(path: str) -> bool:
  """Whether `path` is a directory, decided once for all processes. Each looking for itself could disagree (process
  0 may create it in between: a run checks its workdir, then makes its checkpoint directory) and send them into
  different collectives, where both wait forever; seen with 2 processes on a loaded 2-core machine."""
  found = os.path.isdir(path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
  return found


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, create: bool = True, params_only_gb: int | None = None):
    """`params_only_gb`: a writer of parameters and meta only (a converter), saving synchronously with at most
    this many GB of arrays staged at once; by default Orbax stages a host copy of every array to save in the
    background (measured saving llama_1b's 2.3 GiB: +1.5 GiB peak RSS by default, +0.9 GiB with 1 GB)."""
    _save_replicated_arrays_whole_on_cpu()
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not create and not _isdir_as_process_0_sees_it(self.directory):
      raise UserError(f"{self.directory}: no checkpoints here")
    # Several processes: process 0 lists the steps and broadcasts them, so all resume from the same step.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=create,
      enable_async_checkpointing=params_only_gb is None,
      single_host_load_and_broadcast=jax.process_count() > 1,
    )
    handlers = None
    if params_only_gb is not None:
      handlers = dict(
        params=ocp.StandardCheckpointHandler(save_concurrent_gb=params_only_gb, restore_concurrent_gb=params_only_gb),
        meta=ocp.JsonCheckpointHandler(),
      )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, data_iter, meta: dict[str, Any], extra: Any = None) -> None:
    """`extra`: more arrays a stage keeps beside its model parameters (e.g. RLHF's value function)."""
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if opt_state is not None:  # None: a checkpoint that was never trained here (an HF import).
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if extra:
      items["extra"] = ocp.args.StandardSave(extra)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(
    self, step: int, abstract_params: Any, abstract_opt_state: Any = None, data_iter=None, abstract_extra: Any = None
  ) -> dict[str, Any]:
    """Restores the items asked for (abstract trees carry the target shardings); `data_iter` in place.

    This one checkpoint only: an `UnreadableCheckpoint` (a UserError) if it does not restore.
    """
    self._check_exists(step)
    restored, error = self._try_restore(step, abstract_params, abstract_opt_state, data_iter, abstract_extra)
    if error is not None:
      raise error
    return restored

  def restore_latest(
    self,
    abstract_params: Any,
    abstract_opt_state: Any = None,
    data_iter=None,
    abstract_extra: Any = None,
    move_aside: bool = False,
  ) -> tuple[int | None, dict[str, Any] | None]:
    """(step, restored items) of the newest checkpoint that restores; (None, None) if there is none.

    Unreadable newer checkpoints are reported on stderr; with `move_aside` (a run that will save those steps
    again) they are renamed to `<step>.corrupt` (module docstring). A UserError if no checkpoint restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    bad: list[UnreadableCheckpoint] = []
    for step in steps:
      restored, error = self._try_restore(step, abstract_params, abstract_opt_state, data_iter, abstract_extra)
      if error is None:
        break
      bad.append(error)
    else:
      raise UserError(
        f"no checkpoint in {self.directory} restores (nothing was deleted): "
        + "; ".join(f"{e.step}: {e.file}: {e.reason}" for e in bad)
      )
    for error in bad:
      message = (
        f"warning: checkpoint {error.path} does not restore ({error.file}: {error.reason}); "
        f"using checkpoint {os.path.join(self.directory, str(step))} instead"
      )
      if move_aside:
        message += f"; moved the bad one to {self._move_aside(error.step)}"
      if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
    if bad and move_aside:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llm_jax checkpoints moved aside")
      self.manager.reload()  # Forget the moved steps.
    return step, restored

  def read_meta(self, step: int) -> dict[str, Any]:
    self._check_exists(step)
    path = os.path.join(self.directory, str(step))
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))["meta"]
    except Exception as e:  # noqa: BLE001  (only read errors become UserErrors; see _is_read_error)
      if not _is_read_error(e):
        raise
      raise _unreadable(path, step, e, ("meta",)) from None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _check_exists(self, step: int) -> None:
    if step not in self.manager.all_steps():
      raise UserError(
        f"{os.path.join(self.directory, str(step))}: no such checkpoint; "
        f"the checkpoints in {self.directory} are {self.all_steps()}"
      )

  def _try_restore(
    self, step: int, abstract_params, abstract_opt_state, data_iter, abstract_extra
  ) -> tuple[dict[str, Any] | None, UnreadableCheckpoint | None]:
    items: dict[str, Any] = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if abstract_extra:
      items["extra"] = ocp.args.StandardRestore(abstract_extra)
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    path = os.path.join(self.directory, str(step))
    restored, error = None, None
    try:
      restored = dict(self.manager.restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # noqa: BLE001  (only read errors are caught; see _is_read_error)
      if not _is_read_error(e):
        raise
      error = _unreadable(path, step, e, tuple(items))
    if jax.process_count() > 1:  # Each process read its own shards: all must have succeeded.
      from jax.experimental import multihost_utils

      everyone = multihost_utils.process_allgather(np.int32(error is None))
      if error is None and not np.all(everyone):
        restored, error = None, UnreadableCheckpoint(path, step, path, "another process could not read it")
    return restored, error

  def _move_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target, n = source + CORRUPT_SUFFIX, 0
    while os.path.exists(target):
      n += 1
      target = f"{source}{CORRUPT_SUFFIX}.{n}"
    if jax.process_index() == 0:
      os.rename(source, target)
    return target


def restore_params(
  workdir: str, abstract_params: Any, step: int | None = None, params_only_gb: int | None = None
) -> tuple[Any, dict[str, Any]]:
  """Parameters (and meta) of the latest (or given) checkpoint of a workdir: how later stages initialize.

  `step=None` falls back to the newest checkpoint that restores (and says so); a given step does not.
  `params_only_gb`: see `Checkpointer` (bounded staging memory, for converters).
  """
  checkpointer = Checkpointer(workdir, create=False, params_only_gb=params_only_gb)
  try:
    if step is None:
      step, restored = checkpointer.restore_latest(abstract_params)
      if step is None:
        raise UserError(f"{checkpointer.directory}: no complete checkpoint")
    else:
      restored = checkpointer.restore(step, abstract_params)
    return restored["params"], restored["meta"]
  finally:
    checkpointer.close()


def workdir_meta(workdir: str, step: int | None = None) -> dict[str, Any] | None:
  """The meta record (stage, step, model) of a checkpoint: `step`'s, or the newest one whose meta reads (None if
  the workdir has no checkpoint). Cheap (one small JSON): how a tool checks what kind of workdir it was given
  before loading anything."""
  if step is None and not _isdir_as_process_0_sees_it(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  checkpointer = Checkpointer(workdir, create=False)
  try:
    if step is not None:
      return checkpointer.read_meta(step)
    for candidate in reversed(checkpointer.all_steps()):
      try:
        return checkpointer.read_meta(candidate)
      except UnreadableCheckpoint:
        continue  # The restore that follows reports it (and falls back) in its own words.
    return None
  finally:
    checkpointer.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------------------
# Telling a damaged checkpoint from a bug, and saying which file is damaged.


def _chain(e: BaseException) -> list[BaseException]:
  """The exception and its causes, outermost first."""
  out: list[BaseException] = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _is_read_error(e: BaseException) -> bool:
  """What reading a damaged checkpoint raises: OSError, ValueError (TensorStore statuses, JSON, tree metadata),
  KeyError (a missing item), or Orbax's bare `Exception` wrapping one of them. Anything else is a bug."""
  return any(isinstance(x, (OSError, ValueError, KeyError)) for x in _chain(e))


_QUOTED_PATH = re.compile(r'"(/[^"\\]+)')  # TensorStore quotes paths, at times inside escaped JSON.


def _reason(e: BaseException) -> str:
  """The innermost read error, first line, without TensorStore's driver-by-driver prefix and spec dump."""
  inner = [x for x in _chain(e) if isinstance(x, (OSError, ValueError, KeyError))][-1]
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
  text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")  # Say what, briefly.
  text = re.sub(r"\s*\[tensorstore_spec.*", "", text)
  status = re.match(r"([A-Z_]{4,}): (.*)", text)
  if status:  # "OUT_OF_RANGE: Error opening ...: Error reading ...: Requested byte range ... is not valid ..."
    text = f"{status[1]}: {status[2].rsplit(': ', 1)[-1]}"
  return f"{type(inner).__name__}: {text[:300]}"


def _damaged_file(path: str, items: tuple[str, ...]) -> str | None:
  """The first file of the checkpoint that is visibly damaged: a missing item, an empty file, bad JSON."""
  for item in items:
    directory = os.path.join(path, item)
    if not os.path.isdir(directory):
      return directory
    if item in _PYTREE_ITEMS and not os.path.exists(os.path.join(directory, "_METADATA")):
      return os.path.join(directory, "_METADATA")
  for item in items:
    for root, _, files in sorted(os.walk(os.path.join(path, item))):
      for name in sorted(files):
        file = os.path.join(root, name)
        if os.path.getsize(file) == 0:
          return file
        if (
          name in ("_METADATA", "_sharding", "metadata")
          or name.endswith(".json")
          or os.path.basename(root) == "array_metadatas"
        ):
          try:
            with open(file, "rb") as f:
              json.load(f)
          except (OSError, ValueError):
            return file
  return None


def _unreadable(path: str, step: int, e: BaseException, items: tuple[str, ...]) -> UnreadableCheckpoint:
  _silence_leftover_read_errors()
  # The file: the most specific one an error names (TensorStore quotes the data file), else the first one
  # our own look at the checkpoint finds damaged (JSON errors name no file), else the checkpoint itself.
  reason = _reason(e)
  named = sorted(
    {p.rstrip("/") for x in _chain(e) for p in _QUOTED_PATH.findall(str(x)) if p.startswith(path + os.sep)}, key=len
  )
  file = named[-1] if named and os.path.isfile(named[-1]) else _damaged_file(path, items)
  size = re.search(r"not valid for value of size (\d+)", reason)
  if file is None and named and size:  # OCDBT names its database, not the data file: find it by its size.
    file = next(
      (
        os.path.join(root, f)
        for root, _, files in sorted(os.walk(named[-1]))
        for f in sorted(files)
        if os.path.getsize(os.path.join(root, f)) == int(size[1])
      ),
      None,
    )
  return UnreadableCheckpoint(path, step, file or (named[-1] if named else path), reason)


_silenced = False


def _silence_leftover_read_errors() -> None:
  """After a failed restore, Orbax's other reads of that checkpoint fail later in TensorStore threads and
  garbage-collected asyncio tasks; Python would print each as a traceback (unraisable-exception hook, the
  asyncio logger, "coroutine was never awaited"). Drop exactly those; everything else still prints."""
  global _silenced
  if _silenced:
    return
  _silenced = True

  def leftover(e) -> bool:
    text = str(e)
    return (
      (isinstance(e, RuntimeError) and "Event loop is closed" in text)  # TensorStore callbacks.
      or text.startswith("Encountered error while reading array index")  # Orbax's read tasks.
      or (isinstance(e, ValueError) and re.match(r"[A-Z_]{4,}: ", text) is not None)
    )  # TensorStore statuses.

  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not leftover(unraisable.exc_value):
      previous_hook(unraisable)

  sys.unraisablehook = hook

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return not (record.exc_info and leftover(record.exc_info[1]))

  std_logging.getLogger("asyncio").addFilter(_Filter())
  warnings.filterwarnings(
    "ignore", message="coroutine '_read_array_index_and_device_put' was never awaited", category=RuntimeWarning
  )
