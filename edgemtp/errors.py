"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class EdgemtpError(Exception):
    """A problem with the user's input (file, field or flag); the message names the culprit."""


class ArgumentError(EdgemtpError):
    """A bad value of an argument that both the Python API and the CLI take. The message names it as the
    caller wrote it: `max_new_tokens=0 must be at least 1` from Python, `--max-new-tokens 0 must be at
    least 1` from the CLI (which prints `cli_message()`), so an app's developer is not sent looking for a
    flag they never passed."""

    def __init__(self, name: str, value, rule: str, flag: str | None = None):
        self.name, self.value, self.rule = name, value, rule
        self.flag = flag or "--" + name.replace("_", "-")
        super().__init__(f"{name}={value!r} {rule}")

    def cli_message(self) -> str:
        return f"{self.flag} {self.value!r} {self.rule}"
