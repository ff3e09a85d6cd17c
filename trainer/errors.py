"""The one exception type for bad input, reported as a single line before training starts."""


class ConfigError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""
