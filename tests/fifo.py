"""FIFOs for the tests of their refusal. Code that opened one to read would wait for a writer forever, so a test
whose check broke would hang the suite rather than fail: a watcher opens the write end whenever a reader waits on
the FIFO and closes it at once, so that reader sees an empty file and the test fails on its message."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path


def mkfifo(path: Path, watch_s: float = 120.0) -> None:
    """os.mkfifo(path), watched for `watch_s` seconds or until the path is gone."""
    os.mkfifo(path)

    def watch():
        end = time.monotonic() + watch_s
        while time.monotonic() < end:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a reader waited: it now reads end of file
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader yet; anything else: the FIFO is gone
                    return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
