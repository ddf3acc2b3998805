"""The one exception type poelm raises for bad input: a user's fault, printed by the CLI as one line
naming what and where; anything else is a bug and keeps its traceback. Imports nothing: it ships
(docs/model.md §9.8).
"""


class PoelmError(Exception):
    """Bad input: the message names what and where, and what was expected."""
