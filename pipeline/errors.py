"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class SkdError(Exception):
    """A problem with the user's input (data, store, checkpoint, options), not a bug in skd."""
