"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class SkdError(Exception):
    """A problem with the user's input (data, store, checkpoint, options), not a bug in skd.

    Often raised in a DataLoader worker process, where PyTorch re-raises it in the main process as
    ``SkdError("Caught SkdError in DataLoader worker process 0.\\nOriginal Traceback ...")``: the
    worker's whole traceback as the message. The constructor keeps only the original message (the
    traceback's last line), so the user sees the same one-line error with worker processes as without.
    """

    def __init__(self, message: str = "") -> None:
        name = type(self).__name__
        if isinstance(message, str) and message.startswith(f"Caught {name} ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            _, found, original = last.partition(f"{name}: ")
            if found:
                message = original
        super().__init__(message)
