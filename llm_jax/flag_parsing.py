"""absl flag parsing for the command-line tools, with a mistake as one line on stderr and exit status 2.

absl prints a bad flag value or an unknown flag with its usage hint and exits 1; ml_collections raises a
traceback for an unknown `--config.field` and defers a `--config` file that does not load to the first use of
the config. Every experiment passes `parse_flags` to `app.run(main, flags_parser=parse_flags)`. Kept apart from
`llm_jax.cli` (which defines the multi-process flags) so that the launcher, whose own flags overlap, can use it.
"""

from __future__ import annotations

import re
import sys

from absl import flags
from ml_collections import config_flags


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _one_line(text: str) -> str:
  """First line, plus the last line when there are more (a config file's traceback ends with its error)."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  if not lines:
    return ""
  return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _unknown_field(e: Exception, argv: list[str]) -> None:
  """ml_collections' error for `--config.x=...` naming no field of the config, as one line."""
  message = str(e.args[0] if e.args else e)
  suggestion = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', message)
  field = suggestion[2] if suggestion else (re.findall(r"\w+", message) or ["?"])[0]
  given = next(
    (
      a.split("=")[0]
      for a in argv[1:]
      if a.startswith("--") and re.search(rf"[.]{re.escape(field)}(=|$|[.])", a.split("=")[0])
    ),
    field,
  )
  fail(f"{given}: the config has no field {field!r}" + (f" (did you mean {suggestion[1]!r}?)" if suggestion else ""))


def _config_file_error(name: str, path: str, e: BaseException) -> None:
  text = str(e.__cause__ or e)
  errno = re.search(r"\[Errno \d+\] ([^:\n]+)", text)
  reason = errno[1] if errno else f"{type(e).__name__}: {_one_line(e)}"
  fail(f"--{name}={path}: cannot load the config file ({reason})")


def define_config_file(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file`, which already loads the file and applies the `--name.field=...` overrides
  of sys.argv: their mistakes become one line too."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError) as e:
    _unknown_field(e, sys.argv)
  except (OSError, SyntaxError) as e:
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")]
    _config_file_error(name, given[-1] if given else default, e)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # A bad value, an unknown flag, a config file whose get_config() raised.
    fail(_one_line(e))
  except (AttributeError, KeyError) as e:  # ml_collections: `--config.x=...` names no field of the config.
    _unknown_field(e, argv)
  except (OSError, SyntaxError) as e:  # A config file that does not exist or does not parse.
    name = next((n for n in flags.FLAGS if hasattr(type(flags.FLAGS[n]), "config_filename")), "config")
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")]
    _config_file_error(name, given[-1] if given else "(default)", e)
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if hasattr(type(flag), "config_filename") and flag.name == name:  # A config flag (ml_collections).
      try:
        flag.value.keys()  # A config file that did not load raises here (ml_collections defers the error).
      except OSError as e:
        _config_file_error(name, flag.config_filename, e)
  return rest
