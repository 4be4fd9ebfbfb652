"""A run killed outright (SIGKILL) leaves its hidden working directory; the next run of the same kind in the
same place removes it, and never one a live run holds (edgemtp/scratch.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgemtp import scratch
from edgemtp.exporters import export

posix = pytest.mark.skipif(scratch.fcntl is None, reason="no flock: nothing is cleaned (Windows)")


def _age(path, seconds=2 * scratch.GRACE_S):
    t = time.time() - seconds
    os.utime(path, (t, t))


@posix
def test_only_unheld_old_directories_of_the_shape_go(tmp_path):
    dead = tmp_path / ".b.partial-abcd_123"
    young = tmp_path / ".b.partial-young123"
    other = tmp_path / ".bb.partial-abcd_123"  # another output's
    unlike = tmp_path / ".b.partial-abc"  # not a name held_dir makes
    for d in (dead, young, other, unlike):
        d.mkdir()
        (d / "weights").write_bytes(b"x")
    for d in (dead, other, unlike):
        _age(d)
    with scratch.held_dir(tmp_path, ".b.partial-") as live:  # making one removes the dead one first
        assert not dead.exists()
        _age(live)
        assert scratch.remove_stale(tmp_path, ".b.partial-") == []
        assert live.is_dir() and young.is_dir() and other.is_dir() and unlike.is_dir()
    # once its holder is done (it would have renamed or removed it), an old one is fair game
    assert scratch.remove_stale(tmp_path, ".b.partial-") == [live]
    # the shapes of an import's directory and of `export FILE.gguf`'s scratch
    imp, gguf = tmp_path / ".m.abcdefgh.partial", tmp_path / ".b.edgemtp-gguf-abcdefgh"
    for d in (imp, gguf):
        d.mkdir()
        _age(d)
    assert scratch.remove_stale(tmp_path, ".m.", ".partial") == [imp]
    assert scratch.remove_stale(tmp_path, ".b.edgemtp-gguf-") == [gguf]


@posix
def test_a_killed_export_is_cleaned_by_the_next(tiny_gemma3, tmp_path):
    """SIGKILL halfway through writing the graph (no handler runs): the partial bundle stays, locked by
    nobody; the next export to the same place removes it and writes its bundle."""
    model_dir = tiny_gemma3[1]
    code = textwrap.dedent(f"""
        import os, signal
        from edgemtp.exporters import builder, export
        real_save = builder.save
        def dying_save(b, path, read, progress=None, read_rows=None):
            def read_then_die(name):
                if "layers.1" in name:
                    os.kill(os.getpid(), signal.SIGKILL)
                return read(name)
            return real_save(b, path, read_then_die, progress)
        builder.save = dying_save
        export({str(model_dir)!r}, {str(tmp_path / "out")!r}, capacity=64)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".out.partial-") and any(left[0].iterdir())
    export(model_dir, tmp_path / "out", capacity=64)  # a minute later it would be removed ...
    assert left[0].is_dir()  # ... not before: a live run may not have locked its new directory yet
    _age(left[0])
    export(model_dir, tmp_path / "out2", capacity=64)  # another output's run leaves it alone
    assert left[0].is_dir()
    export(model_dir, tmp_path / "out", capacity=64, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2"]


@posix
def test_a_killed_quantized_export_is_cleaned_by_the_next(tiny_gemma3, tmp_path):
    """SIGKILL while an int8 export calibrates: besides the bundle's directory it leaves the fp32 bundle it
    quantizes (the whole model in fp32, 18 GB at E2B scale) and the calibration's int8 copy. Each is held
    like the bundle's, so the next quantized export to the same output removes them (tempfile's, before,
    stayed for good)."""
    model_dir = tiny_gemma3[1]
    code = textwrap.dedent(f"""
        import os, signal
        from edgemtp.exporters import export, quantize
        def dying_quantize_graph(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        quantize.quantize_graph = dying_quantize_graph
        export({str(model_dir)!r}, {str(tmp_path / "out")!r}, "int8", capacity=64, drafter=None)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    left = list(tmp_path.iterdir())
    assert sorted(p.name.rsplit("-", 1)[0] for p in left) == [".out.edgemtp-fp32", ".out.partial"], left
    for p in left:
        _age(p)
    export(model_dir, tmp_path / "out", "int8", capacity=64, drafter=None)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@posix
def test_a_directory_that_cannot_be_locked_is_not_left(tmp_path):
    """Out of file descriptors (a long-lived process at its limit): making the directory works, opening it
    to lock it does not. The export fails, and leaves nothing behind (the directory was left, unheld)."""
    code = textwrap.dedent(f"""
        import os, resource
        from edgemtp.bundle import atomic_dir
        from edgemtp.errors import EdgemtpError
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fds = []
        try:
            while True:
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            with atomic_dir({str(tmp_path / "out")!r}):
                raise SystemExit("written")
        except EdgemtpError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "cannot write a bundle" in r.stdout, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


@posix
def test_an_export_from_gguf_removes_only_its_own_outputs_scratch(tmp_path, monkeypatch):
    """`export FILE.gguf -o OUT`'s scratch is named after OUT: the next run writing OUT removes the one a
    killed run left; a run writing another output in the same directory leaves the others' alone. One
    named as before (`.edgemtp-gguf-` and 8 random characters) may be the live scratch of an edgemtp that
    took no lock, exporting from it for minutes without touching it: an unlocked, old directory like a
    dead run's."""
    from edgemtp import gguf_import
    from edgemtp.cli.build import model_source

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setattr(gguf_import, "import_gguf", lambda path, out, progress=None: out.mkdir() or out)
    dead = tmp_path / ".out.edgemtp-gguf-abcdefgh"
    others = [tmp_path / ".b.edgemtp-gguf-abcdefgh", tmp_path / ".edgemtp-gguf-abcdefgh"]
    for d in (dead, *others):
        d.mkdir()
        _age(d)
    with model_source(gguf, tmp_path / "out") as source:
        assert source.parent.name.startswith(".out.edgemtp-gguf-") and not dead.exists()
    assert sorted(tmp_path.iterdir()) == sorted([gguf, *others])


def test_an_output_named_near_the_file_systems_limit_is_written(tiny_gemma3, tmp_path):
    """A name may have 255 bytes; the hidden directories beside an output repeated the whole name and added up to
    23 bytes, so a bundle, an imported model or a profile's trace named with 233 to 255 bytes failed with `File
    name too long`, naming a temporary path the user never gave. They repeat its first bytes only. Cut by whole
    characters: 'é' is two bytes, and a half one would be no name ONNX's C++ side can take."""
    from edgemtp import bundle
    from edgemtp.runtime.profile_report import into_place

    name = "x" + "é" * 127  # 255 bytes
    assert len(os.fsencode(name)) == 255
    for quant, options in (("fp32", None), ("int8", {"calibration": None})):
        out = export(tiny_gemma3[1], tmp_path / quant / name, quant, capacity=64, quant_options=options)
        assert bundle.load(out).graph("target").quant == quant
        assert os.listdir(tmp_path / quant) == [name]  # nothing hidden left beside it
    into_place(tmp_path / name, lambda path: Path(path).write_text("trace"))
    assert (tmp_path / name).read_text() == "trace"
    prefix = scratch.hidden_prefix(tmp_path / name, "edgemtp-fp32-")
    assert prefix == "." + "x" + "é" * 99 + ".edgemtp-fp32-" and len(os.fsencode(prefix)) <= 255 - 8


def test_a_trace_whose_name_has_a_long_suffix_is_written(tmp_path):
    """into_place's temporary name ends with the output's suffix (matplotlib reads the format from it): a name
    near the limit with an early dot ('run.1-' and 240 more bytes: all of it after the dot is the suffix) still
    failed `File name too long` naming the temporary path. A suffix too long to fit is no format; it is left out."""
    from edgemtp.runtime.profile_report import into_place

    for name in ("run.1-" + "x" * 240, "y" * 240 + ".json"):
        into_place(tmp_path / name, lambda path: Path(path).write_text(name))
        assert (tmp_path / name).read_text() == name
    assert sorted(os.listdir(tmp_path)) == sorted(["run.1-" + "x" * 240, "y" * 240 + ".json"])


def test_parents_made_are_removed_when_the_run_fails(tmp_path):
    """`-o new1/new2/bundle` interrupted (Ctrl-C, SIGTERM, an error) left the empty new1/new2 it had made behind;
    the bundle itself was gone. The directories the run made go again, deepest first; one that was there
    before stays, and so does one holding something else meanwhile (and those above it)."""
    (tmp_path / "old").mkdir()
    out = tmp_path / "old" / "new1" / "new2" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with scratch.parents_made(out):
            assert out.parent.is_dir() and not out.exists()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == []
    with pytest.raises(ValueError):
        with scratch.parents_made(out):
            (out.parent.parent / "notes.txt").write_text("someone's")
            raise ValueError
    assert os.listdir(tmp_path / "old" / "new1") == ["notes.txt"]
    with scratch.parents_made(out):  # a run that succeeds keeps them
        out.mkdir()
    assert out.is_dir()


def _other_run_lands(monkeypatch, out, at_call):
    """os.replace, with another run's directory renamed to `out` just before this run's `at_call`-th rename."""
    real, calls = os.replace, []

    def replace(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == at_call:
            other = out.parent / "theirs"
            other.mkdir()
            (other / "edgemtp.json").write_text("theirs")
            real(other, out)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("existing", [False, True])
def test_two_runs_renaming_into_one_output_leave_one_whole_and_say_so(tmp_path, monkeypatch, existing):
    """Two runs given one -o finish at the same moment: the one whose rename came second failed with a raw
    OSError (ENOTEMPTY: a traceback from import-gguf, 'is it in use?' from export, naming a hidden directory),
    and left the earlier output renamed aside. It is one error naming the output, the other run's result stays
    whole, and nothing hidden is left."""
    from edgemtp.errors import EdgemtpError

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "edgemtp.json").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "edgemtp.json").write_text("mine")
    _other_run_lands(monkeypatch, out, 2 if existing else 1)  # between moving the old aside and renaming in
    with pytest.raises(EdgemtpError, match=f"^{out}: written by another run meanwhile"):
        scratch.replace_dir(new, out, ".out.old-")
    monkeypatch.undo()
    shutil.rmtree(new)  # the caller's to remove
    assert (out / "edgemtp.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # this run's old output moved aside: gone too


def test_an_output_moved_aside_by_another_run_meanwhile_is_said_so(tmp_path, monkeypatch):
    """The other run moved the old output aside between this run's check that it exists and its own move: a
    FileNotFoundError naming the output ('No such file or directory' for a path the user just saw)."""
    from edgemtp.errors import EdgemtpError

    out = tmp_path / "out"
    out.mkdir()
    (out / "edgemtp.json").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    real = os.replace

    def replace(src, dst, **kwargs):
        if src == out and (out / "edgemtp.json").read_text() == "old":
            real(out, tmp_path / ".theirs-old")  # their move aside, just before ours
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(EdgemtpError, match=f"^{out}: written by another run meanwhile"):
        scratch.replace_dir(new, out, ".out.old-")
    monkeypatch.undo()
    assert new.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == [".theirs-old", "new"]


def test_without_overwrite_only_an_empty_output_is_replaced(tmp_path):
    from edgemtp.errors import EdgemtpError

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    (new / "mine").write_text("x")
    scratch.replace_dir(new, out, ".out.old-", overwrite=False)  # empty: taken
    assert [p.name for p in out.iterdir()] == ["mine"]
    new.mkdir()
    with pytest.raises(EdgemtpError, match=f"^{out}: written by another run meanwhile \\(use --overwrite"):
        scratch.replace_dir(new, out, ".out.old-", overwrite=False)
    assert [p.name for p in out.iterdir()] == ["mine"] and sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_a_file_placed_without_overwrite_never_replaces_one_put_there_meanwhile(tmp_path):
    """A single output file (cluster's head.safetensors) is checked for at the run's start, minutes before it is
    written: another run given the same -o may have written its own since. Without --overwrite, that one stays
    and this run says so, naming the file; its temporary file is removed."""
    from edgemtp.errors import EdgemtpError

    out = tmp_path / "head.safetensors"
    tmp = tmp_path / ".head.tmp"
    tmp.write_bytes(b"mine")
    scratch.place_file(tmp, out, overwrite=False)  # nothing there: placed
    assert out.read_bytes() == b"mine" and not tmp.exists()
    tmp.write_bytes(b"second")
    with pytest.raises(EdgemtpError, match=f"^{out}: written by another run meanwhile \\(use --overwrite"):
        scratch.place_file(tmp, out, overwrite=False)
    assert out.read_bytes() == b"mine" and not tmp.exists()
    tmp.write_bytes(b"second")
    scratch.place_file(tmp, out, overwrite=True)
    assert out.read_bytes() == b"second" and not tmp.exists()


def _run_in_thread(path, events, waiting=None, fail=False):
    """A thread holding made_and_locked(path): sets events["holds"], waits for events["go"], then ends (raising
    KeyboardInterrupt with `fail`, a Ctrl-C)."""
    import threading

    def body():
        with contextlib.suppress(KeyboardInterrupt), scratch.made_and_locked(path, waiting=waiting):
            events["holds"].set()
            events["go"].wait(30)
            if fail:
                raise KeyboardInterrupt

    thread = threading.Thread(target=body)
    thread.start()
    return thread


@posix
def test_a_run_that_waited_for_one_that_removed_the_directory_holds_the_one_there(tmp_path):
    """made_and_locked: run A made `path` and fails before writing there, so it removes it (and new/ above it)
    under its lock, while run B waits for that lock. B then held a lock on a directory no longer at `path`:
    going on, it would make `path` again through its writes, and a run C arriving then would lock that one and
    work beside B. B takes the lock again, on the directory at `path`, which it made: C waits for B."""
    import threading

    path = tmp_path / "new" / "work"
    a = {"holds": threading.Event(), "go": threading.Event()}
    b = {"holds": threading.Event(), "go": threading.Event()}
    b_waits = threading.Event()
    threads = [_run_in_thread(path, a, fail=True)]
    try:
        assert a["holds"].wait(30)
        threads.append(_run_in_thread(path, b, waiting=b_waits.set))
        assert b_waits.wait(30)
        a["go"].set()
        assert b["holds"].wait(30)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # B holds the directory at `path`
                scratch.fcntl.flock(fd, scratch.fcntl.LOCK_EX | scratch.fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        a["go"].set()
        b["go"].set()
        for thread in threads:
            thread.join(30)
    assert path.is_dir()  # B succeeded: kept


@posix
def test_made_and_locked_removes_only_what_it_made_and_only_under_its_lock(tmp_path, monkeypatch):
    """A directory that was there (a user's empty --workdir, or a symbolic link to one) stays when the block
    fails, and a link's directory is the one locked. Without flock (Windows) the directories made stay: nothing
    tells whether another run is about to write there."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    for path in (tmp_path / "mine", tmp_path / "link"):
        with pytest.raises(KeyboardInterrupt), scratch.made_and_locked(path):
            fd = os.open(tmp_path / "mine", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    scratch.fcntl.flock(fd, scratch.fcntl.LOCK_EX | scratch.fcntl.LOCK_NB)
            finally:
                os.close(fd)
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["link", "mine"] and os.listdir(tmp_path / "mine") == []
    monkeypatch.setattr(scratch, "fcntl", None)
    with pytest.raises(KeyboardInterrupt), scratch.made_and_locked(tmp_path / "new" / "work"):
        raise KeyboardInterrupt
    assert (tmp_path / "new" / "work").is_dir()


def test_nearest_existing_is_where_making_a_path_starts(tmp_path):
    """writable_dir's and check_packed_cache's walk up a path to the first part of it there: a directory (making
    the rest can start), or a file (nothing can be made at or under it)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, want in ((tmp_path, tmp_path), (tmp_path / "new" / "deeper", tmp_path), (afile, afile),
                       (afile / "under" / "it", afile)):
        assert scratch.nearest_existing(path) == want
