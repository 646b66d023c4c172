"""Errors that reach the user as one line, without a traceback."""


class IcepError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class ConfigError(IcepError):
    """A config value is wrong: names the key, what it got and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
