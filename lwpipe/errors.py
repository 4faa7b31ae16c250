"""The one exception type users see: a message, never a traceback."""


class LwpipeError(Exception):
    """A problem with the user's input or environment, explained in one message."""


class ConfigError(LwpipeError):
    """A recipe value that is not allowed; the message names the key path, the value and what is allowed."""

    def __init__(self, path: str, value, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{path}={value!r}: {allowed}")
