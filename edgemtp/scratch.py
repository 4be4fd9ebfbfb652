"""Hidden working directories beside an output (a bundle or model directory being written, a GGUF's import),
and the ones a killed run left behind.

Output is written into a temporary directory and renamed into place at the end, so a failed or interrupted
run leaves no half-written result, and removes its temporary directory on the way out. A run killed outright
(SIGKILL, the OOM killer, a power cut) cannot: its directory, up to the model's size, would stay hidden
forever. So each run holds an advisory lock (flock) on its directory while it lives, which the kernel drops
when the process dies, and the next run making a directory of the same kind in the same place removes those
nobody holds. Only names of the exact shape this module makes are touched, and only a minute after they were
made: a directory is locked microseconds after its creation, but a run of another edgemtp version may not
lock at all. Without fcntl (Windows) no lock is taken and nothing is cleaned."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import EdgemtpError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_DIR_OPEN = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
GRACE_S = 60  # a directory younger than this may be a live run's that has not locked it yet
# bytes of an output's name that the hidden names beside it repeat: with the longest mark (".edgemtp-fp32-") and
# mkdtemp's 8 random characters they stay within the 255 bytes a name may have
KEPT = 200


def hidden_prefix(out: Path, mark: str = "") -> str:
    """`.NAME.MARK`: how the hidden names beside output `out` begin (held_dir's `prefix`). NAME is out's name, cut
    to its first KEPT bytes by whole characters: the whole of a name near the limit left no room for the rest
    (`File name too long`, naming a path the user never gave), and half a character is no name ONNX's C++ side
    can take."""
    name = Path(out).name
    while len(os.fsencode(name)) > KEPT:
        name = name[:-1]
    return f".{name}.{mark}"


@contextlib.contextmanager
def held_dir(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    """A new directory `parent/prefix + 8 random characters + suffix`, locked by this process until the block
    ends (the directory may be renamed meanwhile: the lock is on it, not its name). It is not removed here:
    the caller renames or removes it. Stale directories of the same name shape are removed first."""
    remove_stale(parent, prefix, suffix)
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    try:
        fd = _lock(path)
    except BaseException:  # no descriptor left to lock it with (EMFILE), Ctrl-C: nobody would remove it
        with contextlib.suppress(OSError):
            os.rmdir(path)  # still empty; rmtree would want a descriptor of its own
        raise
    try:
        yield path
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    """held_dir, removed when the block ends: tempfile.TemporaryDirectory's, but one a killed run left goes
    at the next run (a scratch export of minutes and gigabytes: the fp32 bundle an int4 export quantizes)."""
    with held_dir(parent, prefix, suffix) as path:
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def parents_made(out: Path) -> Iterator[None]:
    """Makes the directories missing above output `out`; if the block fails (an error, Ctrl-C, SIGTERM), removes
    them again, deepest first: `-o new1/new2/bundle` interrupted left an empty new1/new2 behind, its bundle gone.
    Only those this call made, and only while empty (rmdir): one holding something put there meanwhile stays,
    and so do those above it."""
    made = []
    try:
        _make_missing(reversed(Path(out).parents), made)  # the top one first
        yield
    except BaseException:
        _remove_while_empty(made)
        raise


@contextlib.contextmanager
def scratch_beside(out: Path, kind: str) -> Iterator[Path]:
    """A scratch directory beside output `out` (named after it: a killed run's goes at the next run writing the
    same output), with the directories missing above `out` made, and removed again if the block fails."""
    with parents_made(out), scratch_dir(Path(out).parent, hidden_prefix(out, f"edgemtp-{kind}-")) as path:
        yield path


def remove_stale(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Removes the directories in `parent` named as held_dir names them that no live process holds."""
    if fcntl is None:
        return []
    shape = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix))
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not shape.fullmatch(p.name) or p.is_symlink() or not p.is_dir() or os.path.ismount(p):
            continue
        try:
            if time.time() - p.stat().st_mtime < GRACE_S:
                continue
            fd = os.open(p, _DIR_OPEN)  # not through a symlink made since the check, nor a FIFO's open
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live run holds it
            continue
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


TRIES = 100  # made_and_locked's: each try after the first follows a run that removed the directory


@contextlib.contextmanager
def made_and_locked(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Directory `path`, made if missing (with those above it), held under an advisory lock while the block runs,
    waiting first for another process's (the kernel drops a lock when its process dies), and calling `waiting`
    before it waits: a wait of minutes said nothing. Without flock (Windows, some network file systems) the block
    runs unguarded. A symbolic link to a directory locks that directory: _DIR_OPEN's O_NOFOLLOW (there against a
    link swapped in for a directory being removed) refused a cache given as one.

    If the block fails, the directories this call made are removed again while empty, deepest first: quickstart
    interrupted before it wrote anything left an empty --workdir behind, and a packed cache's first build that
    failed an empty cache directory.

    They are removed only while the lock is held, and a run that waited for the lock checks, once it holds it,
    that `path` is still the directory it locked, else starts again: going on, it would write into a `path` made
    anew, beside a run that locked that one. So no run removes a directory another run holds or is about to
    write in. A run interrupted while it waits removes nothing, not even a `path` it made: the run it
    waits for locked it and works there. Without flock nothing is removed: nothing tells whether another run is
    about to write there. Directories above `path` are unguarded: one another run (not given `path`) is about to
    make something in may go, as parents_made's may."""
    said = False

    def say() -> None:  # once, however many tries
        nonlocal said
        if waiting is not None and not said:
            said = True
            waiting()

    for _ in range(TRIES):
        try:
            made = []
            _make_missing([*reversed(Path(path).parents), Path(path)], made)
            fd = _wait_for_lock(path, say)
        except FileNotFoundError:  # removed on the way by a run that failed
            continue
        if fd is None or _same_dir(fd, path):
            break
        os.close(fd)
    else:
        raise EdgemtpError(f"{path}: removed or replaced by another run each time this one took its lock")
    try:
        yield
    except BaseException:
        if fd is not None:
            _remove_while_empty(made)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _make_missing(dirs: Iterable[Path], made: list[Path]) -> None:
    """Makes those of `dirs` (each inside the one before) that are missing, adding each to `made` as it goes."""
    for p in dirs:
        if not p.is_dir():
            try:
                p.mkdir()
            except FileExistsError:  # made meanwhile by another run: not ours to remove
                if p.is_dir():
                    continue
                raise
            made.append(p)


def _remove_while_empty(made: list[Path]) -> None:
    """Removes the directories in `made` (each inside the one before), deepest first, stopping at one not empty."""
    for p in reversed(made):
        try:
            os.rmdir(p)
        except OSError:
            break


def _same_dir(fd: int, path: Path) -> bool:
    """Whether open directory `fd` is the one at `path` (through a symbolic link too)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _wait_for_lock(path: Path, waiting: Callable[[], None] | None) -> int | None:
    """made_and_locked's descriptor of `path`, locked; None without flock."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no flock on this file system
        os.close(fd)
        return None
    except BaseException:  # Ctrl-C while waiting
        os.close(fd)
        raise
    return fd


def _lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path, _DIR_OPEN)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: the run goes on, its directory just is not protected
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def as_open_makes(path: Path) -> None:
    """`path` given the mode open() (a file) or mkdir() (a directory) would give it: mkstemp, mkdtemp and
    safetensors (0.7+, through a private temporary file) make 0600 / 0700, which would keep a bundle, a
    drafter or a model directory from other users (a shared models directory)."""
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest path above it that exists: where making `path` would start. Where that is not a
    directory (a file), nothing can be made at or under `path`: mkdir says 'Not a directory' or 'File exists',
    naming a path the user may not have given."""
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def link_to_nothing(out: Path) -> Path | None:
    """The first of `out` and the directories above it that is a symbolic link to nothing (dangling, or a loop):
    nothing can be written there, and a run found out only at its end, renaming its result into place."""
    for p in (Path(out), *Path(out).parents):
        if p.is_symlink() and not p.exists():
            return p
    return None


def through_link(out: Path) -> Path:
    """The directory an output path names: where `out` is a symbolic link (models/current -> models/v3), the one it
    points to, so that an overwrite replaces that directory and the link stays. Replacing the link itself put the
    new directory in its place, left the old one where it was, and left the link aside for good."""
    return out.resolve() if out.is_symlink() and out.is_dir() else out


def replace_dir(new: Path, out: Path, prefix: str, suffix: str = "", overwrite: bool = True) -> None:
    """Renames directory `new` to `out`. A previous `out` is renamed aside first and removed last, so that a
    failure on the way (its files in use on Windows, a permission) leaves it whole: removed first, it could be
    left half removed. Aside it is named as held_dir(out.parent, prefix, suffix) names directories, so that one
    a killed run left there goes at the next run. Without `overwrite`, only an empty `out` is replaced.

    Another run given the same output may rename its own directory there at any moment, however late the
    caller checked: then this one fails with an EdgemtpError naming `out` (the rename, not a check, decides),
    the other run's output stays whole, and `new` is left for the caller to remove."""
    if not overwrite or not out.exists():
        try:
            if not overwrite:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(out)  # an empty directory: nobody's output (the rename refuses a non-empty one)
            os.replace(new, out)
        except OSError as e:
            raise _written_meanwhile(out, e, overwrite) from None
        return
    old = out.parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
    try:
        os.replace(out, old)
    except FileNotFoundError:  # moved aside by another run replacing it too, which puts its own there next
        raise _written_meanwhile(out, None, overwrite) from None
    try:
        os.replace(new, out)
    except BaseException:
        try:
            os.replace(old, out)  # back in its place
        except OSError:  # another run's output took its place: it replaced the old one, as this run would have
            shutil.rmtree(old, ignore_errors=True)
            raise _written_meanwhile(out, None, overwrite) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def place_file(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames file `tmp` (written whole beside `out`) to `out`. Without `overwrite` an `out` there is kept and this
    fails with an EdgemtpError naming it: the caller checked for one at its start, but another run given the same
    output may have written its own since (minutes of work), which a rename replaced without a word. A hard link
    fails if the name exists, where a check then a rename leaves a gap. `tmp` is gone either way."""
    try:
        if overwrite:
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)
        except FileExistsError as e:
            raise _written_meanwhile(out, e, overwrite) from None
        except OSError:  # no hard links on this file system (FAT, some network ones): a check, then the rename
            if os.path.lexists(out):
                raise _written_meanwhile(out, None, overwrite) from None
            os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _written_meanwhile(out: Path, error: OSError | None, overwrite: bool) -> Exception:
    """What a rename into `out` that failed with `error` says: another run's output there, or (another errno,
    not a race) the OSError itself."""
    if error is not None and error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        return error
    return EdgemtpError(f"{out}: written by another run meanwhile" + ("" if overwrite else
                                                                      " (use --overwrite to replace it)"))
