"""What a user's mistake looks like from the CLI: exit status 2, no traceback, and on standard error one line
`error: ...` naming the culprit (the flag, file or field at fault)."""

from __future__ import annotations

import traceback


def assert_one_line_error(r, *culprits, exact: str | None = None) -> str:
    """`r`: a click.testing Result or a subprocess.CompletedProcess (text or bytes). Each of `culprits` (a flag
    with its value, a path, a field: what names the mistake, not a fragment any message holds) must be in the
    error line; `exact`: the whole message after `error: `. Returns the line."""
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    out, err = (s.decode() if isinstance(s, bytes) else s or "" for s in (r.stdout, r.stderr))
    shown = f"exit status {code}\nstdout: {out!r}\nstderr: {err!r}"
    exc = getattr(r, "exception", None)  # CliRunner keeps an uncaught exception out of the output: show it
    assert exc is None or isinstance(exc, SystemExit), "".join(traceback.format_exception(exc)) + shown
    assert code == 2 and "Traceback" not in out + err, shown
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("error: "), shown
    assert exact is None or lines[0] == f"error: {exact}", shown
    for culprit in map(str, culprits):
        assert culprit in lines[0], f"{culprit!r} not in the error line\n{shown}"
    return lines[0]
