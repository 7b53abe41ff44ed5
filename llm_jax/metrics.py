"""Metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars in TensorBoard event files.

Only process 0 writes. Values are plain Python floats/ints (fetched from devices by the caller).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.path, "a", buffering=1)  # Line-buffered: a crash loses at most one line.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in scalars.items():
      value = value.item() if isinstance(value, (np.generic, np.ndarray)) else value
      row[name] = value
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
