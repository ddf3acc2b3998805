"""The one exception type poelm raises for bad input.

Design choices:
- A `PoelmError` is a user's fault (a missing file, a mis-shaped tensor, an impossible config), not a
  bug: the CLI prints its message as one line and exits non-zero; anything else is a bug and keeps
  its traceback.
- Messages name the file, line, tensor or field, and what was expected.
- This file ships beside the model in every exported directory (the tokenizer and config raise it),
  so it imports nothing.
"""


class PoelmError(Exception):
    """Bad input: the message names what and where, and what was expected."""
