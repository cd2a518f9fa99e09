"""The one error type users see: a message that names the file, line or key, never a traceback."""


class MuxTuneError(Exception):
    """Bad input or an impossible setting. The CLI prints the message and exits with code 2."""
