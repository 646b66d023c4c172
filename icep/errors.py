"""Errors that reach the user as one line, without a traceback."""


class IcepError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class ConfigError(IcepError):
    """A config value is wrong: names the key, what it got and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        # Pickle with both arguments: a sweep job's error travels back to the sweeper this way
        # (hydra/launcher=submitit_*), and the default reduce passes only the joined message.
        return (type(self), (self.key, self.message))
