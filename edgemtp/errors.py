"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class EdgemtpError(Exception):
    """A problem with the user's input (file, field or flag); the message names the culprit."""
