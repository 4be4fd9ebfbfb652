"""The `edgemtp` command: thin click commands that parse, call the library and print.

base.py holds the group (user mistakes as one `error:` line) and what the commands share; build.py the
commands that make files (import-gguf, export, cluster, train-drafter), run.py those that run a bundle
(generate, info), chat.py chat, measure.py profile, evaluate and quickstart. Importing it loads no ONNX
Runtime: each command imports what it needs when it runs."""

from __future__ import annotations

import io
import os
import sys

from . import build, chat, measure, run  # noqa: F401  each registers its commands on the group
from .base import cli, exit_on_termination_signals
from .build import domain_counts
from .run import unescape

__all__ = ["cli", "domain_counts", "exit_on_termination_signals", "main", "unescape"]


def main():
    # ONNX Runtime 1.29+ sends usage telemetry from Linux and macOS too, and on a read-only home prints a
    # warning about it to every command's stderr. The command turns it off unless the user set the variable
    # (read when onnxruntime loads: nothing has imported it yet); an app embedding the runtime decides itself.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # A closed standard output (`>&-`) leaves sys.stdout None, and click then writes nothing: the command said
    # it succeeded with none of its output. Refused as `cat` refuses it.
    if sys.stdout is None:
        if sys.stderr is not None:
            print("error: standard output is closed", file=sys.stderr)
        sys.exit(2)
    # Output in an encoding that lacks a character the model writes (Windows' cp1252 when the output is
    # redirected, a Latin-1 locale) shows it as "?", not a UnicodeEncodeError in the middle of a stream.
    # UTF-8 output, which encodes any text, is unchanged.
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="replace")
    with exit_on_termination_signals():
        cli(prog_name="edgemtp")
