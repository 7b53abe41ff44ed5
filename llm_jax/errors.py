"""The one error type for user mistakes.

A `UserError` means "the input or the configuration is wrong": absl mains print its message as one line on
stderr and exit with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the user's config, flags, files or data (not a bug in llm_jax)."""
