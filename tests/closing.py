"""Closing an engine while another thread's call is held inside it (a pass, a drafter's load)."""

from __future__ import annotations

import threading


def close_while_held(closing, run, inside: threading.Event, go: threading.Event, seconds: float = 60
                     ) -> threading.Thread:
    """Runs `run` in a thread, closes `closing` (an engine, a stream: anything with close(), or several in
    turn) once that thread is held (`inside` set), then lets it go (`go`), and waits for it to end; the caller
    checks that it did. `go` is set whatever happens here: a call left waiting kept the test run from exiting."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert inside.wait(seconds)
        for each in closing if isinstance(closing, (list, tuple)) else [closing]:
            each.close()
    finally:
        go.set()
    thread.join(seconds)
    return thread
