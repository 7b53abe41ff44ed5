"""Writing files that a crash never leaves half-written."""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: str | bytes) -> str:
  """Writes `data` to `path` through a temporary file renamed into place: readers (and a rerun after a crash)
  see the old content or the new, never a part of it. Returns `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; nothing here is secret.
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return path
