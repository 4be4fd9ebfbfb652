"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""

import contextlib
import os
import stat
import sys


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
        super().__init__(f"{name}={_shown(value)} {rule}")

    def cli_message(self) -> str:
        return f"{self.flag} {_shown(self.value)} {self.rule}"

    def __reduce__(self):  # rebuilt from its fields (args holds the message only): pickling, copy
        return type(self), (self.name, self.value, self.rule, self.flag)


class SwitchError(ArgumentError):
    """An ArgumentError about an on/off argument given as on (`fast_verify=True`): the CLI's flag takes no value,
    so its message names the flag alone (`--fast-verify needs ...`, not `--fast-verify True needs ...`)."""

    def cli_message(self) -> str:
        return f"{self.flag} {self.rule}"


SHOWN = 100  # characters of a value's repr a message shows


def _shown(value) -> str:
    """repr, with a numpy number shown as the plain number it holds (not `np.int64(0)`), cut to its first SHOWN
    characters: a document passed where a list was wanted (generate_batch(text)) was a 300 KB message."""
    item = getattr(value, "item", None)
    shown = repr(item() if callable(item) and getattr(value, "ndim", None) == 0 else value)
    return shown if len(shown) <= SHOWN else f"{shown[:SHOWN]}... ({len(shown):,} characters)"


def not_a_file(path) -> str:
    """Why `path`, which is not a regular file, is not one: for a message that names it. Found by stat: a FIFO
    or a device is not opened (reading one could wait forever)."""
    kind = _kind(path)
    return f"is {kind}, not a file" if kind else "no such file"


def not_an_onnx_file(path) -> str:
    """not_a_file, for an ONNX graph's path. A directory is most often a bundle: which of its graphs is meant is
    the caller's to say (a drafter's is dynamic), so one is named as an example."""
    kind = _kind(path)
    if kind is None:
        return "no such ONNX file"
    hint = f" (give one of its graphs, e.g. {os.path.join(path, 'target.onnx')})" if kind == "a directory" else ""
    return f"is {kind}, not an ONNX file{hint}"


def _kind(path) -> str | None:
    """What is at `path`, which is not a regular file: 'a directory', 'a FIFO', ...; None: nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"


def missing(path) -> str:
    """'missing' where nothing is at `path`, else not_a_file's 'is a directory, not a file': for a message
    about a file a directory needs (config.json, tokenizer.json)."""
    return not_a_file(path) if os.path.exists(path) else "missing"


def memory_limit() -> str:
    """'this process may use at most N MiB: ulimit -v' where its address space is limited (ulimit -v, prlimit
    --as, a container's or a phone's userland), else '': for a message saying the memory ran out, as a limit
    the user can raise is then the likely cause, not the machine's memory."""
    try:
        import resource
    except ImportError:  # Windows
        return ""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return "" if soft == resource.RLIM_INFINITY else f"this process may use at most {soft >> 20:,} MiB: ulimit -v"


def script_main(main) -> None:
    """Runs a hand-run script's main (benchmarks/): a user mistake (a bad bundle, flag or value) is its
    message on one line and exit status 2, as in the CLI, not a traceback."""
    try:
        main()
    except EdgemtpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # edgemtp/


def app_stacklevel() -> int:
    """warnings.warn's stacklevel for a warning raised inside this package to point at the app's line that called
    into it, through however many of the package's own calls (generate -> token_stream -> ...)."""
    frame, level = sys._getframe(1), 1
    # contextlib's frames too: a warning from a callback under a `with` of the package's (scratch.made_and_locked's
    # wait) pointed at contextlib.py's __enter__
    while frame is not None and (frame.f_code.co_filename.startswith(PACKAGE)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level
