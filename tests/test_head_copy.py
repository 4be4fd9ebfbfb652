"""The fp32 head table copied onto 2 MB pages (runtime/head_copy.py): the file's bytes, on huge pages, read by
every graph that names them, with the same numbers as the data file's mapping gives."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from edgemtp import bundle as bundle_mod
from edgemtp.errors import EdgemtpError
from edgemtp.runtime import head_copy as HC
from edgemtp.runtime.engine import Engine
from edgemtp.runtime.requests import Draft

from .test_hugepages import _huge_bytes

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


@pytest.fixture(scope="module")
def mtp_bundle(tiny_gemma3, tmp_path_factory):
    """The tiny Gemma 3 bundle (fp32: a transposed head, a batched verify graph) with a tiny MTP drafter."""
    from edgemtp.drafter import export as X

    from .test_drafter import tiny_drafter

    root = tmp_path_factory.mktemp("head_copy")
    tiny_drafter(tiny_gemma3[1], root / "drafter")
    shutil.copytree(tiny_gemma3[2], root / "bundle")
    X.add_to_bundle(root / "bundle", root / "drafter")
    return root / "bundle"


@pytest.fixture
def thp(monkeypatch):
    """Copies made whatever this machine's THP setting (they are then on 4 KB pages where THP is off)."""
    monkeypatch.setattr(HC, "huge_pages_available", lambda: True)


@linux
def test_the_copy_is_the_file_s_bytes_on_huge_pages(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "w.data"
    path.write_bytes(data)
    offset, length = 12345, 7 << 20  # off any page boundary, as a table in a data file may be
    copy = HC.read_on_huge_pages(path, offset, length)
    assert copy.tobytes() == data[offset:offset + length]
    if HC.huge_pages_available():  # from a 2 MB boundary on: all but the last partial huge page
        assert _huge_bytes(copy.ctypes.data, length) >= length - HC.HUGE_PAGE
    with pytest.raises(EdgemtpError, match=r"w\.data: ends at byte 9437184, inside a table its graph reads up to byte"):
        HC.read_on_huge_pages(path, 4 << 20, 6 << 20)


def test_only_the_gemv_table_is_copied_and_every_graph_naming_it_gets_it(mtp_bundle, tiny_gemma3, tmp_path, thp):
    b = bundle_mod.load(mtp_bundle)
    copies = HC.HeadCopies.load(b)
    vocab, hidden = b.model["vocab_size"], b.model["hidden_size"]
    assert len(copies.copies) == 1
    ((location, offset, length),) = copies.copies
    assert location == "target.onnx.data" and length == 4 * vocab * hidden
    table = "model.embed_tokens.weight.T"
    assert set(copies.initializers("target")) == {table, table + ".gemv"}
    assert set(copies.initializers("verify")) == {table, table + ".gemv"}
    assert set(copies.initializers("drafter")) == {table}  # its exact-scored candidates' columns
    assert copies.initializers("no such graph") == {}
    value = copies.initializers("target")[table].numpy()
    on_disk = np.fromfile(mtp_bundle / location, np.float32, vocab * hidden, offset=offset)
    np.testing.assert_array_equal(value, on_disk.reshape(hidden, vocab))
    # nothing to copy: a quantized bundle's head is no GEMV over an fp32 table
    from edgemtp.exporters import export

    int8 = export(tiny_gemma3[1], tmp_path / "int8", quant="int8", capacity=64)
    assert HC.HeadCopies.load(bundle_mod.load(int8)) is None


def test_no_copy_without_huge_pages_or_off_the_cpu(mtp_bundle, monkeypatch):
    monkeypatch.setattr(HC, "huge_pages_available", lambda: False)
    assert Engine.load(mtp_bundle, verify=False).head_copies is None
    monkeypatch.setattr(HC, "huge_pages_available", lambda: True)
    assert Engine.load(mtp_bundle, verify=False, head_copy=False).head_copies is None
    assert Engine.load(mtp_bundle, verify=False).head_copies is not None


def test_engines_reading_the_copy_compute_what_the_mapping_gives(mtp_bundle, thp):
    """Target steps and multi-row passes, batched verify and MTP drafting: the same numbers, token for token;
    and the one-row step reads the copy itself (a column zeroed in it zeroes that token's logit)."""
    engines = [Engine.load(mtp_bundle, verify=False, head_copy=copy, mtp=True) for copy in (True, False)]
    assert engines[0].head_copies is not None and engines[1].head_copies is None
    ids = np.array([[2, 17, 40, 9, 33, 5]])
    out = []
    for e in engines:
        cache = e.target.new_cache(1)
        prefill = e.target.forward(ids, cache, n_logits=6)[0]
        step = e.target.forward(np.array([[21]]), cache)[0]
        texts = e.generate_batch(["a b c", "the cat"], max_new_tokens=12, draft=Draft("mtp", 3))  # verify graph
        drafted = e.generate("a b c a b c", max_new_tokens=16, draft=Draft("mtp", 3))
        out.append((prefill, step, [t.tokens for t in texts], drafted.tokens))
    for mine, theirs in zip(*out):
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(mine, theirs)
        else:
            assert mine == theirs
    engine = engines[0]
    # each session got the copy under each name its graph gives the table (what ONNX Runtime then reads: below)
    table = "model.embed_tokens.weight.T"
    for session, names in ((engine.target.session, {table, table + ".gemv"}),
                           (engine.target._verify_target().session, {table, table + ".gemv"}),
                           (engine._mtp_drafter().session, {table})):
        assert set(session.edgemtp_initializers) == names
    (table,) = engine.head_copies.copies.values()
    table.numpy()[:, 50] = 0.0  # token 50's head row (and embedding: the ids here avoid it)
    cache = engine.target.new_cache(1)
    engine.target.forward(ids, cache)
    logits = engine.target.forward(np.array([[21]]), cache)[0]
    assert logits[0, -1, 50] == 0.0 and out[1][1][0, -1, 50] != 0.0
