"""Engine.load(packed_cache=DIR) / --packed-cache: the target from an optimized copy whose data file holds ONNX
Runtime's packed weights (runtime/packed_cache.py). It must generate what the bundle does, be built once per
bundle, ONNX Runtime and CPU, and be built again where it is broken."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgemtp.cli import cli
from edgemtp.errors import ArgumentError, EdgemtpError
from edgemtp.runtime import packed_cache, session
from edgemtp.runtime.engine import Draft, Engine

from .cli_errors import assert_one_line_error

PROMPT = "t5 t9 t14 t3 t7 t11 t5 t9"


def greedy(bundle, draft=None, **load):
    with Engine.load(bundle, **load) as engine:
        return engine.generate(PROMPT, max_new_tokens=20, draft=draft).tokens


def copies(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 6])  # fp32 with an MTP drafter, int4, int8, static, qdq, Gemma 4
def test_the_packed_copy_generates_what_the_bundle_does(every_kind_of_bundle, kind, tmp_path):
    bundle = every_kind_of_bundle[kind]
    assert greedy(bundle, packed_cache=tmp_path) == greedy(bundle)
    [copy] = copies(tmp_path)
    record = json.loads((copy / packed_cache.RECORD).read_text())
    assert record["source"] == packed_cache.source_of(__import__("edgemtp.bundle").bundle.load(bundle))
    assert (copy / "target.onnx").is_file() and record["bytes"]["target.onnx.data"] > 0


def test_its_logits_are_the_bundles_and_drafting_beside_it_agrees(every_kind_of_bundle, tmp_path):
    bundle = every_kind_of_bundle[0]  # fp32, MTP drafter: the drafter reads the target's head table its own way
    with Engine.load(bundle) as plain, Engine.load(bundle, packed_cache=tmp_path) as packed:
        ids = np.array([plain.encode(PROMPT)])
        want, _ = plain.target.forward(ids, plain.target.new_cache(1))
        got, _ = packed.target.forward(ids, packed.target.new_cache(1))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        tokens = plain.generate(PROMPT, max_new_tokens=20).tokens
        assert packed.generate(PROMPT, max_new_tokens=20, draft=Draft("mtp", 3)).tokens == tokens


def test_a_second_load_maps_the_copy_without_building_it(tiny_gemma3, tmp_path, monkeypatch):
    bundle = tiny_gemma3[2]
    first = greedy(bundle, packed_cache=tmp_path)
    [copy] = copies(tmp_path)
    stamp = (copy / "target.onnx.data").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        if kwargs.get("packed_to") is not None:
            raise AssertionError("built again")
        return made(*args, **kwargs)
    made = session.make_session
    monkeypatch.setattr(session, "make_session", no_build)
    assert greedy(bundle, packed_cache=tmp_path) == first
    assert copies(tmp_path) == [copy] and (copy / "target.onnx.data").stat().st_mtime_ns == stamp


def test_another_onnxruntime_or_cpu_gets_a_copy_of_its_own(tiny_gemma3, tmp_path, monkeypatch):
    bundle, version = tiny_gemma3[2], packed_cache.ort.__version__
    first = greedy(bundle, packed_cache=tmp_path)
    monkeypatch.setattr(packed_cache, "cpu_identity", lambda: {"model name": "another CPU"})
    assert greedy(bundle, packed_cache=tmp_path) == first
    monkeypatch.setattr(packed_cache.ort, "__version__", "9.99.0")
    assert greedy(bundle, packed_cache=tmp_path) == first
    records = [json.loads((c / packed_cache.RECORD).read_text())["source"] for c in copies(tmp_path)]
    # the first copy superseded by the upgrade's (test_a_build_removes_the_copies_it_supersedes_on_this_device)
    assert len(records) == 2 and {r["onnxruntime"] for r in records} == {"9.99.0", version}


def test_a_copy_cut_short_or_without_its_record_is_built_again(tiny_gemma3, tmp_path):
    bundle = tiny_gemma3[2]
    first = greedy(bundle, packed_cache=tmp_path)
    [copy] = copies(tmp_path)
    data = copy / "target.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:  # a full disk, a copy interrupted by hand
        f.truncate(size // 2)
    assert greedy(bundle, packed_cache=tmp_path) == first
    assert copies(tmp_path) == [copy] and data.stat().st_size == size
    (copy / packed_cache.RECORD).unlink()
    assert greedy(bundle, packed_cache=tmp_path) == first
    assert (copy / packed_cache.RECORD).is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_copy_another_run_finished_meanwhile_is_kept(tiny_gemma3, tmp_path, monkeypatch):
    """Where there is no flock to make the other run wait (scratch.made_and_locked)."""
    bundle = tiny_gemma3[2]
    monkeypatch.setattr(packed_cache.scratch, "fcntl", None)
    made = session.make_session
    theirs = []

    def other_run_first(*args, **kwargs):
        out = made(*args, **kwargs)
        if kwargs.get("packed_to") is not None and not theirs:  # another process finishing the same key now
            from edgemtp import bundle as bundle_mod
            theirs.append(None)
            theirs[0] = packed_cache.packed_target(bundle_mod.load(bundle), tmp_path, "cpu", None)
        return out
    monkeypatch.setattr(session, "make_session", other_run_first)
    first = greedy(bundle, packed_cache=tmp_path)
    [copy] = copies(tmp_path)
    assert theirs == [copy / "target.onnx"] and first == greedy(bundle)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # this run's own copy removed


def test_bad_packed_caches_are_named(tiny_gemma3, tmp_path, monkeypatch):
    bundle = tiny_gemma3[2]
    with pytest.raises(ArgumentError, match=r"packed_cache=3 must be a directory's path"):
        Engine.load(bundle, packed_cache=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match=r"^packed_cache='[^']*/file' is a file, not a directory$"):
        Engine.load(bundle, packed_cache=tmp_path / "file")
    with pytest.raises(ArgumentError, match=r"^packed_cache='[^']*/file/under' is under \S*/file, which is a file, "
                       r"not a directory$"):
        Engine.load(bundle, packed_cache=tmp_path / "file" / "under")
    # packed_target's own check, for a file put there after Engine.load's (measure's --trace calls it again)
    from edgemtp import bundle as bundle_mod
    with pytest.raises(EdgemtpError, match=r"file: not a directory \(the packed cache's\)"):
        packed_cache.packed_target(bundle_mod.load(bundle), tmp_path / "file", "cpu", None)
    monkeypatch.setattr(session.ort, "get_available_providers",
                        lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ArgumentError, match=r"^packed_cache='[^']*/c' keeps the packed weights of ONNX Runtime's CPU "
                       r"kernels, and the target runs on provider 'openvino' \(give no packed cache there\)$"):
        Engine.load(bundle, provider="openvino", packed_cache=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_cli_takes_packed_cache(tiny_gemma3, tmp_path):
    bundle = tiny_gemma3[2]
    args = ["generate", str(bundle), "--prompt", "t5 t9 t14", "--max-new-tokens", "8", "--json", "--no-draft"]
    plain = CliRunner().invoke(cli, args)
    packed = CliRunner().invoke(cli, [*args, "--packed-cache", str(tmp_path / "c")])
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.output)["tokens"] == json.loads(plain.output)["tokens"]
    assert len(copies(tmp_path / "c")) == 1
    (tmp_path / "f").write_text("x")
    bad = CliRunner().invoke(cli, [*args, "--packed-cache", str(tmp_path / "f")])
    assert bad.exit_code == 2 and bad.output.strip().endswith(f"--packed-cache '{tmp_path / 'f'}' is a file, not a "
                                                              "directory")


@pytest.mark.slow
def test_the_real_models_packed_weights_leave_its_private_memory(gemma3_270m_bundle, tmp_path):
    """Gemma 3 270M fp32: ONNX Runtime's packed weights, ~1 GB of anonymous memory after a load, are the copy's
    mapped file with a packed cache (measured 1,137 -> 115 MB); its greedy tokens stay the bundle's."""
    from .test_heap import _run

    code = """
        CACHE = {cache}
        import json
        from edgemtp.runtime.engine import Engine
        with Engine.load({bundle!r}, mtp=False, packed_cache=CACHE) as engine:
            anon = anon_mb()
            tokens = engine.generate("def fibonacci(n):", max_new_tokens=24).tokens
        print(json.dumps({{"anon": anon, "tokens": tokens}}))
    """
    bundle = str(gemma3_270m_bundle)
    plain = _run(code.format(cache=None, bundle=bundle))
    built = _run(code.format(cache=repr(str(tmp_path)), bundle=bundle))  # builds the copy, then loads it
    mapped = _run(code.format(cache=repr(str(tmp_path)), bundle=bundle))
    assert plain["tokens"] == built["tokens"] == mapped["tokens"]
    assert plain["anon"] > 900 and built["anon"] < 300 and mapped["anon"] < 300, (plain, built, mapped)


def own_copy(tiny_gemma3, tmp_path):
    """The tiny fp32 bundle copied, for a test that edits its files."""
    return shutil.copytree(tiny_gemma3[2], tmp_path / "bundle")


def negated(data: bytes) -> bytes:
    """Every float32 of an fp32 data file with its sign flipped: other weights, the same size."""
    out = bytearray(data)
    out[3::4] = bytes(b ^ 0x80 for b in out[3::4])
    return bytes(out)


def test_a_bundle_changed_while_its_copy_is_built_leaves_no_copy(tiny_gemma3, tmp_path, monkeypatch):
    bundle = own_copy(tiny_gemma3, tmp_path)
    data = bundle / "target.onnx.data"
    exported, want = data.read_bytes(), greedy(bundle)
    made = session.make_session

    def edited_meanwhile(*args, **kwargs):  # an export --overwrite between the bundle's load and the build
        if kwargs.get("packed_to") is not None:
            data.write_bytes(negated(exported))
        return made(*args, **kwargs)
    monkeypatch.setattr(session, "make_session", edited_meanwhile)
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: changed since the bundle was loaded"):
        Engine.load(bundle, packed_cache=tmp_path / "c")
    monkeypatch.undo()
    data.write_bytes(exported)  # the exported weights back: the copy of the others must not be kept under their key
    assert greedy(bundle, packed_cache=tmp_path / "c") == want


def test_weights_changed_under_an_unchanged_manifest_never_find_the_old_copy(tiny_gemma3, tmp_path):
    """verify=False checks sizes only: the files as they are are what the default load runs, so they are what a
    copy must be made of, not the copy of the weights the manifest's sha256s name."""
    bundle = own_copy(tiny_gemma3, tmp_path)
    data = bundle / "target.onnx.data"
    greedy(bundle, packed_cache=tmp_path / "c")
    data.write_bytes(negated(data.read_bytes()))
    assert greedy(bundle, verify=False, packed_cache=tmp_path / "c") == greedy(bundle, verify=False)
    assert len(copies(tmp_path / "c")) == 2
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: sha256 differs from the manifest"):
        Engine.load(bundle, packed_cache=tmp_path / "c")


RUN = """
import json, sys, time
from pathlib import Path
from edgemtp.runtime import session
from edgemtp.runtime.engine import Engine

bundle, cache, marks = sys.argv[1:]
made, built = session.make_session, []

def build(*args, **kwargs):  # waits (5 s at most) for the other run to reach its build too
    if kwargs.get("packed_to") is not None:
        built.append(1)
        (Path(marks) / str(len(list(Path(marks).iterdir())))).touch()
        deadline = time.time() + 5
        while len(list(Path(marks).iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)
    return made(*args, **kwargs)
session.make_session = build
with Engine.load(bundle, packed_cache=cache) as engine:
    print(json.dumps({"built": len(built), "tokens": engine.generate(%r, max_new_tokens=20).tokens}))
""" % PROMPT


def test_two_processes_loading_at_once_build_one_copy(tiny_gemma3, tmp_path):
    """Two runs building the same copy at once each wrote it whole (twice the disk, 5.6 GB for Gemma 3 270M: a
    phone's free space for one), then renamed one over the other while that run loaded it."""
    bundle, cache, marks = tiny_gemma3[2], tmp_path / "c", tmp_path / "marks"
    marks.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(bundle), str(cache), str(marks)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["built"] for r in results) == [0, 1]
    assert results[0]["tokens"] == results[1]["tokens"] == greedy(bundle)
    [copy] = copies(cache)
    assert packed_cache.whole(copy, packed_cache.source_of(__import__("edgemtp.bundle").bundle.load(bundle)))
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_what_a_killed_build_left_goes_at_a_later_load(tiny_gemma3, tmp_path):
    """A build killed outright (the OOM killer, a power cut) leaves its hidden directory, up to 2.8 GB; one under a
    minute old is spared (a live run's), so a run right after built again and every later one found the copy and
    swept nothing: the directory stayed for good."""
    bundle = tiny_gemma3[2]
    greedy(bundle, packed_cache=tmp_path)
    left = [tmp_path / ".packing-k1ll3d_x", tmp_path / ".packed-old-0a1b2c3d"]
    for d in left:
        d.mkdir()
        (d / "target.onnx.data").write_bytes(b"x" * 100)
        os.utime(d, (0, 0))
    greedy(bundle, packed_cache=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_copy_is_as_readable_as_the_files_a_run_makes(tiny_gemma3, tmp_path):
    """A shared cache (one directory for a service and its users): mkdtemp's 0700 kept the copy from the others,
    who found it unreadable and built their own over it, each in turn."""
    mask = os.umask(0o022)
    try:
        greedy(tiny_gemma3[2], packed_cache=tmp_path)
    finally:
        os.umask(mask)
    [copy] = copies(tmp_path)
    assert [oct(p.stat().st_mode & 0o777) for p in (copy, *sorted(copy.iterdir()))] == ["0o755"] + ["0o644"] * 3


def test_a_full_disk_is_named_as_the_cache_s(tiny_gemma3, tmp_path, monkeypatch):
    """ONNX Runtime's write failing on a full disk was reported as the bundle's graph failing to load ('FAIL :
    graph.cc:5543 onnx::GraphProto ...'); our own writes' OSError was named right. Either way nothing is left: not
    the cache directory either, nor those above it, where the failed build made them (an empty cache the user never
    had stayed); a cache the user had stays."""
    bundle, cache = tiny_gemma3[2], tmp_path / "new" / "c"
    args = ["generate", str(bundle), "--prompt", "t5 t9 t14", "--max-new-tokens", "8", "--no-draft",
            "--packed-cache", str(cache)]
    made = session.ort.InferenceSession

    def full_disk(path, opts, **kwargs):
        if opts.optimized_model_filepath:  # what onnxruntime raises where its write of the data file fails
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : graph.cc:5543 onnx::GraphProto onnxruntime::Graph::"
                               "ToGraphProtoWithExternalInitializers(...) Failed to write external initializers")
        return made(path, opts, **kwargs)
    monkeypatch.setattr(session.ort, "InferenceSession", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and r.output == (f"error: {cache}: cannot write the packed copy of the target there (No "
                                             "space left on device)\n")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    def no_room(*args, **kwargs):
        if kwargs.get("packed_to") is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return made_session(*args, **kwargs)
    made_session = session.make_session
    monkeypatch.setattr(session, "make_session", no_room)
    for had in (False, True):
        if had:
            cache.mkdir(parents=True)
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and r.output == (f"error: {cache}: cannot write the packed copy of the target there "
                                                 "(No space left on device)\n")
        assert (not list(cache.iterdir())) if had else not (tmp_path / "new").exists()


def test_a_cache_inside_the_bundle_is_refused(tiny_gemma3, tmp_path):
    """The bundle's files are its manifest's: one rewritten there (add_to_bundle hashes every file under the
    directory) listed the copies, and the bundle, copied to another device, took this CPU's 2.6x its target."""
    bundle = own_copy(tiny_gemma3, tmp_path)
    (tmp_path / "link").symlink_to(bundle)
    for cache in (bundle, bundle / "packed", tmp_path / "link" / "packed"):
        with pytest.raises(EdgemtpError, match=rf"^{cache}: inside the bundle directory {bundle}"):
            Engine.load(bundle, packed_cache=cache)
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in tiny_gemma3[2].iterdir())


def test_a_cache_through_a_link_to_nothing_is_named(tiny_gemma3, tmp_path):
    """It read 'cannot write the packed copy of the target there (File exists)': mkdir's error on the link; then
    'LINK: a symbolic link to nothing (the packed cache's)', naming no flag, after the bundle's load (and profile
    skipped every row for it). Named as a file there is: by the argument, before any work."""
    gone = tmp_path / "gone"
    gone.symlink_to(tmp_path / "nowhere")
    for cache, what in ((gone, "is a symbolic link to nothing"),
                        (gone / "c", f"is under {gone}, a symbolic link to nothing")):
        with pytest.raises(ArgumentError, match=rf"^packed_cache='{cache}' {what} \(dangling, or a loop\)$"):
            Engine.load(tiny_gemma3[2], packed_cache=cache)
        for command in (["generate", str(tiny_gemma3[2]), "--prompt", "t5"], ["chat", str(tiny_gemma3[2])],
                        ["profile", str(tiny_gemma3[2])]):
            r = CliRunner().invoke(cli, [*command, "--packed-cache", str(cache)], input="t3\n")
            assert_one_line_error(r, exact=f"--packed-cache '{cache}' {what} (dangling, or a loop)")


def laid_out_copy(tmp_path, layout: list[tuple]) -> tuple:
    """A copy's graph and data file as ONNX Runtime lays them out: (name, offset, bytes, prepacked (offset,
    length) or None) per initializer; a packed region's bytes are b'P's."""
    import onnx

    data = bytearray()
    graph = onnx.helper.make_graph([], "g", [], [])
    for name, offset, content, packed in layout:
        for start, chunk in [(offset, content)] + ([(packed[0], b"P" * packed[1])] if packed else []):
            data.extend(b"\0" * (start + len(chunk) - len(data)))
            data[start:start + len(chunk)] = chunk
        t = graph.initializer.add()
        t.name, t.data_type, t.data_location = name, onnx.TensorProto.UINT8, onnx.TensorProto.EXTERNAL
        t.dims.append(len(content))
        entries = {"location": packed_cache.DATA, "offset": str(offset), "length": str(len(content))}
        if packed:
            entries["prepacked_0"] = f"MatMul+1|{packed[0]};{packed[1]};0"
        for key, value in entries.items():
            e = t.external_data.add()
            e.key, e.value = key, value
    (tmp_path / packed_cache.GRAPH).write_bytes(onnx.helper.make_model(graph).SerializeToString())
    (tmp_path / packed_cache.DATA).write_bytes(bytes(data))
    return tmp_path / packed_cache.GRAPH, tmp_path / packed_cache.DATA


def tables(graph) -> dict:
    """name -> the bytes its external data entries point at."""
    from edgemtp.onnx_wire import read_graph_facts

    data = (graph.parent / packed_cache.DATA).read_bytes()
    return {n: data[int(e["offset"]):int(e["offset"]) + int(e["length"])]
            for n, e in read_graph_facts(graph).external.items()}


def test_a_table_written_twice_is_kept_once(tmp_path):
    """ONNX Runtime writes the two names of an fp32 head table apart: the later one is pointed at the first's
    bytes and taken out, what follows it moved down by whole 4 KB steps; packed bytes never move."""
    x, y = bytes(range(256)) * 20, b"y" * 100
    graph, data = laid_out_copy(tmp_path, [("head", 0, x, None), ("layer", 8192, b"w" * 4096, (12288, 4096)),
                                       ("head.gemv", 16384, x, None), ("rope", 24576, y, None)])
    want = tables(graph)
    assert packed_cache.share_duplicates(tmp_path) == 8192  # the table and its padding
    assert tables(graph) == want and data.stat().st_size == 16384 + 100
    from edgemtp.onnx_wire import read_graph_facts
    external = read_graph_facts(graph).external
    assert external["head.gemv"]["offset"] == "0" and external["rope"]["offset"] == "16384"
    assert external["layer"]["prepacked_0"] == "MatMul+1|12288;4096;0"


def test_a_duplicate_with_packed_bytes_after_it_stays(tmp_path):
    x = b"x" * 5000
    graph, data = laid_out_copy(tmp_path, [("head", 0, x, None), ("head.gemv", 8192, x, None),
                                       ("layer", 16384, b"w" * 4096, (20480, 4096))])
    size = data.stat().st_size
    assert packed_cache.share_duplicates(tmp_path) == 0 and data.stat().st_size == size
    graph, data = laid_out_copy(tmp_path, [("a", 0, b"a" * 5000, None), ("b", 8192, b"b" * 5000, None)])
    assert packed_cache.share_duplicates(tmp_path) == 0  # the same length, other bytes


def test_the_real_copy_of_a_transposed_head_holds_its_table_once(tiny_gemma3, tmp_path, monkeypatch):
    bundle = tiny_gemma3[2]  # fp32, the head table transposed under two names
    from edgemtp.onnx_wire import read_graph_facts

    greedy(bundle, packed_cache=tmp_path / "shared")
    [copy] = copies(tmp_path / "shared")
    external = read_graph_facts(copy / "target.onnx").external
    pair = [e["offset"] for n, e in external.items() if n.startswith("model.embed_tokens.weight.T")]
    assert len(pair) == 2 and pair[0] == pair[1]
    monkeypatch.setattr(packed_cache, "share_duplicates", lambda copy: 0)
    greedy(bundle, packed_cache=tmp_path / "apart")
    [apart] = copies(tmp_path / "apart")
    table = int(external["model.embed_tokens.weight.T"]["length"])
    saved = (apart / "target.onnx.data").stat().st_size - (copy / "target.onnx.data").stat().st_size
    assert table <= saved < table + 4096


def test_a_record_that_lists_too_few_files_is_no_whole_copy(tiny_gemma3, tmp_path):
    """whole() checked only the files the record listed: a record with no sizes, or without the graph or the data
    file the copy has, passed for a finished copy with those files missing or cut short."""
    bundle = tiny_gemma3[2]
    greedy(bundle, packed_cache=tmp_path)
    [copy] = copies(tmp_path)
    source = packed_cache.source_of(__import__("edgemtp.bundle").bundle.load(bundle))
    record = json.loads((copy / packed_cache.RECORD).read_text())
    assert packed_cache.whole(copy, source)
    sizes = record["bytes"]
    for listed in ({}, {"target.onnx.data": sizes["target.onnx.data"]}, {"target.onnx": sizes["target.onnx"]}):
        (copy / packed_cache.RECORD).write_text(json.dumps({**record, "bytes": listed}))
        assert not packed_cache.whole(copy, source), listed


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
microcode\t: 0x2b000590
flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw amx_tile {extra}
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw amx_tile {extra}
"""
ARM = """processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp i8mm bf16 sve {extra}
CPU implementer\t: 0x41
CPU part\t: 0xd4f
CPU revision\t: 1
"""


@pytest.mark.parametrize("cpuinfo, unrelated, used", [
    (X86, "md_clear flush_l1d ibrs ibpb stibp hypervisor arch_capabilities", "avx2"),
    (ARM, "ssbs paca pacg bti", "i8mm"),
])
def test_the_cpu_is_keyed_on_the_instruction_sets_the_kernels_pick_by(cpuinfo, unrelated, used, tmp_path,
                                                                      monkeypatch):
    """Every /proc/cpuinfo flag was in the key: a kernel or microcode update adding a mitigation's flag (md_clear,
    ibrs...) made a new 2.8 GB copy of every target, for kernels ONNX Runtime picks as before."""
    def identity(text):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(packed_cache, "CPUINFO", str(tmp_path / "cpuinfo"))
        return packed_cache.cpu_identity()

    before = identity(cpuinfo.format(extra=""))
    assert identity(cpuinfo.format(extra=unrelated)) == before
    assert identity(cpuinfo.format(extra="").replace(f" {used} ", " ")) != before
    assert identity(cpuinfo.format(extra="").replace("8480+", "8490H").replace("0xd4f", "0xd40")) != before


def test_an_arm_cpu_is_keyed_on_its_implementer_and_part(tmp_path, monkeypatch):
    """Arm's 'CPU part' is a number each implementer (Arm 0x41, Qualcomm 0x51, Apple 0x61...) gives its own
    cores: two vendors' cores with one part number and the same Features shared a key, and a copy packed for
    the one's kernels was the other's. x86 keys are as before (no implementer there), so their copies stay valid.
    A copy an older edgemtp made on this Arm CPU (keyed without its implementer) is superseded by the new one."""
    def identity(text):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(packed_cache, "CPUINFO", str(tmp_path / "cpuinfo"))
        return packed_cache.cpu_identity()

    arm = identity(ARM.format(extra=""))
    assert arm["CPU implementer"] == "0x41" and arm["CPU part"] == "0xd4f"
    assert identity(ARM.format(extra="").replace("0x41", "0x51")) != arm
    assert set(identity(X86.format(extra=""))) == {"model name", "flags"}
    ours = {"format": packed_cache.FORMAT, "files": {"target.onnx": "0" * 64}, "onnxruntime": "1.27.0",
            "machine": "aarch64", "cpu": arm}
    older = {key: value for key, value in arm.items() if key != "CPU implementer"}
    assert packed_cache.superseded({**ours, "cpu": older}, ours)
    assert not packed_cache.superseded({**ours, "cpu": {**arm, "CPU implementer": "0x51"}}, ours)


def fake_copy(cache, source):
    """A copy's directory with only its record: what remove_superseded reads."""
    copy = cache / packed_cache.key_of(source)
    copy.mkdir()
    (copy / packed_cache.RECORD).write_text(json.dumps({"source": source, "bytes": {}}))
    return copy


def test_a_build_removes_the_copies_it_supersedes_on_this_device(tiny_gemma3, tmp_path, monkeypatch):
    """An onnxruntime upgrade left the previous 2.8 GB copy of the same target behind for good. Those of an older
    onnxruntime or FORMAT, or of the same CPU with other flags (an older edgemtp keyed on every flag), go once the new
    copy is built, even one a running engine maps; other targets', other CPUs' and newer versions' stay."""
    bundle, cache = tiny_gemma3[2], tmp_path / "c"
    want, upgraded = greedy(bundle), "99.0.0"
    with Engine.load(bundle, packed_cache=cache) as running:
        [old] = copies(cache)
        source = json.loads((old / packed_cache.RECORD).read_text())["source"]
        cpu = source["cpu"]
        gone = [fake_copy(cache, {**source, "format": 0, "onnxruntime": upgraded}),
                fake_copy(cache, {**source, "onnxruntime": upgraded,
                                  "cpu": {**cpu, "flags": cpu.get("flags", "") + " md_clear"}})]
        kept = [fake_copy(cache, {**source, "onnxruntime": "999.0.0"}),
                fake_copy(cache, {**source, "files": {"target.onnx": "0" * 64}}),
                fake_copy(cache, {**source, "cpu": {"model name": "another CPU"}}),
                fake_copy(cache, {**source, "machine": "riscv64"}),
                fake_copy(cache, {**source, "format": packed_cache.FORMAT + 1})]
        (cache / "not-a-key").mkdir()
        monkeypatch.setattr(packed_cache.ort, "__version__", upgraded)  # pip install -U onnxruntime
        assert greedy(bundle, packed_cache=cache) == want
        assert running.generate(PROMPT, max_new_tokens=20).tokens == want  # its mapped files outlive their names
    [new] = [c for c in copies(cache) if c not in kept and c.name != "not-a-key"]
    assert sorted(copies(cache)) == sorted([new, *kept, cache / "not-a-key"]) and old not in copies(cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")] and not any(c.exists() for c in gone)


def test_a_cache_through_a_link_to_a_directory_is_used(tiny_gemma3, tmp_path):
    """The build's lock opened the cache without following links: --packed-cache ~/cache, a link to a larger disk,
    failed with 'cannot write the packed copy of the target there (Not a directory)'."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    assert greedy(tiny_gemma3[2], packed_cache=tmp_path / "link") == greedy(tiny_gemma3[2])
    assert len(copies(tmp_path / "disk")) == 1


@pytest.mark.skipif(packed_cache.scratch.fcntl is None, reason="no flock: nobody waits (Windows)")
def test_a_load_waiting_for_another_runs_build_says_so_once(tiny_gemma3, tmp_path):
    """A load behind another process's build (~10 s for Gemma 3 270M) sat silent; it now warns once (the CLI prints
    warnings as one line on stderr). A load that does not wait says nothing."""
    import threading
    import warnings

    bundle, cache = tiny_gemma3[2], tmp_path / "c"
    cache.mkdir()
    fd = os.open(cache, os.O_RDONLY)
    packed_cache.scratch.fcntl.flock(fd, packed_cache.scratch.fcntl.LOCK_EX)  # another run building
    threading.Timer(1.0, os.close, [fd]).start()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert greedy(bundle, packed_cache=cache) == greedy(bundle)
    assert [str(w.message) for w in shown] == [f"{cache}: waits for another run to build a packed copy there"]
    assert shown[0].filename == __file__  # the app's line that loaded (here greedy's), not contextlib's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(bundle, packed_cache=tmp_path / "d")


@pytest.mark.parametrize("layout", [
    # the table's twin among the initializers after the last packed bytes: once the later name pointed at it,
    # the two names at one offset read as a duplicate and its twin, and the shared bytes were taken out
    [("head", 0, "x", None), ("head.gemv", 8192, "x", None), ("rope", 16384, "y", None)],
    [("head", 0, "x", None), ("head.gemv", 8192, "x", None)],  # the duplicate last, no padding after it
    [("head", 0, "x", None), ("head.gemv", 8192, "x", None), ("head.t", 16384, "x", None)],
    [("head.gemv", 8192, "x", None), ("head", 0, "x", None), ("rope", 16384, "y", None)],  # listed out of order
    # two names already on the duplicate's bytes: both are pointed at the twin
    [("head", 0, "x", None), ("a", 8192, "x", None), ("b", 8192, "x", None), ("rope", 16384, "y", None)],
    # zero-length initializers, one last: nothing to move for them, and they stop nothing
    [("z", 0, "", None), ("head", 0, "x", None), ("head.gemv", 8192, "x", None), ("e", 16384, "", None)],
])
def test_duplicates_after_the_packed_bytes_keep_every_table(tmp_path, layout):
    content = {"x": bytes(range(256)) * 20, "y": b"y" * 100, "": b""}
    graph, data = laid_out_copy(tmp_path, [(n, o, content[c], p) for n, o, c, p in layout])
    want, size = tables(graph), data.stat().st_size
    saved = packed_cache.share_duplicates(tmp_path)
    assert tables(graph) == want
    assert saved > 0 and data.stat().st_size == size - saved


def test_bytes_past_the_end_of_the_file_are_no_twins(tmp_path):
    """Two reads past a data file's end both give b'': not a duplicate to cut out (the span would go negative)."""
    path = tmp_path / "data"
    path.write_bytes(b"x" * 100)
    assert packed_cache.same_bytes(path, 0, 50, 50)
    assert not packed_cache.same_bytes(path, 200, 300, 50) and not packed_cache.same_bytes(path, 0, 90, 20)
