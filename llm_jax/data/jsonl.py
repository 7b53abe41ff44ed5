"""Reading JSONL with errors that name the file and line (every JSONL reader of the project uses this)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from llm_jax.errors import UserError

T = TypeVar("T")


def read_jsonl(path: str, parse: Callable[[Any], T], on_error: str = "raise") -> tuple[list[T], int]:
  """`parse(obj)` for each non-blank line; it raises ValueError to reject a line.

  With on_error="raise" the first bad line stops with `UserError("FILE:LINE: reason")`; with "skip" bad lines
  are skipped and counted. Returns (items, skipped).
  """
  if on_error not in ("raise", "skip"):
    raise UserError(f"on_error={on_error!r} must be 'raise' or 'skip'")
  if not path:
    raise UserError("a JSONL file is needed but the path is empty")
  items, skipped = [], 0
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise UserError(f"{path}: {e.strerror}") from None
  line_no = 0
  with f:
    try:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          items.append(parse(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
          if on_error == "raise":
            reason = f"malformed JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise UserError(f"{path}:{line_no}: {reason}") from None
          skipped += 1
    except UnicodeDecodeError as e:  # Decoding runs ahead of the lines: the line is approximate.
      raise UserError(f"{path}: not UTF-8 text near line {line_no + 1} ({e.reason})") from None
  return items, skipped


def held_out_split(items: list[T], fraction: float, seed: int, source: str, what: str) -> tuple[list[T], list[T]]:
  """A seeded random split of whole items into (train, held out), each in file order; at least one held out and
  one left to train on, else a UserError naming `source`."""
  order = np.random.default_rng(seed).permutation(len(items))
  num_eval = max(1, int(round(len(items) * fraction)))
  if num_eval >= len(items):
    raise UserError(f"{source}: {len(items)} {what} are too few to hold out {num_eval} for evaluation")
  return [items[i] for i in sorted(order[num_eval:])], [items[i] for i in sorted(order[:num_eval])]
