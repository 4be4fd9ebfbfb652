"""What every command shares: the group that turns user mistakes into one `error:` line, output checks, and
the progress bar."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import click

from .. import __version__
from ..errors import ArgumentError, EdgemtpError, memory_limit
from ..scratch import link_to_nothing, nearest_existing


class _Command(click.Command):
    """A full disk met while writing a file object (no filename in the error) is named by the command's
    outputs: its -o path (quickstart: --workdir; profile: --plot / --trace), else standard output. So is one
    met while copying a file (shutil.copyfile): its filename is then the file it read, filename2 the copy."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except OSError as e:
            help_into_full_output(e)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            if (e.filename is not None and e.filename2 is None) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            outs = [str(v) for k in ("out", "workdir", "plot_file", "trace") if (v := ctx.params.get(k))]
            where = " or ".join(outs + ["standard output"] * (ctx.command.name == "profile")) or "standard output"
            raise EdgemtpError(f"{where}: {e.strerror} while writing it") from None


class _Group(click.Group):
    """User mistakes become one line on stderr and exit status 2, never a traceback."""

    command_class = _Command

    def parse_args(self, ctx, args):
        """The group's own flags (`edgemtp --verison`), as a command's are; no command at all shows the help."""
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            usage_error(e)
        except OSError as e:
            help_into_full_output(e)
            raise

    def invoke(self, ctx):
        with warnings.catch_warnings():  # a library warning (e.g. a provider falling back) as one plain line
            warnings.showwarning = lambda message, *_a, **_k: click.echo(f"warning: {one_line(message)}", err=True)
            try:
                return super().invoke(ctx)
            except EdgemtpError as e:
                click.echo(f"error: {one_line(e.cli_message() if isinstance(e, ArgumentError) else e)}", err=True)
                sys.exit(2)
            except click.UsageError as e:  # click's own checks (an unknown flag or command, a bad choice)
                usage_error(e)
            except OSError as e:
                if e.errno == errno.ENOMEM:  # an mmap (np.memmap) under a memory limit
                    out_of_memory()
                if e.errno == errno.EPIPE:
                    reader_gone()
                if e.filename is None or e.errno not in PATH_ERRORS:
                    raise  # not about a path the user gave (a bug: its traceback)
                click.echo(f"error: {one_line(e.filename)}: {e.strerror}", err=True)
                sys.exit(2)
            except MemoryError:
                out_of_memory()
            except KeyboardInterrupt as e:  # Ctrl-C or a script's SIGINT: click's message, but the shell's
                # status for it (click's is 1, a failure's), as SIGTERM's is 143; on its own line, after the
                # terminal's ^C echo (no echo off a terminal; a progress bar or spinner has ended its line)
                echo_ended = isinstance(e, LineEnded) or not stderr_console().is_terminal
                click.echo("Aborted!" if echo_ended else "\nAborted!", err=True)
                sys.exit(130)


class LineEnded(KeyboardInterrupt):
    """Ctrl-C while a progress bar or spinner showed on standard error: its last frame (or its erasure) leaves
    the cursor at the start of a line, the terminal's ^C echo drawn over."""


def reader_gone():
    """The output's reader went away (`edgemtp generate ... | head -c 1`): the command stops quietly, with the
    status of a program SIGPIPE ends (141, as cat's and yes's there; click's own is 1, a failure's). Python
    ignores SIGPIPE, so the write raised EPIPE instead. Standard output then goes to /dev/null: the
    interpreter's flush of it at exit would meet the closed pipe again ("Exception ignored ... BrokenPipeError");
    standard error buffers nothing to flush."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (an app's stream): nothing to flush there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sigpipe = getattr(signal, "SIGPIPE", None)  # Windows has none
    sys.exit(128 + sigpipe if sigpipe else 1)


def out_of_memory():
    """The memory ran out, most often under a limit the user can raise (ulimit -v, a container's): one line
    naming it."""
    limit = memory_limit()
    click.echo(f"error: out of memory{f' ({limit})' * bool(limit)}", err=True)
    sys.exit(2)


def help_into_full_output(e: OSError) -> None:
    """--help and --version print while the arguments are parsed, before _Command.invoke's handling of a full
    disk: one met there (no filename in the error) is its one line and status 2, as a command's output's, not a
    traceback. Returns for any other error, for the caller to raise."""
    if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
        click.echo(f"error: standard output: {e.strerror} while writing it", err=True)
        sys.exit(2)


def usage_error(e: click.UsageError):
    """click's own checks (an unknown flag or command, a bad choice) as one `error:` line, status 2."""
    message = " ".join(e.format_message().split())  # "Did you mean ...?" comes on a second line
    where = e.ctx.command_path if e.ctx is not None else "edgemtp"
    click.echo(f"error: {message} (see '{where} --help')", err=True)
    sys.exit(2)


def one_line(text) -> str:
    """`text` with its line breaks written as escapes (`\\n`): a path or a chat template's message holding one
    broke the error over lines, the culprit's name cut between them."""
    return "".join(c.encode("unicode_escape").decode() if c in LINE_BREAKS else c for c in str(text))


LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines splits


# a path given that cannot be read or written: read-only, no permission, a file where a directory goes, full
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG}


@contextlib.contextmanager
def exit_on_termination_signals():
    """SIGTERM (kill, a cancelled CI job) and SIGHUP (the terminal or ssh session closed) as an exit, with the
    shell's status for them (143, 129), so the `finally` blocks that delete a half-written bundle's temporary
    directory run: by default the process dies and leaves it behind. Only for the `edgemtp` command itself
    (main), and only over the default action: a program calling cli() keeps its own handling, and `nohup`'s
    ignored SIGHUP stays ignored."""
    names = ("SIGTERM", "SIGHUP")  # Windows has no SIGHUP
    signums = [s for name in names if (s := getattr(signal, name, None)) and signal.getsignal(s) is signal.SIG_DFL]

    def leave(signum, _frame):
        for s in signums:  # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        sys.exit(128 + signum)

    for s in signums:
        signal.signal(s, leave)
    try:
        yield
    finally:
        for s in signums:
            signal.signal(s, signal.SIG_DFL)


def writable_dir(out: Path, flag: str, shown: Path | None = None) -> None:
    """`out` is, or can be made, a directory this process may write into: checked before a long run.
    `shown`: the path the user gave, when `out` is its directory."""
    here = Path(out)
    out = shown if shown is not None else out
    if (link := link_to_nothing(here)) is not None:
        raise EdgemtpError(f"{flag} {out}: {link} is a symbolic link to nothing (dangling, or a loop)")
    here = nearest_existing(here)
    if not here.is_dir():  # the file named once where it is the path given
        raise EdgemtpError(f"{flag} {out}: " + ("" if here == Path(out) else f"{here} ") + "is a file, not a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        raise EdgemtpError(f"{flag} {out}: cannot write in {here}")
    try:  # os.access answers yes to root everywhere, /proc and read-only mounts included: try it
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        raise EdgemtpError(f"{flag} {out}: cannot write in {here} ({e.strerror})") from None


EXPORTER_PACKAGES = ("onnx", "safetensors", "gguf")


def needs_exporter(command: str, extra: str = "export", more: dict[str, str] | None = None) -> None:
    """The exporter's packages are the `export` extra: an app that only runs bundles installs numpy,
    onnxruntime and tokenizers (and the CLI click and rich); a command that makes files says what to add.
    `more`: the other packages (import name -> name to install) the command always needs, and `extra` the
    one that installs them all (cluster: scikit-learn, whose k-means would fail after the model's read)."""
    missing = []
    for name, shown in {**{n: n for n in EXPORTER_PACKAGES}, **(more or {})}.items():
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(shown)
    if missing:
        what = "the exporter's packages" if set(missing) <= set(EXPORTER_PACKAGES) else "packages"
        raise EdgemtpError(f"{command} needs {what} ({', '.join(missing)} not installed): "
                           f"pip install 'edgemtp[{extra}]'")


def output_path(ctx, param, value: str) -> Path:
    """-o "" would be the current directory (Path("") is "."): refused rather than guessed."""
    if not value.strip():
        raise EdgemtpError("-o: give a path (an empty one would mean the current directory)")
    return Path(value)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)  # the package's own: a vendored or frozen copy has no install metadata
def cli():
    """Export LLMs to ONNX bundles and run them with multi-token-prediction speculative decoding."""


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def loading_status(what: str):
    """A spinner naming `what` on stderr while a bundle loads (Gemma 3 270M: ~3 s, its sessions packing the
    weights; more on a bundle's first use, its files hashed), gone once loaded. On a terminal only: piped output
    and logs stay as they were."""
    console = stderr_console()
    if not console.is_terminal:
        yield
        return
    try:
        with console.status(f"loading {what}"):  # transient: the generated text starts where the spinner was
            yield
    except KeyboardInterrupt as e:
        raise LineEnded from e


@contextlib.contextmanager
def progress_bar(desc: str, show_what: bool = False):
    """Yields a `progress(done, total, what)` callback drawing a rich bar on stderr (`what` joins the
    description when show_what).

    The bar appears at the first update, so input checks that fail first print only their error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # markup off: descriptions name the user's files ("importing NAME"), which rich read as markup and emoji codes
    cols = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*cols, console=Console(stderr=True))
    task = None

    def update(done: int, total: int, what: str = "") -> None:
        nonlocal task
        shown = f"{desc}: {what}" if show_what and what else desc
        if task is None:
            bar.start()
            task = bar.add_task(shown, total=total)  # its first frame (drawn at once) names the step too
        bar.update(task, completed=done, total=total, description=shown)

    try:
        yield update
    except KeyboardInterrupt as e:  # the bar stays, at the step it reached, and its stop ends the line
        if task is None:
            raise
        raise LineEnded from e
    except Exception:  # a mistake in the input found mid-way, a full disk, no memory: its error line alone, without
        if task is not None:  # a bar above it (Progress.stop would print the bar, or an empty line off a terminal)
            bar.live.transient, task = True, None
            bar.live.stop()
        raise
    finally:
        if task is not None:
            bar.stop()
