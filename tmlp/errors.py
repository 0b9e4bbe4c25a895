"""The one exception type for bad user input: its message is a single line naming the problem and the fix."""


class TmlpError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2."""
