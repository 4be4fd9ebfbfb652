"""The bundle files whose sha256 this machine has already checked, so that loading an unchanged bundle again
reads no file whole (Gemma 3 270M fp32: 1.3 GB hashed in 3.9-8 s of a load that otherwise takes 0.1 s, on
the 2-core VM).

A file is known by where it lives (device, inode) and by what any write changes: size, mtime and ctime. A
program can set mtime back (utime) but not ctime, so a file written after its check, whatever its mtime
says, is unknown again and hashed anew. A file whose ctime is under RACY_NS old is not remembered: on a
file system with coarse timestamps a write in the same tick would leave all three unchanged (git's "racy
clean" files). Its age counts to when the check began, not ended: a write in the ctime's tick into bytes
the hash has already read matches, and hashing a large file takes longer than RACY_NS. The record is one
small JSON file in the user's cache directory; where it cannot be read or written, nothing is remembered
and every load hashes, as before."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

RACY_NS = 2_000_000_000
MAX_FILES = 512  # the most recently checked; an older one is hashed again


def cache_dir() -> Path | None:
    """edgemtp's cache directory (this record, quickstart's model and bundle, the default model's GGUF, the
    drafter's corpora): $XDG_CACHE_HOME/edgemtp, else ~/.cache/edgemtp; None with neither (no home: a service
    account). A relative XDG_CACHE_HOME is ignored, as the XDG specification says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = Path.home() / ".cache"
        except RuntimeError:
            return None
    return Path(base) / "edgemtp"


def record_path() -> Path | None:
    """None where there is no cache directory, and on Windows, whose st_ctime is the creation time: a write
    there does not change it, so a file edited with its mtime put back would pass."""
    if os.name == "nt":
        return None
    cache = cache_dir()
    return None if cache is None else cache / "verified.json"


def stamp(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Record:
    """Read at a bundle load's start; `known` asks, `add` notes a file just hashed, `save` writes the additions
    into the record as it is then."""

    def __init__(self):
        self.path = record_path()
        self.files = self._read()
        self.added = {}  # what this load checked, for save
        self.began = time.time_ns()  # before any file is hashed (add's racy check)

    def _read(self) -> dict:
        try:
            files = json.loads(self.path.read_text(encoding="utf-8")).get("files", {}) if self.path else {}
            return files if isinstance(files, dict) else {}
        except (OSError, ValueError, AttributeError, RecursionError):  # none yet, unreadable, not ours: afresh
            return {}

    def known(self, path: Path, st: os.stat_result, sha256: str) -> bool:
        return self.files.get(_name(path)) == [*stamp(st), sha256]

    def add(self, path: Path, st: os.stat_result, sha256: str) -> None:
        """`st`: the file's stat from before it was hashed; a file written meanwhile is not remembered."""
        if stamp(os.stat(path)) != stamp(st) or self.began - st.st_ctime_ns < RACY_NS:
            return
        name = _name(path)
        self.added.pop(name, None)  # re-inserted last: save puts the newest last, and MAX_FILES keeps those
        self.files[name] = self.added[name] = [*stamp(st), sha256]

    def save(self) -> None:
        if not self.added or self.path is None:
            return
        import fcntl  # here: POSIX only, and there is no record on Windows (record_path)

        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.parent / ".verified.lock", "a") as lock:
                # one save at a time, each merging into the record as it is now: another process loading
                # meanwhile (a load hashes for seconds) wrote its own checks, which this load's view lacks
                fcntl.flock(lock, fcntl.LOCK_EX)  # let go when closed
                files = self._read()
                for name, entry in self.added.items():
                    files.pop(name, None)
                    files[name] = entry
                files = dict(list(files.items())[-MAX_FILES:])
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verified-", suffix=".json")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"files": files}, f)
                os.replace(tmp, self.path)  # a reader sees the old record or the new one, never half of one
                tmp = None
        except OSError:
            pass  # nothing remembered: the next load hashes again
        finally:  # after an OSError, Ctrl-C or SIGTERM's exit too: else it stays in the cache directory for good
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _name(path: Path) -> str:
    return str(Path(path).resolve())
