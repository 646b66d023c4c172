"""Errors that reach the user as one line, without a traceback."""


def _from_worker(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker.

    torch re-raises a worker's error in the main process as ``type(error)(text)``, with ``text``
    = "Caught X in DataLoader worker process N.\\nOriginal Traceback ...\\nmodule.X: message";
    only the last line's message is the user's.
    """
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        _, sep, message = last.partition(": ")
        return message if sep else last
    return text


class IcepError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""

    def __init__(self, message: str = ""):
        super().__init__(_from_worker(message) if isinstance(message, str) else message)


class ConfigError(IcepError):
    """A config value is wrong: names the key, what it got and what is allowed."""

    def __init__(self, key: str, message: str | None = None):
        if message is None:  # re-raised from a DataLoader worker: ``key`` is the whole text
            key, _, message = _from_worker(key).partition(": ")
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        # Pickle with both arguments: a sweep job's error travels back to the sweeper this way
        # (hydra/launcher=submitit_*), and the default reduce passes only the joined message.
        return (type(self), (self.key, self.message))
