"""The fp32 head table read through our own mapping of the data file on 2 MB pages (runtime/head_pages.py):
the file's bytes, on 2 MB pages where the file system allows, given to every graph that names them, with the
same numbers as ONNX Runtime's own mappings give."""

from __future__ import annotations

import io
import mmap
import os
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edgemtp import bundle as bundle_mod
from edgemtp.errors import EdgemtpError
from edgemtp.runtime import head_pages as HP
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.requests import Draft
from edgemtp.runtime.session import make_session
from edgemtp.runtime.target import Target

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
TABLE = "model.embed_tokens.weight.T"


@pytest.fixture(scope="module")
def mtp_bundle(tiny_gemma3, tmp_path_factory):
    """The tiny Gemma 3 bundle (fp32: a transposed head, a batched verify graph) with a tiny MTP drafter."""
    from edgemtp.drafter import export as X

    from .test_drafter import tiny_drafter

    root = tmp_path_factory.mktemp("head_pages")
    tiny_drafter(tiny_gemma3[1], root / "drafter")
    shutil.copytree(tiny_gemma3[2], root / "bundle")
    X.add_to_bundle(root / "bundle", root / "drafter")
    return root / "bundle"


@pytest.fixture
def thp(monkeypatch):
    """Tables mapped whatever this machine's THP setting (on 4 KB pages where THP is off); Linux only (elsewhere
    mmap has no MADV_HUGEPAGE, and huge_pages_available keeps the runtime from asking)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("transparent huge pages are Linux's")
    monkeypatch.setattr(HP, "huge_pages_available", lambda: True)


def _small_folios(path) -> None:
    """The file's page cache refilled through a mapping that may not use huge pages (4 KB folios)."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        np.frombuffer(m, np.uint8)[::mmap.PAGESIZE].sum()
        del m


@linux
def test_a_mapped_table_is_the_file_s_bytes_on_2mb_pages(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "w.data"
    path.write_bytes(data)
    offset, length = 12345, 10 << 20  # off any page boundary, as a table in a data file may be
    _small_folios(path)
    table = HP.map_on_huge_pages(path, offset, length)
    assert table.tobytes() == data[offset:offset + length] and not table.flags.writeable
    if HP.huge_pages_available():
        base = table.ctypes.data - offset
        first, last = -(-offset // HP.HUGE_PAGE) * HP.HUGE_PAGE, (offset + length) // HP.HUGE_PAGE * HP.HUGE_PAGE
        on_huge = HP.pmd_mapped(base + first, base + last)
        if on_huge == 0:
            pytest.skip("this file system keeps no 2 MB folios (large folios: ext4 / xfs on Linux 6.x)")
        assert on_huge >= HP.ENOUGH * (last - first)  # read again in 2 MB folios, though cached in 4 KB ones
    with pytest.raises(EdgemtpError, match=r"w\.data: 12582912 bytes, and its graph reads a table up to byte"):
        HP.map_on_huge_pages(path, 4 << 20, 10 << 20)
    path.write_bytes(b"")  # mmap refuses an empty file (ValueError): the file is named all the same
    with pytest.raises(EdgemtpError, match=r"w\.data: 0 bytes, and its graph reads a table up to byte 4096$"):
        HP.map_on_huge_pages(path, 0, 4096)


@linux
def test_a_failed_mapping_is_closed(tmp_path, monkeypatch):
    """A file shortened between its size's check and its mapping, or a madvise / fault_in that fails: the error
    is raised and the mapping closed (it was left to whoever dropped the error's traceback)."""
    path = tmp_path / "w.data"
    path.write_bytes(bytes(3 << 20))
    made, real_mmap = [], mmap.mmap

    def shrinking_mmap(fd, length, **kwargs):  # the file shortened by another process after the size's check
        os.truncate(path, 1 << 20)
        made.append(real_mmap(fd, length, **kwargs))
        return made[-1]

    monkeypatch.setattr(HP.mmap, "mmap", shrinking_mmap)
    with pytest.raises(EdgemtpError, match=r"w\.data: 1048576 bytes, and its graph reads a table up to byte"):
        HP.map_on_huge_pages(path, 0, 2 << 20)
    assert made[-1].closed

    def recording_mmap(fd, length, **kwargs):
        made.append(real_mmap(fd, length, **kwargs))
        return made[-1]

    def fail(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(HP.mmap, "mmap", recording_mmap)
    monkeypatch.setattr(HP, "fault_in", fail)
    with pytest.raises(OSError):
        HP.map_on_huge_pages(path, 0, 4096)
    assert made[-1].closed


def test_only_the_gemv_table_is_mapped_and_every_graph_naming_it_gets_it(mtp_bundle, tiny_gemma3, tmp_path, thp):
    b = bundle_mod.load(mtp_bundle)
    tables = HP.HeadTables.load(b)
    vocab, hidden = b.model["vocab_size"], b.model["hidden_size"]
    ((location, offset, length),) = tables.tables
    assert location == "target.onnx.data" and length == 4 * vocab * hidden
    assert set(tables.initializers("target")) == {TABLE, TABLE + ".gemv"}
    assert set(tables.initializers("verify")) == {TABLE, TABLE + ".gemv"}
    assert set(tables.initializers("drafter")) == {TABLE}  # its exact-scored candidates' columns
    assert tables.initializers("no such graph") == {}
    value = tables.initializers("target")[TABLE].numpy()
    on_disk = np.fromfile(mtp_bundle / location, np.float32, vocab * hidden, offset=offset)
    np.testing.assert_array_equal(value, on_disk.reshape(hidden, vocab))
    # none to map: a quantized bundle's head is no GEMV over an fp32 table
    from edgemtp.exporters import export

    int8 = export(tiny_gemma3[1], tmp_path / "int8", quant="int8", capacity=64)
    assert HP.HeadTables.load(bundle_mod.load(int8)) is None


def test_a_graph_reading_the_table_s_bytes_as_another_shape_is_not_given_it(mtp_bundle, tmp_path, thp):
    """The verify graph naming the table's bytes as [V, H] (ONNX Runtime would take a [H, V] value for it and
    fail at the first run, or give wrong numbers where the shapes still multiply) keeps its own reading."""
    import hashlib
    import json

    import onnx

    copy = tmp_path / "bundle"
    shutil.copytree(mtp_bundle, copy)
    model = onnx.load(str(copy / "target_verify.onnx"), load_external_data=False)
    (table,) = [t for t in model.graph.initializer if t.name == TABLE]
    table.dims[:] = list(reversed(table.dims))
    onnx.save(model, str(copy / "target_verify.onnx"))
    manifest = json.loads((copy / "edgemtp.json").read_text())
    data = (copy / "target_verify.onnx").read_bytes()
    manifest["files"]["target_verify.onnx"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "edgemtp.json").write_text(json.dumps(manifest))
    tables = HP.HeadTables.load(bundle_mod.load(copy))
    assert set(tables.initializers("verify")) == {TABLE + ".gemv"}
    assert set(tables.initializers("target")) == {TABLE, TABLE + ".gemv"}


@linux
def test_none_without_huge_pages_or_when_asked_or_unmappable(mtp_bundle, monkeypatch):
    monkeypatch.setattr(HP, "huge_pages_available", lambda: False)
    assert Engine.load(mtp_bundle, verify=False).head_tables is None
    monkeypatch.setattr(HP, "huge_pages_available", lambda: True)
    plain = Engine.load(mtp_bundle, verify=False, head_huge_pages=False)  # ONNX Runtime's own mappings
    assert plain.head_tables is None
    want = plain.generate("t3 t9 t4 t1", max_new_tokens=8).tokens
    assert len(want) == 8 and len(set(want)) > 1
    assert Engine.load(mtp_bundle, verify=False).head_tables is not None

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on a file system that cannot map files

    monkeypatch.setattr(HP.mmap, "mmap", refuse)
    engine = Engine.load(mtp_bundle, verify=False)  # ONNX Runtime then reads the table as it can
    assert engine.head_tables is None and engine.generate("t3 t9 t4 t1", max_new_tokens=8).tokens == want

    def too_large(*args, **kwargs):
        raise OverflowError("memory mapped length must be positive")  # a file past a 32-bit address space

    monkeypatch.setattr(HP.mmap, "mmap", too_large)
    assert Engine.load(mtp_bundle, verify=False).head_tables is None


def test_a_session_reads_the_initializers_it_is_given_in_place(mtp_bundle):
    """make_session's `initializers`: ONNX Runtime reads the given memory itself (a column zeroed in it zeroes
    that token's logit in the one-row GEMV pass), not a copy taken at load."""
    b = bundle_mod.load(mtp_bundle)
    contract = b.target_contract
    ((_, offset, length),) = [HP._key(e) for n, e in b.facts["target"].external.items() if n == TABLE + ".gemv"]
    dims = b.facts["target"].inputs[TABLE + ".gemv"]
    own = np.fromfile(  # a writable copy (the mapped tables are read-only)
        mtp_bundle / "target.onnx.data", np.float32, length // 4, offset=offset).reshape(dims)
    value = ort.OrtValue.ortvalue_from_numpy(own)
    target = Target(make_session(b.graph("target").path, initializers={TABLE + ".gemv": value}), contract)
    ids = np.array([[2, 17, 40, 9]])
    cache = target.new_cache(1)
    target.forward(ids, cache)
    before = target.forward(np.array([[21]]), cache)[0]
    own[:, 50] = 0.0
    cache = target.new_cache(1)
    target.forward(ids, cache)
    after = target.forward(np.array([[21]]), cache)[0]
    assert before[0, -1, 50] != 0.0 and after[0, -1, 50] == 0.0
    np.testing.assert_array_equal(np.delete(before, 50, axis=-1), np.delete(after, 50, axis=-1))


def test_engines_reading_the_mapped_table_compute_what_onnx_runtime_s_mappings_give(mtp_bundle, thp):
    """Target steps and multi-row passes, batched verify and MTP drafting: the same numbers, token for token;
    each session was given the table under each name its graph has for it."""
    engines = [Engine.load(mtp_bundle, verify=False, head_huge_pages=on, mtp=True) for on in (True, False)]
    assert engines[0].head_tables is not None and engines[1].head_tables is None
    ids = np.array([[2, 17, 40, 9, 33, 5]])
    out = []
    for e in engines:
        cache = e.target.new_cache(1)
        prefill = e.target.forward(ids, cache, n_logits=6)[0]
        step, hidden = e.target.forward(np.array([[21]]), cache)
        # the drafter's own numbers (greedy output is the target's whatever the drafter reads)
        guess = e._mtp_drafter().draft(step[:, -1].argmax(-1), hidden[:, -1], cache, slice(0, 1), 3)
        # the batched verify graph, on the tiny tokenizer's words ("a b c" is all unknown tokens: 0s in, 0s out
        # whatever the head reads)
        rows = e.generate_batch(["t3 t9 t4 t1", "t5 t6 t7 t5 t6"], max_new_tokens=12, draft=Draft("mtp", 3))
        drafted = e.generate("t5 t6 t7 t5 t6 t7 t5 t6", max_new_tokens=16, draft=Draft("mtp", 3))
        out.append((prefill, step, guess, [r.tokens for r in rows], drafted.tokens))
        assert all(r.stats.drafted > 0 for r in rows) and drafted.stats.drafted > 0
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_array_equal(out[0][2][0], out[1][2][0])
    np.testing.assert_array_equal(out[0][2][1], out[1][2][1])
    assert out[0][3:] == out[1][3:] and all(len(set(t)) > 1 for t in (*out[1][3], out[1][4]))
    engine = engines[0]
    for session, names in ((engine.target.session, {TABLE, TABLE + ".gemv"}),
                           (engine.target._verify_target().session, {TABLE, TABLE + ".gemv"}),
                           (engine._mtp_drafter().session, {TABLE})):
        assert set(session.edgemtp_initializers) == names


@linux
def test_the_real_model_s_table_is_mapped_once(gemma3_270m_bundle):
    """Gemma 3 270M: ONNX Runtime maps no 671 MB table of its own (it mapped it once per name before), ours
    sits on 2 MB pages where this file system allows, and the logits are those of ONNX Runtime's mappings."""
    if not HP.huge_pages_available():
        pytest.skip("transparent huge pages are off here")
    data = (gemma3_270m_bundle / "target.onnx.data").resolve()
    logits = []
    for on in (True, False):
        engine = Engine.load(gemma3_270m_bundle, threads=2, verify=False, mtp=False, head_huge_pages=on)
        cache = engine.target.new_cache(1)
        engine.target.forward(np.array([[2, 818, 5279, 529, 7001, 563]]), cache)
        logits.append(engine.target.forward(np.array([[9079]]), cache)[0])
        big = [m for m in _mappings(data) if m[1] - m[0] >= 600 << 20]  # the table's: 671 MB
        assert len(big) == (1 if on else 2)  # ours, or ONNX Runtime's: one per name of the table
        if on:  # on 2 MB pages, but for the two pieces at its ends (none where the file system cannot)
            on_huge = HP.pmd_mapped(*big[0])
            assert on_huge == 0 or on_huge >= (big[0][1] - big[0][0]) // HP.HUGE_PAGE * HP.HUGE_PAGE - 2 * HP.HUGE_PAGE
        del engine, cache
    np.testing.assert_array_equal(logits[0], logits[1])


def _mappings(path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of the file."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                out.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return out


def test_pmd_mapped_sums_the_mappings_overlapping_the_range(monkeypatch):
    """smaps' FilePmdMapped of the mappings overlapping [start, end) only; a blank line is passed over."""
    smaps = ("1000-3000 r--s 00000000 08:01 12 /data\n"
             "FilePmdMapped:      2048 kB\n"
             "\n"
             "3000-5000 r--s 00002000 08:01 12 /data\n"
             "FilePmdMapped:      4096 kB\n"
             "9000-a000 r--p 00000000 08:01 13 /other\n"
             "FilePmdMapped:      8192 kB\n")
    monkeypatch.setattr(HP, "open", lambda *_, **__: io.StringIO(smaps), raising=False)
    assert HP.pmd_mapped(0x2000, 0x4000) == (2048 + 4096) * 1024
    assert HP.pmd_mapped(0x3000, 0x9000) == 4096 * 1024
    assert HP.pmd_mapped(0x5000, 0x9000) == 0


def test_pmd_mapped_reads_smaps_whatever_the_mapped_files_are_named(monkeypatch):
    """smaps names each mapped file by its bytes: one whose name is not UTF-8 made every count 0 (the table
    then read again from the disk to no end)."""
    smaps = (b"1000-3000 r--s 00000000 08:01 12 /data\n"
             b"FilePmdMapped:      2048 kB\n"
             b"9000-a000 r--p 00000000 08:01 13 /caf\xe9\n"
             b"FilePmdMapped:      8192 kB\n")
    monkeypatch.setattr(HP, "open", lambda _, **kw: io.TextIOWrapper(io.BytesIO(smaps), **kw), raising=False)
    assert HP.pmd_mapped(0x1000, 0xa000) == (2048 + 8192) * 1024
