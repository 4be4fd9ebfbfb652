"""Bundle integrity and the clear-message contract for bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edgemtp import bundle
from edgemtp.errors import EdgemtpError, SwitchError
from edgemtp.exporters import builder, export
from edgemtp.runtime.engine import Engine, Stats

from .cli_errors import assert_one_line_error
from .fifo import mkfifo


# tensors of the tiny model's checkpoint whose header entries the tests below change
FIRST = "model.embed_tokens.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested deeper than Python's parser recurses
HUGE_NUMBER = '{"x": ' + "9" * 5000 + "}"  # past the 4300 digits Python converts


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_manifest_lists_every_file_with_sha256(tiny_gemma3):
    _, _, b = tiny_gemma3
    m = json.loads((b / "edgemtp.json").read_text())
    assert set(m["files"]) == {"target.onnx", "target.onnx.data", "target_verify.onnx", "tokenizer.json"}
    for rel, info in m["files"].items():  # hashed here, not by bundle.sha256 (the function under test)
        data = (b / rel).read_bytes()
        assert (info["bytes"], info["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), rel
    assert m["graphs"]["target"]["contract"]["capacity"] == 64


def test_manifest_records_what_made_the_bundle(tiny_gemma3, tmp_path):
    """What a user checks a cached or shipped bundle against: the edgemtp version that wrote it and the model it
    was exported from (by content, as train-drafter's caches know their target), kept through quantization;
    `edgemtp info` shows them. Nothing of the run itself (paths, times): the same export is the same bytes."""
    import edgemtp
    from edgemtp.drafter.cache import target_identity

    from .test_cli import run

    model, model_dir, b = tiny_gemma3
    made = {"edgemtp_version": edgemtp.__version__,
            "source": {"model": target_identity(model_dir), "parameters": model.num_parameters()}}
    (tmp_path / "calib.txt").write_text(" ".join(f"t{i % 90 + 3}" for i in range(400)))
    q8 = export(model_dir, tmp_path / "int8", quant="int8", capacity=64, quant_options={"calibration": None})
    qdq = export(model_dir, tmp_path / "qdq", quant="qdq", capacity=64, static_window=3,
                 quant_options={"calibration": str(tmp_path / "calib.txt"), "calibration_tokens": 30})
    for bundle_dir in (b, q8, qdq):
        m = json.loads((bundle_dir / "edgemtp.json").read_text())
        assert {k: m.get(k) for k in made} == made, bundle_dir
    r = run("info", b)
    assert r.exit_code == 0 and f"made by: edgemtp {edgemtp.__version__} from model {made['source']['model']}" \
        in r.output.splitlines(), r.output


def test_info_says_how_many_parameters_the_source_model_has(tiny_gemma3):
    """What a bundle was exported from, besides its identity by content: the parameters its target holds (the
    checkpoint's, a tied table once, as transformers counts them). A bundle exported before they were recorded
    shows what it has."""
    from edgemtp.bundle_info import describe, text

    model, _, b = tiny_gemma3
    n = model.num_parameters()
    loaded = bundle.load(b, verify=False)
    line = text(describe(loaded), False).splitlines()[1]
    assert line.startswith(f"model: gemma3_text, {n:,} parameters, 4 layers, hidden 64"), line
    loaded.manifest["source"] = {"model": loaded.manifest["source"]["model"]}  # as earlier versions wrote it
    line = text(describe(loaded), False).splitlines()[1]
    assert line.startswith("model: gemma3_text, 4 layers, hidden 64"), line


def test_changed_file_is_detected(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    data = bytearray((b / "target.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (b / "target.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: sha256 differs .*changed after export"):
        bundle.load(b)


def test_an_unchanged_bundle_is_not_hashed_again(tiny_gemma3, tmp_path, monkeypatch):
    """Loading remembers the files whose sha256 matched (verified.py): a second load reads none whole, and a
    file written since, even with its size and mtime put back, is hashed again and its change named."""
    import os

    from edgemtp import verified

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)  # the copy is seconds old at most
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    hashed = []
    real = bundle.sha256
    monkeypatch.setattr(bundle, "sha256", lambda p: hashed.append(p.name) or real(p))
    bundle.load(b)
    assert sorted(hashed) == sorted(json.loads((b / "edgemtp.json").read_text())["files"])
    hashed.clear()
    bundle.load(b)
    assert hashed == []
    data, st = bytearray((b / "target.onnx.data").read_bytes()), (b / "target.onnx.data").stat()
    data[100] ^= 0xFF
    (b / "target.onnx.data").write_bytes(bytes(data))
    os.utime(b / "target.onnx.data", ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime cannot be put back
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: sha256 differs .*changed after export"):
        bundle.load(b)
    assert hashed == ["target.onnx.data"]
    hashed.clear()
    bundle.load(b, verify=False)  # sizes only: nothing hashed, nothing remembered
    assert hashed == []


def test_a_file_this_process_may_not_read_is_named_without_hashing(tiny_gemma3, tmp_path, monkeypatch):
    """A load that hashes nothing (verify=False, as profile loads; or a file the record knows) opens each file: one
    it may not read was left to ONNX Runtime, whose message named the graph, not its data file, over lines of its
    own log (`bp/target.onnx: onnxruntime could not load the graph (SystemError : 13)`)."""
    import builtins
    import errno

    from click.testing import CliRunner

    from edgemtp.cli import cli

    b = copy_bundle(tiny_gemma3[2], tmp_path)
    real = builtins.open

    def unreadable_data(path, *a, **k):  # ONNX Runtime's own read (C++) does not come here: it reads the file
        if Path(path).name == "target.onnx.data":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(builtins, "open", unreadable_data)
    with pytest.raises(PermissionError) as e:
        bundle.load(b, verify=False)
    assert e.value.filename == str(b / "target.onnx.data")
    r = CliRunner().invoke(cli, ["profile", str(b), "--prompt-tokens", "4", "--gen-tokens", "2", "--draft-k", "0"])
    assert_one_line_error(r, exact=f"{b / 'target.onnx.data'}: Permission denied")


def test_loading_hashes_as_before_where_nothing_can_be_remembered(tiny_gemma3, tmp_path, monkeypatch):
    from edgemtp import verified

    b = copy_bundle(tiny_gemma3[2], tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # no directory can be made under a file
    monkeypatch.setattr(verified, "RACY_NS", 0)
    hashed = []
    real = bundle.sha256
    monkeypatch.setattr(bundle, "sha256", lambda p: hashed.append(p.name) or real(p))
    bundle.load(b)
    bundle.load(b)
    assert len(hashed) == 2 * len(json.loads((b / "edgemtp.json").read_text())["files"])
    # files written within RACY_NS of the load are not remembered: a write in the same timestamp tick of a
    # coarse file system would leave their size, mtime and ctime as they were
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 10**18)
    hashed.clear()
    bundle.load(b)
    bundle.load(b)
    assert len(hashed) == 2 * len(json.loads((b / "edgemtp.json").read_text())["files"])
    assert not (tmp_path / "cache").exists()
    # no home directory and no XDG_CACHE_HOME (a service account): nothing remembered, no error
    monkeypatch.setattr(verified, "RACY_NS", 0)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(verified.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert verified.record_path() is None
    hashed.clear()
    bundle.load(b)
    bundle.load(b)
    assert len(hashed) == 2 * len(json.loads((b / "edgemtp.json").read_text())["files"])
    monkeypatch.setattr(verified.os, "name", "nt")  # Windows: st_ctime is the creation time, no proof of no write
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert verified.record_path() is None
def test_a_graph_loaded_later_must_be_the_one_load_checked(tiny_gemma3, tmp_path):
    """The batched verify graph (and the MTP drafter) load on first use, maybe hours after Engine.load: a bundle
    re-exported in its place meanwhile is refused, not verified with weights the target does not have (it
    gave other tokens than the loaded model's); a copy with the same bytes is fine."""
    from edgemtp.runtime.engine import Draft

    b = copy_bundle(tiny_gemma3[2], tmp_path)
    prompts = ["t1 t2 t3 t1 t2", "t4 t5 t6 t4 t5 t6"]
    want = [g.tokens for g in Engine.load(b).generate_batch(prompts, 6, draft=Draft("lookup", 3))]
    same, edited = Engine.load(b), Engine.load(b)
    shutil.copytree(b, tmp_path / "new")  # an export writes a sibling directory and renames it into place
    shutil.rmtree(b)
    (tmp_path / "new").rename(b)
    assert [g.tokens for g in same.generate_batch(prompts, 6, draft=Draft("lookup", 3))] == want
    data = bytearray((b / "target.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (b / "target.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgemtpError, match=r"target.onnx.data: changed since the bundle was loaded"):
        edited.generate_batch(prompts, 6, draft=Draft("lookup", 3))
    shutil.rmtree(b)
    with pytest.raises(EdgemtpError, match=r"missing since the bundle was loaded"):
        edited.generate_batch(prompts, 6, draft=Draft("lookup", 3))


def test_a_bundle_replaced_while_it_loads_is_refused_not_mixed(tiny_gemma3, tmp_path, monkeypatch):
    """`export --overwrite` renames its new bundle into place while another process's Engine.load runs: the
    manifest and the head table were read from the old bundle, the target's graph from the new one. Generating
    from that mix gave tokens neither model gives; it is refused, with what to do."""
    import copy

    import torch

    from edgemtp.runtime import loading
    from edgemtp.scratch import replace_dir

    from .reference import save_tiny

    other = copy.deepcopy(tiny_gemma3[0])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    export(save_tiny(other, tmp_path / "other_model"), tmp_path / "other", capacity=64)
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    prompt = "t1 t2 t3 t1 t2"
    assert Engine.load(b).generate(prompt, 8).tokens != Engine.load(tmp_path / "other").generate(prompt, 8).tokens
    real = loading.make_session

    def swapped_first(path, *args, **kwargs):  # the export's rename lands between the checks and the session
        shutil.copytree(tmp_path / "other", tmp_path / "new")
        replace_dir(tmp_path / "new", b, ".old-")
        monkeypatch.setattr(loading, "make_session", real)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loading, "make_session", swapped_first)
    with pytest.raises(EdgemtpError, match=r"target.onnx(.data)?: changed since the bundle was loaded"):
        Engine.load(b)
    assert Engine.load(b).generate(prompt, 8).tokens == Engine.load(tmp_path / "other").generate(prompt, 8).tokens


def test_truncated_file_is_detected(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    (b / "tokenizer.json").write_text("{}")
    with pytest.raises(EdgemtpError, match="tokenizer.json: size"):
        bundle.load(b)
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").mkdir()  # what it is, as for a model directory's files (errors.not_a_file)
    with pytest.raises(EdgemtpError, match=r"tokenizer.json: is a directory, not a file \(listed in edgemtp.json\)$"):
        bundle.load(b)


def test_manifest_path_outside_bundle_is_refused(tiny_gemma3, tmp_path):
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    m["files"]["../secret"] = {"bytes": 1, "sha256": "0"}
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match="points outside the bundle"):
        bundle.load(b)
    # a bundle file that is a symbolic link to elsewhere: said so, with what to do
    del m["files"]["../secret"]
    (b / "edgemtp.json").write_text(json.dumps(m))
    elsewhere = tmp_path / "tokenizer.json"
    shutil.move(b / "tokenizer.json", elsewhere)
    (b / "tokenizer.json").symlink_to(elsewhere)
    with pytest.raises(EdgemtpError, match=r"'tokenizer.json' is a symbolic link to a file outside the bundle \(copy"):
        bundle.load(b)


def hub_snapshot(src, repo, folder: str = ""):
    """`src` laid out as a Hugging Face hub cache holds a downloaded repository (snapshot_download without
    local_dir): repo/snapshots/REV/FILE, each a relative link to repo/blobs/HASH (`folder`: src is that folder
    of the repository, REV/folder/FILE)."""
    snap = repo / "snapshots" / "0123abc"
    (snap / folder).mkdir(parents=True)
    (repo / "blobs").mkdir()
    up = "../" * (2 + len(Path(folder).parts))
    for f in sorted(src.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snap / folder / f.name).symlink_to(f"{up}blobs/{blob}")
    return snap


def test_a_hub_cache_snapshot_loads_and_is_checked(tiny_gemma3, tmp_path):
    """A bundle downloaded into the hub cache loads from its snapshot directory, its links into the repository's
    blobs checked as the bundle's files; a link elsewhere is still refused."""
    b = tiny_gemma3[2]
    snap = hub_snapshot(b, tmp_path / "models--someone--bundle")
    want = Engine.load(b).generate("t1 t2 t3", 8).tokens
    with Engine.load(snap) as engine:
        assert engine.generate("t1 t2 t3", 8).tokens == want
    # the same links from a directory that is not a snapshot, or from a snapshot into another repository's blobs
    plain = tmp_path / "models--someone--bundle" / "elsewhere" / "0123abc"
    shutil.copytree(snap, plain, symlinks=True)
    with pytest.raises(EdgemtpError, match=r"'\S+' is a symbolic link to a file outside the bundle"):
        bundle.load(plain)
    other = hub_snapshot(b, tmp_path / "models--other--bundle")
    (other / "tokenizer.json").unlink()
    (other / "tokenizer.json").symlink_to(snap.resolve() / "tokenizer.json")
    with pytest.raises(EdgemtpError, match=r"'tokenizer.json' is a symbolic link to a file outside the bundle"):
        bundle.load(other)
    # a blob changed after download: its sha256
    blob = (snap / "tokenizer.json").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b" ")
    with pytest.raises(EdgemtpError, match=r"tokenizer.json: sha256 differs from the manifest"):
        bundle.load(snap)


def test_a_bundle_in_a_folder_of_a_hub_snapshot_loads(tiny_gemma3, tmp_path):
    """A repository holding bundles in folders (org/models: gemma-int4/, gemma-fp32/): the bundle given is a
    folder of the snapshot, its files links into the same repository's blobs. It was refused as a link outside."""
    snap = hub_snapshot(tiny_gemma3[2], tmp_path / "models--someone--bundles", "int4/m.bundle")
    bundle.load(snap / "int4" / "m.bundle")
    alias = tmp_path / "alias"  # the folder given through a link of its own
    alias.symlink_to(snap / "int4" / "m.bundle")
    bundle.load(alias)



def test_a_hub_snapshot_bundle_may_not_list_a_link_beside_its_folder(tiny_gemma3, tmp_path):
    """A link of the same snapshot into the same repository's blobs, but outside the bundle's folder ('..'): the
    manifest reaches past the bundle, refused as any path outside it."""
    snap = hub_snapshot(tiny_gemma3[2], tmp_path / "models--someone--bundles", "int4/m.bundle")
    folder = snap / "int4" / "m.bundle"
    blob = (folder / "tokenizer.json").resolve()
    (snap / "int4" / "notes.txt").symlink_to(os.path.relpath(blob, snap / "int4"))  # as the hub links
    manifest = json.loads((folder / "edgemtp.json").resolve().read_text())
    manifest["files"]["../notes.txt"] = manifest["files"]["tokenizer.json"]
    (folder / "edgemtp.json").unlink()
    (folder / "edgemtp.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgemtpError, match=r"path '\.\./notes.txt' is a symbolic link to a file outside the bundle"):
        bundle.load(folder)

def test_missing_and_corrupt_manifest(tmp_path):
    with pytest.raises(EdgemtpError, match="edgemtp.json: missing"):
        bundle.load(tmp_path)
    (tmp_path / "edgemtp.json").write_text("{not json")
    with pytest.raises(EdgemtpError, match="not valid JSON"):
        bundle.load(tmp_path)
    (tmp_path / "edgemtp.json").write_text(json.dumps({"format": "edgemtp-bundle", "schema_version": 99}))
    with pytest.raises(EdgemtpError, match="schema_version 99"):
        bundle.load(tmp_path)


def test_a_schema_version_this_edgemtp_does_not_read_says_what_to_do(tmp_path):
    """A bundle of a schema this edgemtp does not read is named with what to do: a newer one's (the edgemtp that
    wrote it named) needs an upgrade or a re-export, an older one's a re-export."""
    from edgemtp import __version__

    manifest = tmp_path / "edgemtp.json"
    newest = max(bundle.READS)
    manifest.write_text(json.dumps({"format": "edgemtp-bundle", "schema_version": newest + 1,
                                    "edgemtp_version": "9.9"}))
    with pytest.raises(EdgemtpError) as e:
        bundle.load(tmp_path)
    assert str(e.value) == (f"{manifest}: schema_version {newest + 1} is newer than this edgemtp ({__version__}) reads "
                            f"({', '.join(map(str, bundle.READS))}): exported by edgemtp 9.9; upgrade edgemtp, or "
                            "re-export the bundle with this one")
    manifest.write_text(json.dumps({"format": "edgemtp-bundle", "schema_version": min(bundle.READS) - 1}))
    with pytest.raises(EdgemtpError) as e:
        bundle.load(tmp_path)
    assert str(e.value) == (f"{manifest}: schema_version {min(bundle.READS) - 1} is older than this edgemtp "
                            f"({__version__}) reads ({', '.join(map(str, bundle.READS))}): re-export the bundle with "
                            "this edgemtp")


def test_a_manifest_nested_too_deep_or_too_large_is_named(tmp_path, monkeypatch):
    """A bundle from someone else: a manifest of arrays nested deeper than Python's JSON parser recurses is named,
    not a RecursionError's traceback, and one far larger than any export writes is refused before it is read."""
    (tmp_path / "edgemtp.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EdgemtpError, match=r"edgemtp.json: not valid JSON \(nested too deeply\)"):
        bundle.load(tmp_path)
    monkeypatch.setattr(bundle, "MAX_MANIFEST_BYTES", 100)
    (tmp_path / "edgemtp.json").write_text(json.dumps({"format": "edgemtp-bundle", "pad": "x" * 100}))
    with pytest.raises(EdgemtpError, match=r"edgemtp.json: 139 bytes, more than a manifest holds \(at most 100\)"):
        bundle.load(tmp_path)


def test_a_bundle_is_written_with_the_oldest_schema_that_describes_it(tiny_gemma3):
    """Schema 3 only where window views cover sliding layers with several KV heads (an edgemtp reading up to 2
    bound those views in place, which is not contiguous memory): a bundle an older edgemtp can run stays 2."""
    m = json.loads((tiny_gemma3[2] / "edgemtp.json").read_text())
    target = m["graphs"]["target"]["contract"]
    assert target["window_views"] and {s["num_heads"] for s in target["kv"] if s["window"]} == {2}
    assert m["schema_version"] == bundle.schema_of(m) == bundle.SCHEMA_VERSION == 3
    one_head = json.loads(json.dumps(m))
    for s in one_head["graphs"]["target"]["contract"]["kv"]:
        s["num_heads"] = 1
    assert bundle.schema_of(one_head) == 2
    target["window_views"] = False
    assert bundle.schema_of(m) == 2  # several KV heads, no views: as schema 2 wrote them


def test_a_bundle_whose_window_views_never_move_is_schema_2(tiny_gemma3, tmp_path):
    """A window over about two thirds of the capacity puts every view at offset 0 (TargetContract.
    window_offset): the whole buffers, which an edgemtp reading up to schema 2 binds as it did; schema 3 refused
    such a bundle there for nothing (Mistral 7B v0.1, window 4096, at the default capacity of 4096; Gemma 2)."""
    from edgemtp.contract import TargetContract

    from .reference import save_tiny
    from .test_parity import tiny

    m = json.loads((tiny_gemma3[2] / "edgemtp.json").read_text())
    capacity = m["graphs"]["target"]["contract"]["capacity"]
    for window, schema in ((capacity, 2), (capacity + 100, 2), (capacity - 5, 2), (capacity // 2, 3)):
        for s in m["graphs"]["target"]["contract"]["kv"]:
            s["window"] = s["window"] and window
        contract = TargetContract.from_json(m["graphs"]["target"]["contract"])
        assert (contract.window_offset(capacity - 1) > 0) == (schema == 3)  # the last pass's view
        assert bundle.schema_of(m) == schema, window
    model = tiny("mistral")  # every layer slides, 2 KV heads
    model.config.sliding_window = 64
    out = export(save_tiny(model, tmp_path / "model"), tmp_path / "bundle", capacity=64)
    m = json.loads((out / "edgemtp.json").read_text())
    assert m["graphs"]["target"]["contract"]["window_views"] and m["schema_version"] == 2


@pytest.fixture(scope="module")
def tiny_llama_bundle(tmp_path_factory):
    """A tiny Llama: graphs without window views (every Gemma target has them), as every bundle of schema 1."""
    from .reference import save_tiny
    from .test_parity import tiny

    root = tmp_path_factory.mktemp("tiny_llama")
    return export(save_tiny(tiny("llama"), root / "model"), root / "bundle", capacity=64)


def test_version_1_bundles_still_load(tiny_llama_bundle, tmp_path):
    """Schema 2 only adds what a version-1 bundle lacks (a contract's window_views, default off)."""
    b = copy_bundle(tiny_llama_bundle, tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    assert m["schema_version"] == 2
    m["schema_version"] = 1
    for graph in m["graphs"].values():  # a version-1 manifest's contracts have no window_views
        assert graph["contract"].pop("window_views") is False
    (b / "edgemtp.json").write_text(json.dumps(m))
    old = bundle.load(b)
    assert old.manifest["schema_version"] == 1 and not old.target_contract.window_views
    want = Engine.load(tiny_llama_bundle).generate("t1 t2 t3", max_new_tokens=6).tokens
    assert Engine.load(b).generate("t1 t2 t3", max_new_tokens=6).tokens == want
    from edgemtp.exporters.quantize import quantize_bundle

    q = json.loads((quantize_bundle(b, tmp_path / "q", "fp16", calibration=None) / "edgemtp.json").read_text())
    assert q["schema_version"] == 2  # a copy this edgemtp wrote (schema_of: no window views), whatever its source's


def test_a_bundle_of_the_first_releases_shape_generates_the_same(tiny_llama_bundle, tmp_path):
    """The manifest of a bundle the first release exported (schema 1): no batched verify graph, contracts without
    kv_update and window_views, no edgemtp_version or source. It loads and generates what it did (checked against
    real bundles of earlier commits, whose manifests are these fields less); --fast-verify is named, not a
    traceback."""
    b = copy_bundle(tiny_llama_bundle, tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    verify = m["graphs"].pop("verify")["file"]
    (b / verify).unlink()
    del m["files"][verify], m["edgemtp_version"], m["source"]
    for key in ("kv_update", "window_views"):
        del m["graphs"]["target"]["contract"][key]
    (b / "edgemtp.json").write_text(json.dumps({**m, "schema_version": 1}))
    want = Engine.load(tiny_llama_bundle).generate_batch(["t1 t2 t3", "t5 t6 t7 t5 t6"], max_new_tokens=12)
    with Engine.load(b) as engine:
        got = engine.generate_batch(["t1 t2 t3", "t5 t6 t7 t5 t6"], max_new_tokens=12)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    with pytest.raises(EdgemtpError, match=r"fast_verify=True needs a batched verify graph, and .* has "
                                            "none"):
        Engine.load(b, fast_verify=True)


@pytest.mark.parametrize("quant", ["fp32", "int8", "qdq"])
def test_export_interrupted_leaves_no_bundle(tiny_gemma3, tmp_path, monkeypatch, quant):
    """No bundle, no hidden directory, and none of the directories made for the output (`-o new1/new2/out`:
    they were left behind, empty). int8 and qdq die in the fp32 export they quantize, in a scratch beside it."""
    _, model_dir, _ = tiny_gemma3
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"t{i % 90 + 3}" for i in range(400)))
    options = {"fp32": None, "int8": {"calibration": None},
               "qdq": {"calibration": str(calib), "calibration_tokens": 30}}[quant]
    real_save = builder.save

    def dying_save(b, path, read, progress=None, read_rows=None):
        def read_then_die(name):
            if "layers.2" in name:
                raise KeyboardInterrupt
            return read(name)
        return real_save(b, path, read_then_die, progress)

    monkeypatch.setattr(builder, "save", dying_save)
    for out in (tmp_path / "out", tmp_path / "new1" / "new2" / "out"):
        with pytest.raises(KeyboardInterrupt):
            export(model_dir, out, quant, capacity=64, static_window=3 if quant == "qdq" else None,
                   quant_options=options)
        assert list(tmp_path.iterdir()) == [calib], out


@pytest.mark.parametrize("signame,status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_export_terminated_leaves_no_temporary_directory(tiny_gemma3, tmp_path, monkeypatch, signame, status):
    """SIGTERM mid-export (kill, a cancelled job): exit status 143, no bundle and no hidden partial dir. So for
    SIGHUP (the terminal or the ssh session closed): status 129, and it left the half-written hidden directory
    (513 MB of Gemma 3 270M's 1.1 GB) until the next export to the same place. The directories made for the
    output (new1/new2) go too."""
    import os
    import signal

    from click.testing import CliRunner

    from edgemtp.cli import cli, exit_on_termination_signals

    signum = getattr(signal, signame)
    real_save = builder.save

    def terminated_save(b, path, read, progress=None, read_rows=None):
        def read_then_terminate(name):
            if "layers.2" in name:
                os.kill(os.getpid(), signum)
            return read(name)
        return real_save(b, path, read_then_terminate, progress)

    monkeypatch.setattr(builder, "save", terminated_save)
    if signal.getsignal(signum) is not signal.SIG_DFL:
        pytest.skip(f"this process handles {signame} itself (the edgemtp command installs its handler only "
                    "over the default)")
    with exit_on_termination_signals():  # what the `edgemtp` command (cli.main) runs under
        assert signal.getsignal(signum) is not signal.SIG_DFL  # else the kill below ends pytest
        r = CliRunner().invoke(cli, ["export", str(tiny_gemma3[1]), "-o", str(tmp_path / "new1" / "new2" / "out"),
                                     "--drafter", "none"])
    assert r.exit_code == status, r.output
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) is signal.SIG_DFL  # restored


def test_a_second_signal_waits_for_the_clean_up_and_nohup_s_sighup_stays_ignored():
    """The first of SIGTERM and SIGHUP exits; then both are ignored, so the other (systemd's stop sends SIGTERM
    and then SIGHUP) does not cut the clean-up short. A SIGHUP `nohup` ignores stays ignored, inside and after:
    closing the terminal must not end a `nohup edgemtp export`."""
    import signal

    from edgemtp.cli import exit_on_termination_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(SystemExit) as e, exit_on_termination_signals():
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:  # the clean-up
                ignored = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
        assert e.value.code == 143 and ignored == [signal.SIG_IGN] * 2
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        with exit_on_termination_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8"])
def test_the_position_tables_are_external_data_at_any_capacity(tiny_gemma3, tmp_path, quant):
    """The RoPE cos / sin caches GroupQueryAttention rotates with have a row per position of the KV capacity:
    they go to target.onnx.data, which ONNX Runtime maps, not target.onnx, whose tensors it copies onto its
    heap (67 MB at --max-context 32768 for Gemma 3 270M): target.onnx is the same size at any capacity. fp16
    leaves them fp32 (no weights: rounded, they would change the tokens)."""
    import onnx

    from edgemtp.exporters.quantgraph import position_tables

    sizes = []
    for capacity in (64, 1024):
        out = export(tiny_gemma3[1], tmp_path / f"c{capacity}", quant=quant, capacity=capacity)
        graph = onnx.load(str(out / "target.onnx"), load_external_data=False).graph
        names = position_tables(graph)
        tables = [t for t in graph.initializer if t.name in names]
        assert len(tables) == 4  # cos and sin of the sliding and the full layers
        assert all(t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT
                   and t.dims[0] == capacity for t in tables)
        sizes.append((out / "target.onnx").stat().st_size)
        assert len(Engine.load(out, threads=1).generate("t3 t4", max_new_tokens=3).tokens) == 3  # sha256s checked
    assert abs(sizes[1] - sizes[0]) < 100, sizes


def test_bundle_is_readable_by_others_under_the_usual_umask(tiny_gemma3, tmp_path):
    """The bundle directory gets the process umask's mode (0755 under 022), not the temporary directory's
    0700: a bundle exported once is shared with the app's user or copied to a device."""
    import os

    old = os.umask(0o022)
    try:
        out = export(tiny_gemma3[1], tmp_path / "b", capacity=64)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_files_a_writer_made_owner_only_are_readable_by_others_in_the_bundle(tmp_path):
    """onnxruntime's quantizer writes its external data 0600: atomic_dir gives every file of the bundle, nested
    ones too, the mode open() makes (0644 under umask 022), or a shared quantized bundle loads for its owner only."""
    import os

    old = os.umask(0o022)
    try:
        with bundle.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            os.close(os.open(tmp / "sub" / "w.onnx.data", os.O_CREAT | os.O_WRONLY, 0o600))
            os.close(os.open(tmp / "w.onnx", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == \
        {"sub/w.onnx.data": 0o644, "w.onnx": 0o644}


def test_a_manifest_names_the_edgemtp_writing_it_not_the_source_bundles(tmp_path):
    """A quantized copy passes its source bundle's manifest on: its own edgemtp version, format and schema
    are written, and every file is listed with its size and sha256."""
    import edgemtp

    (tmp_path / "a.bin").write_bytes(b"xyz")
    bundle.write_manifest(tmp_path, {"edgemtp_version": "0.0.1", "model": {"vocab_size": 3}})
    m = json.loads((tmp_path / "edgemtp.json").read_text())
    assert m == {"format": "edgemtp-bundle", "schema_version": 2,  # no graphs: schema_of's oldest
                 "edgemtp_version": edgemtp.__version__, "model": {"vocab_size": 3},
                 "files": {"a.bin": {"bytes": 3, "sha256": hashlib.sha256(b"xyz").hexdigest()}}}


def test_export_refuses_existing_output(tiny_gemma3):
    """Named as the caller asks to replace it: overwrite=True from Python (no flag an app never passed),
    --overwrite from the CLI."""
    _, model_dir, b = tiny_gemma3
    with pytest.raises(SwitchError) as e:
        export(model_dir, b)
    assert str(e.value) == f"overwrite=True is needed to replace {b}, which already exists"
    assert e.value.cli_message() == f"--overwrite is needed to replace {b}, which already exists"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    (lambda d: _edit_config(d, model_type="mamba"), "model_type 'mamba' is not supported"),
    # GPTQ / AWQ checkpoints were refused as lacking q_proj.weight (they hold qweight), not as quantized
    (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq", "bits": 4}),
     r"config.json: field 'quantization_config' \(gptq\): a quantized checkpoint; export reads float weights"),
    (lambda d: _edit_config(d, hidden_size=None), "missing field 'hidden_size'"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x05"), "not a valid safetensors file"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda d: _edit_config(d, intermediate_size=100), rf"tensor '{GATE}' has shape \[96, 64\], config.json implies "
                                                        r"\[100, 64\]$"),
    # q/k/v are one joined weight of the same total width (6*32 + 32 + 32 = 4*32 + 2*64): each part is checked
    (lambda d: _edit_config(d, num_attention_heads=6, num_key_value_heads=1),
     r"tensor 'model.layers.0.self_attn.q_proj.weight' has shape \[128, 64\], config.json implies \[192, 64\]$"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object, got list"),
    (lambda d: _edit_config(d, eos_token_id="x"), "config.json: field 'eos_token_id' should be a token id or a list"),
    # sizes beyond any model, refused before anything is sized by them (once a MemoryError building 10**9 layer
    # types, a RoPE table of terabytes, an OverflowError in the graph builder)
    (lambda d: _edit_config(d, num_hidden_layers=10**9, layer_types=None),
     r"config.json: field 'num_hidden_layers' 1000000000 is beyond any model \(at most 4096\)$"),
    (lambda d: _edit_config(d, head_dim=10**12), r"config.json: field 'head_dim' 1000000000000 is beyond any model"),
    (lambda d: _edit_config(d, vocab_size=2**70),
     r"config.json: field 'vocab_size' 1180591620717411303424 is beyond any model \(at most 9223372036854775807\)$"),
    (lambda d: _edit_config(d, rope_parameters={"full_attention": {"rope_theta": "abc"},
                                                 "sliding_attention": {"rope_theta": 1e4}}),
     "config.json: field 'rope_parameters.full_attention.rope_theta' should be float, got 'abc'"),
    (lambda d: _edit_config(d, rope_parameters=None, rope_scaling="linear"),
     "config.json: field 'rope_scaling' should be an object, got 'linear'"),
    (lambda d: _edit_config(d, bos_token_id="x"), "config.json: field 'bos_token_id' should be an integer, got 'x'"),
    (lambda d: _edit_config(d, bos_token_id=96), "config.json: field 'bos_token_id' 96 outside the vocabulary of 96"),
    (lambda d: _edit_config(d, query_pre_attn_scalar=[1]), "field 'query_pre_attn_scalar' should be float"),
    (lambda d: _edit_config(d, final_logit_softcapping="x"), "field 'final_logit_softcapping' should be float"),
    (lambda d: _edit_config(d, max_position_embeddings=1),
     "field 'max_position_embeddings' 1 leaves no room for a prompt and a new token"),
    (lambda d: _edit_config(d, eos_token_id=10**9), "'eos_token_id' \\[1000000000\\] outside the vocabulary"),
    (lambda d: _edit_config(d, hidden_activation="relu9"), "activation 'relu9' unsupported"),
    (lambda d: _edit_config(d, rope_parameters={"full_attention": {"rope_type": "weird", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_theta": 1e4}}),
     "rope_type 'weird' unsupported"),
    (lambda d: _edit_config(d, sliding_window=-1), "'sliding_window' -1 must be positive"),
    (lambda d: _edit_config(d, hidden_size=64.5), "'hidden_size' should be an integer, got 64.5"),
    # an integer past a float's precision: once "should be an integer", as 640.5 is
    (lambda d: _edit_config(d, sliding_window=10**30), r"field 'sliding_window' 10{30} is beyond any model"),
    (lambda d: _edit_config(d, num_hidden_layers=0), "'num_hidden_layers' must be positive"),
    (lambda d: (d / "tokenizer.json").write_text('{"version": '), "tokenizer.json: not a valid tokenizer.json"),
    # values that once reached Python or numpy as they were: a complex scale, an unhashable type, int(inf)
    (lambda d: _edit_config(d, query_pre_attn_scalar=-16), "field 'query_pre_attn_scalar' -16.0 must be positive"),
    (lambda d: _edit_config(d, model_type=["gemma3_text"]), r"model_type \['gemma3_text'\] is not supported"),
    (lambda d: _edit_config(d, hidden_size=float("inf")), "field 'hidden_size' should be an integer, got inf"),
    (lambda d: _edit_config(d, num_key_value_heads=0), "field 'num_key_value_heads' must be positive"),
    # values that exported and gave NaN or another model: checked, not taken as they came
    (lambda d: _edit_config(d, rms_norm_eps=-1e-6), "field 'rms_norm_eps' -1e-06 must not be negative"),
    (lambda d: _edit_config(d, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 0},
                                                 "sliding_attention": {"rope_theta": 1e4}}),
     "rope_theta 0.0 must be positive"),
    (lambda d: _edit_config(d, final_logit_softcapping=0), "field 'final_logit_softcapping' 0.0 must be positive"),
    (lambda d: _edit_config(d, tie_word_embeddings="false"),
     "field 'tie_word_embeddings' should be true or false, got 'false'"),
    (lambda d: _edit_config(d, layer_types="sliding_attention"),
     "field 'layer_types' should be a list of layer types, got 'sliding_attention'"),
    # fields that change transformers' maths and the graph does not build: refused, not exported as another model
    (lambda d: _edit_config(d, attention_bias=True), "field 'attention_bias' is not supported"),
    (lambda d: _edit_config(d, attn_logit_softcapping=50.0),
     "field 'attn_logit_softcapping' 50.0 is not supported \\(transformers' Gemma 3 does not apply it"),
    (lambda d: _edit_config(d, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_theta": 1e4}}),
     "field 'rope_parameters.full_attention.partial_rotary_factor' 0.5 is not supported with rope_type 'default'"),
    # safetensors headers that lie: each named, not a ValueError / KeyError / OverflowError from numpy
    (lambda d: _edit_header(d, lambda h: h.update(X=[1])), "tensor 'X' has a header entry that is not an object"),
    (lambda d: _edit_header(d, lambda h: h[FIRST].pop("shape")), f"tensor '{FIRST}' has shape None, not a list"),
    (lambda d: _edit_header(d, lambda h: h[FIRST].update(data_offsets=h[FIRST]["data_offsets"][::-1])),
     f"tensor '{FIRST}' has data_offsets \\[\\d+, 0\\], not \\[start, end\\]"),
    (lambda d: _edit_header(d, lambda h: h[FIRST].update(dtype="F16")), f"tensor '{FIRST}' has \\d+ bytes, but F16"),
    # sizes whose product numpy's int64 wraps to 0 bytes (taken as a tensor) or cannot hold (an OverflowError)
    (lambda d: _edit_header(d, lambda h: h.update(X={"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]})),
     r"tensor 'X' has 0 bytes, but F32 \[4294967296, 4294967296\] needs 73786976294838206464"),
    (lambda d: _edit_header(d, lambda h: h.update(X={"dtype": "U8", "shape": [2**70], "data_offsets": [0, 0]})),
     r"tensor 'X' has 0 bytes, but U8 \[1180591620717411303424\] needs"),
    # tensors reading each other's bytes, a tensor's entry given twice (json.loads kept the last): exported as
    # they came, where the safetensors library refuses them
    (lambda d: _edit_header(d, lambda h: h.update(X=h[GATE])),
     rf"model.safetensors: tensors '(X|{GATE})' and '(X|{GATE})' share bytes \(their data_offsets overlap\)$"),
    # one byte shared, the last of GATE (tensors side by side, each ending where the next starts, are the norm)
    (lambda d: _edit_header(d, lambda h: h.update(X={"dtype": "U8", "shape": [1], "data_offsets": [
        h[GATE]["data_offsets"][1] - 1, h[GATE]["data_offsets"][1]]})),
     rf"model.safetensors: tensors '(X|{GATE})' and '(X|{GATE})' share bytes \(their data_offsets overlap\)$"),
    (lambda d: _edit_header(d, lambda h: json.dumps(h)[:-1] + f', "{GATE}": ' + json.dumps(h[GATE]) + "}"),
     rf"model.safetensors: not a valid safetensors file \('{GATE}' is given twice\)$"),
    # a Linear weight stored transposed has the right sizes "in either order": once a ValueError mid-export
    (lambda d: _edit_header(d, lambda h: h[GATE].update(shape=h[GATE]["shape"][::-1])),
     rf"tensor '{GATE}' has shape \[64, 96\], config.json implies \[96, 64\]"),
    # JSON from someone else that Python's parser refuses with other errors than JSONDecodeError: arrays nested
    # deeper than it recurses (a RecursionError) and a number past its 4300 digits (a plain ValueError)
    (lambda d: (d / "config.json").write_text(DEEP), r"config.json: not valid JSON \(nested too deeply\)$"),
    (lambda d: (d / "config.json").write_text(HUGE_NUMBER), r"config.json: not valid JSON \(Exceeds the limit"),
    (lambda d: (d / "generation_config.json").write_text(DEEP), r"generation_config.json: not valid JSON \(nested"),
    (lambda d: (d / "generation_config.json").write_text(HUGE_NUMBER), "generation_config.json: not valid JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text(DEEP), r"tokenizer_config.json: not valid JSON \(nested"),
    (lambda d: (d / "tokenizer_config.json").write_text(HUGE_NUMBER), "tokenizer_config.json: not valid JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", len(DEEP)) + DEEP.encode()),
     r"model.safetensors: not a valid safetensors file \(nested too deeply\)$"),
    (lambda d: (d / "model.safetensors.index.json").write_text(DEEP),
     r"model.safetensors.index.json: not a valid safetensors index \(nested too deeply\)$"),
    # a download cut short inside the header: once "bad header length", which does not say the file is incomplete
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     r"model.safetensors: not a valid safetensors file \(truncated: a header of \d+ bytes in a file of 100\)$"),
    # a header of 300 MB (a list in __metadata__) took 1.5 GB and 21 s to read: past the safetensors library's limit
    (lambda d: _sparse(d / "model.safetensors", struct.pack("<Q", 100_000_001), 8 + 100_000_001),
     r"model.safetensors: not a valid safetensors file \(a header of 100000001 bytes, more than the safetensors "
     r"library reads \(100000000\)\)$"),
    # a FIFO (a tar archive can hold one) among the *.safetensors: once opened and read from, waiting forever
    (lambda d: mkfifo(d / "extra.safetensors"), r"extra.safetensors: is a FIFO, not a file$"),
    (lambda d: ((d / "config.json").unlink(), mkfifo(d / "config.json")),
     r"config.json: is a FIFO, not a file \(a model directory needs config.json\)$"),
    (lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer.json").mkdir()),
     r"tokenizer.json: is a directory, not a file \(the bundle needs the model's tokenizer.json\)$"),
])
def test_bad_model_dir(tiny_gemma3, tmp_path, mutate, message):
    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    mutate(d)
    with pytest.raises(EdgemtpError, match=message):
        export(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _two_shards(model_dir, tmp_path) -> tuple:
    """A copy of `model_dir` with its weights in two shards and the index naming them: (dir, weights, {shard:
    names}, index)."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: weights[n] for n in part}, str(d / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, weights, halves, index


def test_sharded_checkpoint_reads_what_its_index_names(tiny_gemma3, tmp_path):
    """Shards are read as model.safetensors.index.json maps them: an earlier download's shard beside them
    (other values under the same names) is not read, as transformers does not. Without an index, a tensor in
    two files is refused, naming both (the last file by name won, silently); a bad index is named."""
    from safetensors.numpy import save_file

    from edgemtp.checkpoint import Checkpoint

    d, weights, halves, index = _two_shards(tiny_gemma3[1], tmp_path)
    names = sorted(weights)
    save_file({n: weights[n] + 1 for n in names}, str(d / "model-00001-of-00003.safetensors"))  # stale
    ckpt = Checkpoint(d)
    assert all(np.array_equal(ckpt[n], weights[n]) for n in names)
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": {names[0]: "gone.safetensors"}}))
    with pytest.raises(EdgemtpError, match="model.safetensors.index.json: names gone.safetensors, which is not in"):
        Checkpoint(d)
    # a shard named by a path: a file outside the model directory was opened (its header read)
    for elsewhere in ("../model-00001-of-00002.safetensors", str(d / "model-00001-of-00002.safetensors")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: elsewhere}}))
        with pytest.raises(EdgemtpError, match="index.json: names '.*', which is not a file name in"):
            Checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(EdgemtpError, match="model.safetensors.index.json: not a valid safetensors index"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(EdgemtpError, match=f"tensor '{names[0]}' is in both model-00001-of-00002.safetensors and "
                                           "model-00001-of-00003.safetensors"):
        Checkpoint(d)


def test_shards_the_index_names_are_read_whole_as_transformers_reads_them(tiny_gemma3, tmp_path):
    """transformers reads every tensor of each shard model.safetensors.index.json names (its weight_map only picks
    the files): a tensor there that the weight_map leaves out is read (an lm_head.weight of its own values beside
    tie_word_embeddings true was skipped, and the bundle tied: logits off by 1.5), and one in two of those shards
    is refused, naming both (the index's was read, transformers reads the last file's: other logits)."""
    from safetensors.numpy import save_file

    from edgemtp.checkpoint import Checkpoint
    from edgemtp.exporters import load_config
    from edgemtp.exporters.checkpoint_checks import own_head

    d, weights, halves, _ = _two_shards(tiny_gemma3[1], tmp_path)
    head = weights[FIRST] + 1
    save_file({**{n: weights[n] for n in halves["model-00002-of-00002.safetensors"]}, "lm_head.weight": head},
              str(d / "model-00002-of-00002.safetensors"))
    ckpt = Checkpoint(d)
    np.testing.assert_array_equal(ckpt["lm_head.weight"], head)
    assert not own_head(load_config(d)[0], ckpt).tie_word_embeddings
    first = halves["model-00001-of-00002.safetensors"][0]
    save_file({**{n: weights[n] for n in halves["model-00002-of-00002.safetensors"]}, first: weights[first] * 2},
              str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(EdgemtpError, match=f"tensor '{first}' is in both model-00001-of-00002.safetensors and "
                                           "model-00002-of-00002.safetensors"):
        Checkpoint(d)


def test_checkpoint_reads_bf16_and_fp16_as_their_float32_values(tmp_path):
    """Most checkpoints on the Hub are bf16 (the top half of an fp32) or fp16: read as the float32 values torch
    holds, and a file cut short (a partial download) is named, not met as a numpy error mid-export."""
    import torch
    from safetensors.torch import save_file

    from edgemtp.checkpoint import Checkpoint

    values = torch.tensor([[1.0, -2.5, 0.15625], [3.0e38, -1.0e-30, 0.0]])
    tensors = {"b": values.to(torch.bfloat16), "f": values,
               "h": torch.tensor([[1.0, -2.5], [65504.0, 6.0e-5]]).to(torch.float16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    for name, t in tensors.items():
        got = ckpt[name]
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, t.float().numpy(), err_msg=name)
    np.testing.assert_array_equal(ckpt.rows("b", [1]), tensors["b"][1:].float().numpy())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(EdgemtpError, match=r"model.safetensors: truncated \(tensor '.' runs past the end of the file"):
        Checkpoint(tmp_path)


def test_checkpoint_equal_compares_every_row(tmp_path):
    """Whether a head equals the embedding (tied or not) is read a few rows at a time: a difference in the last
    rows, or a shape that differs, makes them unequal."""
    from safetensors.numpy import save_file

    from edgemtp.checkpoint import Checkpoint

    a = np.arange(15, dtype=np.float32).reshape(5, 3)
    last = a.copy()
    last[-1, -1] += 1
    save_file({"a": a, "same": a.copy(), "last": last, "short": a[:4].copy()}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    for rows in (1, 2, 4096):
        assert ckpt.equal("a", "same", rows=rows), rows
        assert not ckpt.equal("a", "last", rows=rows), rows
        assert not ckpt.equal("a", "short", rows=rows) and not ckpt.equal("short", "a", rows=rows), rows


@pytest.mark.parametrize("dtype, name", [(np.int8, "I8"), (np.uint8, "U8")])
def test_quantized_weights_are_refused(tiny_gemma3, tmp_path, dtype, name):
    """A quantized checkpoint's weights (bitsandbytes' 8-bit: an I8 `weight` of the Linear's shape beside its
    scales, `SCB`) are not the model's values: they were cast to float and exported, logits off by 1.0, with a
    warning about unused tensors alone. Refused, naming the tensor and its dtype."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    weights = load_file(str(d / "model.safetensors"))
    scale = np.abs(weights[GATE]).max(axis=1)
    weights[GATE] = np.round(weights[GATE] / scale[:, None] * 127).astype(dtype)
    weights[GATE.replace("weight", "SCB")] = scale
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(EdgemtpError, match=f"tensor '{GATE}' is {name}, not floating-point"):
        export(d, tmp_path / "out", capacity=64)
    assert not (tmp_path / "out").exists()


def test_checkpoint_tensors_the_graph_does_not_read_are_named(tiny_gemma3, tmp_path):
    """A config.json that does not describe its checkpoint (one layer short; a norm of another architecture)
    exported without a word a model transformers would warn about: the CLI says which tensors it left out."""
    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from edgemtp.cli import cli

    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    _edit_config(d, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    save_file({"model.layers.0.self_attn.q_bias": np.zeros(4, np.float32)}, str(d / "extra.safetensors"))
    r = CliRunner().invoke(cli, ["export", str(d), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    warning = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {d}: 14 checkpoint tensor(s) unused by the model config.json describes: "
                       "model.layers.0.self_attn.q_bias, model.layers.3.input_layernorm.weight, "
                       "model.layers.3.mlp.down_proj.weight (and 11 more); the export leaves them out, as "
                       "transformers would (is config.json this checkpoint's?)"], r.output
    with pytest.warns(UserWarning, match="14 checkpoint tensor") as said:  # from Python: at the app's line
        export(d, tmp_path / "again")
    assert {w.filename for w in said} == {__file__}


def test_tokenizer_ids_beyond_the_vocabulary_are_named_at_export(tiny_gemma3, tmp_path):
    """A tokenizer.json with tokens the embedding table has no row for (a pad token added as id vocab_size, the
    table never resized) exported without a word; the bundle refused the first prompt holding one. It still
    exports (transformers loads such a model too, and prompts without those tokens run), with a warning naming
    them; the bundle's other prompts give what the tokenizer's own ids give."""
    from click.testing import CliRunner
    from tokenizers import AddedToken, Tokenizer

    from edgemtp.cli import cli

    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<pad>", special=True)])  # id 96: the vocabulary is 96
    tok.add_tokens(["big"])  # 97
    tok.save(str(d / "tokenizer.json"))
    r = CliRunner().invoke(cli, ["export", str(d), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    warning = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {d / 'tokenizer.json'}: 2 token(s) with ids beyond config.json's vocab_size 96, "
                       "which the model has no embedding for: '<pad>' (96), 'big' (97); a prompt holding one is "
                       "refused (is tokenizer.json this model's?)"], r.output
    with pytest.warns(UserWarning, match="2 token") as said:  # from Python: at the app's line
        export(d, tmp_path / "again")
    assert {w.filename for w in said} == {__file__}
    engine = Engine.load(tmp_path / "out")
    assert engine.generate("t1 t2", max_new_tokens=3).tokens == Engine.load(tiny_gemma3[2]).generate(
        "t1 t2", max_new_tokens=3).tokens


def test_tensors_outside_the_text_model_are_not_reported(tiny_gemma3, tmp_path):
    """A multimodal checkpoint's vision and audio towers, an lm_head equal to the tied embedding and saved
    rotary frequencies are no sign of a wrong config.json."""
    import warnings

    from safetensors.numpy import load_file, save_file

    from edgemtp.checkpoint import Checkpoint
    from edgemtp.exporters import load_config
    from edgemtp.exporters.checkpoint_checks import own_head, unused_tensors

    d = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], d)
    weights = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    nested = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    save_file({**nested, "model.vision_tower.patch.weight": np.zeros(4, np.float32),
               "model.embed_audio.weight": np.zeros(4, np.float32),
               "lm_head.weight": weights["model.embed_tokens.weight"],
               "model.language_model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)},
              str(d / "model.safetensors"))
    cfg, build = load_config(d)
    ckpt = Checkpoint(d)
    assert own_head(cfg, ckpt).tie_word_embeddings and unused_tensors(build(cfg, 64)[0], ckpt) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(d, tmp_path / "out", capacity=64)
    save_file({"model.language_model.layers.9.mlp.up_proj.weight": np.zeros(4, np.float32)}, str(d / "x.safetensors"))
    assert unused_tensors(build(cfg, 64)[0], Checkpoint(d)) == ["model.layers.9.mlp.up_proj.weight"]


def test_the_older_multimodal_layout_is_read_as_transformers_renames_it(tmp_path):
    """language_model.model.* and an untied language_model.lm_head.weight (llava-style Gemma 3 / Mistral 3
    checkpoints): transformers 5 renames them to the text model's names on load, and so does Checkpoint."""
    from safetensors.numpy import save_file

    from edgemtp.checkpoint import Checkpoint

    d = tmp_path / "model"
    d.mkdir()
    save_file({"language_model.model.embed_tokens.weight": np.ones((4, 2), np.float32),
               "language_model.lm_head.weight": np.full((4, 2), 2.0, np.float32),
               "vision_tower.patch.weight": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    ckpt = Checkpoint(d)
    assert sorted(ckpt.keys()) == ["lm_head.weight", "model.embed_tokens.weight", "vision_tower.patch.weight"]
    assert ckpt["lm_head.weight"][0, 0] == 2.0 and ckpt.outside_text == {"vision_tower.patch.weight"}


def test_whole_numbers_written_as_floats_or_strings_are_accepted(tiny_gemma3):
    from edgemtp.config import parse_gemma3, read_config_json

    hf = read_config_json(tiny_gemma3[1])
    loose = {**hf, "hidden_size": float(hf["hidden_size"]), "vocab_size": str(hf["vocab_size"]),
             "hidden_activation": None, "sliding_window_pattern": None}
    assert parse_gemma3(loose, "x") == parse_gemma3({**hf, "hidden_activation": None}, "x")
    with pytest.raises(EdgemtpError) as e:
        parse_gemma3({**hf, "hidden_size": 64.5}, "x")
    assert str(e.value) == "x: field 'hidden_size' should be an integer, got 64.5"  # and nothing more


def test_loose_but_legitimate_config_values_keep_their_meaning(tiny_gemma3):
    """What configs in the wild write: an empty rope_parameters (then rope_theta counts), a null bos (no
    BOS), eos ids written as floats or strings."""
    from edgemtp.config import parse_gemma3, parse_llama, read_config_json

    hf = read_config_json(tiny_gemma3[1])
    llama = {**hf, "model_type": "llama", "hidden_activation": None, "rope_parameters": {}, "rope_theta": 500000.0}
    assert parse_llama(llama, "x").rope["full_attention"].theta == 500000.0
    assert parse_gemma3({**hf, "bos_token_id": None}, "x").bos_token_id is None
    assert parse_gemma3({k: v for k, v in hf.items() if k != "bos_token_id"}, "x").bos_token_id == 2
    assert parse_gemma3({**hf, "eos_token_id": [1.0, "2"]}, "x").eos_token_ids == (1, 2)


def test_gemma3_sliding_window_0_is_refused_where_layers_slide(tiny_gemma3):
    """A Gemma 3 sliding_window of 0 was read as the default 4096. transformers' Gemma 3 (5.x) has no such
    reading: its sliding layers' mask lets a query see no key at all, and a forward with its cache fails on the
    mask's size while one without gives eager and sdpa different logits. Refused where a layer slides;
    unused (any value) where none does."""
    from edgemtp.config import FULL, parse_gemma3, read_config_json

    hf = read_config_json(tiny_gemma3[1])
    with pytest.raises(EdgemtpError, match="field 'sliding_window' 0 must be positive"):
        parse_gemma3({**hf, "sliding_window": 0}, "x")
    full = {**hf, "sliding_window": 0, "layer_types": [FULL] * hf["num_hidden_layers"]}
    assert parse_gemma3(full, "x").layer_types == (FULL,) * hf["num_hidden_layers"]


def test_gemma3_rope_scaling_type_that_transformers_does_not_read_is_refused(tiny_gemma3):
    """Gemma3TextConfig updates {"rope_type": "default"} with rope_scaling: an old 'type' alone leaves the RoPE
    default (transformers 4 applied it), and was exported as the scaling it names."""
    from edgemtp.config import FULL, parse_gemma3, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "rope_parameters": None}
    with pytest.raises(EdgemtpError, match=re.escape("field 'rope_scaling.type' 'linear' is not read by "
                                                     "transformers' Gemma 3 (its RoPE stays 'default')")):
        parse_gemma3({**hf, "rope_scaling": {"type": "linear", "factor": 8.0}}, "x")
    both = {**hf, "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 8.0}}
    assert parse_gemma3(both, "x").rope[FULL].factor == 8.0
    with pytest.raises(EdgemtpError, match=re.escape("field 'rope_scaling' should be an object, got [8.0]")):
        parse_gemma3({**hf, "rope_scaling": [8.0]}, "x")


def test_a_missing_eos_token_id_is_the_config_classes(tiny_gemma3):
    """transformers' generate stops on the config class's eos_token_id where config.json leaves it out (LlamaConfig's
    2); no stop token was read, so generation ran to max_new_tokens. A null one means none, as transformers."""
    import transformers

    from edgemtp.config import read_config_json
    from edgemtp.config_llama import parse_llama
    from edgemtp.exporters.phi3 import parse_config as parse_phi3

    hf = {k: v for k, v in read_config_json(tiny_gemma3[1]).items() if k not in ("eos_token_id", "rope_parameters",
                                                                                  "layer_types")}
    hf.update(hidden_activation=None, vocab_size=128_256)
    for kind, cls in (("llama", transformers.LlamaConfig), ("mistral", transformers.MistralConfig),
                      ("granite", transformers.GraniteConfig), ("smollm3", transformers.SmolLM3Config),
                      ("qwen2", transformers.Qwen2Config)):
        want = transformers.GenerationConfig.from_model_config(cls()).eos_token_id
        want = () if want is None else (want,)
        assert parse_llama({**hf, "model_type": kind}, "x").eos_token_ids == want, kind
    assert parse_llama({**hf, "model_type": "llama", "eos_token_id": None}, "x").eos_token_ids == ()
    from edgemtp.config import parse_gemma3

    gemma = read_config_json(tiny_gemma3[1])  # Gemma's 1 when left out; null is none there too (it was 1)
    assert parse_gemma3({k: v for k, v in gemma.items() if k != "eos_token_id"}, "x").eos_token_ids == (1,)
    assert parse_gemma3({**gemma, "eos_token_id": None}, "x").eos_token_ids == ()
    assert parse_phi3({**hf, "model_type": "phi3"}, "x").eos_token_ids == (transformers.Phi3Config().eos_token_id,)


def test_a_missing_bos_token_id_is_the_config_classes(tiny_gemma3):
    """Where config.json leaves bos_token_id out (not null), transformers' config class gives its own (LlamaConfig's
    1, SmolLM3Config's 128000; none for Qwen2 / Qwen3), as Gemma's parsers did already (2); the llama family and
    Phi-3 recorded none, and calibration windows went without it. A null one is none; a default outside the
    vocabulary is none too, as eos_token_id's."""
    import transformers

    from edgemtp.config import read_config_json
    from edgemtp.config_llama import parse_llama
    from edgemtp.exporters.phi3 import parse_config as parse_phi3

    hf = {k: v for k, v in read_config_json(tiny_gemma3[1]).items() if k not in ("bos_token_id", "rope_parameters",
                                                                                  "layer_types")}
    hf.update(hidden_activation=None, vocab_size=128_256)
    for kind in ("llama", "mistral", "ministral3", "granite", "smollm3", "qwen2", "qwen3"):
        want = transformers.AutoConfig.for_model(kind).bos_token_id
        assert parse_llama({**hf, "model_type": kind}, "x").bos_token_id == want, kind
        assert parse_llama({**hf, "model_type": kind, "bos_token_id": None}, "x").bos_token_id is None, kind
    assert parse_phi3({**hf, "model_type": "phi3"}, "x").bos_token_id == transformers.Phi3Config().bos_token_id
    assert parse_phi3({**hf, "model_type": "phi3", "bos_token_id": None}, "x").bos_token_id is None
    assert parse_llama({**hf, "model_type": "smollm3", "vocab_size": 128_000}, "x").bos_token_id is None
    assert parse_llama({**hf, "model_type": "smollm3", "vocab_size": 128_001}, "x").bos_token_id == 128_000


def test_gemma3_sliding_window_null_is_refused(tiny_gemma3):
    """null was read as 4096, a window transformers' Gemma 3 does not have (it fails); missing is
    Gemma3TextConfig's 4096."""
    from edgemtp.config import parse_gemma3, read_config_json

    hf = {**read_config_json(tiny_gemma3[1])}
    with pytest.raises(EdgemtpError, match=re.escape("field 'sliding_window' is null, but layer_types names sliding "
                                                     "layers")):
        parse_gemma3({**hf, "sliding_window": None}, "x")
    assert parse_gemma3({k: v for k, v in hf.items() if k != "sliding_window"}, "x").sliding_window == 4096


def test_llama_fields_of_the_wrong_type_are_named(tiny_gemma3):
    from edgemtp.config import parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "llama", "hidden_activation": None,
          "rope_parameters": None}
    parse_llama(hf, "x")
    for change, message in (({"rope_scaling": [2.0]}, "field 'rope_scaling' should be an object, got [2.0]"),
                            ({"rope_scaling": {"rope_type": "linear", "factor": "big"}},
                             "field 'rope_scaling.factor' should be float, got 'big'"),
                            ({"rope_theta": "x"}, "field 'rope_theta' should be float, got 'x'"),
                            ({"head_dim": "wide"}, "field 'head_dim' should be an integer, got 'wide'"),
                            ({"num_key_value_heads": 1.5}, "field 'num_key_value_heads' should be an integer")):
        with pytest.raises(EdgemtpError, match=re.escape(message)):
            parse_llama({**hf, **change}, "x")


def test_llama_and_qwen2_fields_that_change_the_maths_are_refused(tiny_gemma3):
    """What transformers computes and the llama graph does not: MLP biases, a partial RoPE other than
    'proportional'. Each once exported silently, with other logits. qwen2's sliding layers are built
    (tests/test_parity.py) where transformers has a window to give them."""
    from edgemtp.config import FULL, SLIDING, parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "llama", "hidden_activation": None,
          "rope_parameters": None, "layer_types": None}
    qwen2 = {**hf, "model_type": "qwen2", "sliding_window": 8}
    no_window = "field 'layer_types' names sliding layers, but use_sliding_window is false or sliding_window null"
    for cfg, message in (({**hf, "mlp_bias": True}, "field 'mlp_bias' is not supported"),
                         ({**qwen2, "layer_types": ["full_attention", "sliding_attention"] * 2}, no_window),
                         ({**qwen2, "use_sliding_window": True, "sliding_window": None,
                           "layer_types": [SLIDING] * 4}, no_window),
                         ({**qwen2, "use_sliding_window": True, "layer_types": [SLIDING] * 3},
                          "field 'layer_types' has 3 entries for 4 layers"),
                         ({**qwen2, "use_sliding_window": True, "max_window_layers": "two"},
                          "field 'max_window_layers' should be an integer, got 'two'"),
                         ({**qwen2, "use_sliding_window": True, "max_window_layers": None},
                          "field 'max_window_layers' is null, but use_sliding_window needs it"),
                         ({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
                          "field 'rope_scaling.partial_rotary_factor' 0.5 is not supported with rope_type 'linear'"),
                         ({**hf, "rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": 1.5}},
                          "field 'rope_scaling.partial_rotary_factor' 1.5 must be in [0, 1]"),
                         # a top-level fraction is the parameters' default (transformers' setdefault): it was left
                         # out, so the whole head was rotated where transformers fails
                         ({**hf, "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                          "field 'partial_rotary_factor' 0.5 is not supported with rope_type 'linear'"),
                         ({**hf, "partial_rotary_factor": 0.5}, "field 'partial_rotary_factor' 0.5 is not supported "
                                                                "with rope_type 'default'"),
                         ({**hf, "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "proportional",
                                                                                "partial_rotary_factor": 1.5}},
                          "field 'rope_scaling.partial_rotary_factor' 1.5 must be in [0, 1]")):
        with pytest.raises(EdgemtpError, match=re.escape(message)):
            parse_llama(cfg, "x")
    # what transformers ignores: qwen2's mlp_bias and attention_bias (q/k/v biases always, none on o_proj), a
    # sliding window that is off or starts past the last layer
    for cfg in ({**qwen2, "mlp_bias": True, "attention_bias": False},
                {**qwen2, "use_sliding_window": False, "max_window_layers": 0},
                {**qwen2, "use_sliding_window": True, "max_window_layers": 4}):
        parsed = parse_llama(cfg, "x")
        assert parsed.attention_bias and not parsed.output_bias
        assert parsed.layer_types == (FULL,) * 4 and parsed.sliding_window is None
    # transformers' reading: from max_window_layers on with use_sliding_window (window 4096 when unsaid)
    parsed = parse_llama({**qwen2, "use_sliding_window": True, "max_window_layers": 1}, "x")
    assert parsed.layer_types == (FULL,) + (SLIDING,) * 3 and parsed.sliding_window == 8
    parsed = parse_llama({**qwen2, "sliding_window": None, "use_sliding_window": True, "max_window_layers": 3}, "x")
    assert parsed.layer_types == (FULL,) * 4 and parsed.sliding_window is None
    unsaid = {k: v for k, v in qwen2.items() if k != "sliding_window"}
    assert parse_llama({**unsaid, "use_sliding_window": True, "max_window_layers": 3}, "x").sliding_window == 4096
    assert parse_llama({**hf, "attention_bias": True}, "x").output_bias
    top = {**hf, "partial_rotary_factor": 0.5}  # the parameters' own fraction wins over the top-level one
    assert parse_llama({**top, "rope_parameters": {"rope_type": "proportional"}}, "x").rope[FULL].fraction == 0.5
    assert parse_llama({**top, "rope_parameters": {"rope_type": "proportional", "partial_rotary_factor": 0.25}},
                       "x").rope[FULL].fraction == 0.25


def test_qwen3_fields_read_as_transformers_reads_them(tiny_gemma3):
    """Qwen3Config: head_dim 128 when unsaid (not hidden / heads), attention_bias on q/k/v and o_proj (off by
    default), MLP biases never whatever mlp_bias says, sliding layers as qwen2's; q/k norms always."""
    from edgemtp.config import FULL, SLIDING, parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "qwen3", "hidden_activation": None,
          "rope_parameters": None, "layer_types": None, "sliding_window": 8}
    unsaid = {k: v for k, v in hf.items() if k != "head_dim"}
    parsed = parse_llama({**unsaid, "mlp_bias": True}, "x")
    assert parsed.head_dim == 128 and parsed.qk_norm and not parsed.attention_bias and not parsed.output_bias
    assert parsed.layer_types == (FULL,) * 4 and parsed.sliding_window is None
    parsed = parse_llama({**hf, "attention_bias": True, "use_sliding_window": True, "max_window_layers": 2}, "x")
    assert parsed.head_dim == hf["head_dim"] and parsed.attention_bias and parsed.output_bias
    assert parsed.layer_types == (FULL,) * 2 + (SLIDING,) * 2 and parsed.sliding_window == 8
    assert not parse_llama({**hf, "model_type": "qwen2"}, "x").qk_norm


def test_mistral_fields_read_as_transformers_reads_them(tiny_gemma3):
    """MistralConfig: every layer slides, by sliding_window (4096 when the field is missing, none when null);
    'layer_types', attention_bias and mlp_bias change nothing; 8 KV heads when unsaid."""
    from edgemtp.config import FULL, SLIDING, parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "mistral", "hidden_activation": None,
          "rope_parameters": None, "sliding_window": 8, "layer_types": [FULL, SLIDING] * 2}
    parsed = parse_llama({**hf, "attention_bias": True, "mlp_bias": True}, "x")
    assert parsed.layer_types == (SLIDING,) * 4 and parsed.sliding_window == 8
    assert not parsed.attention_bias and not parsed.output_bias and not parsed.qk_norm
    unsaid = {k: v for k, v in hf.items() if k not in ("sliding_window", "num_key_value_heads")}
    parsed = parse_llama({**unsaid, "num_attention_heads": 16}, "x")
    assert parsed.sliding_window == 4096 and parsed.num_kv_heads == 8
    # max_position_embeddings unsaid: each MistralConfig / LlamaConfig default, as transformers reads them
    positions = {k: v for k, v in hf.items() if k != "max_position_embeddings"}
    assert parse_llama(positions, "x").max_position_embeddings == 131072
    assert parse_llama({**positions, "model_type": "llama"}, "x").max_position_embeddings == 2048
    parsed = parse_llama({**hf, "sliding_window": None}, "x")
    assert parsed.layer_types == (FULL,) * 4 and parsed.sliding_window is None


def test_bad_max_context(tiny_gemma3, tmp_path):
    from click.testing import CliRunner

    from edgemtp.cli import cli

    args = ["export", str(tiny_gemma3[1]), "-o", str(tmp_path / "out"), "--max-context"]
    r = CliRunner().invoke(cli, args + ["99999999999"])  # once tried to allocate 373 GiB
    assert r.exit_code == 2 and r.output == ("error: --max-context 99999999999 exceeds the model's "
                                             "max_position_embeddings (256, config.json)\n")
    assert not (tmp_path / "out").exists()
    # by default: 4096 positions, or max_position_embeddings when fewer (256 for this tiny model)
    assert CliRunner().invoke(cli, args[:-1]).exit_code == 0
    assert bundle.load(tmp_path / "out").target_contract.capacity == 256


def test_smollm3_fields_read_as_transformers_reads_them(tiny_gemma3):
    """SmolLM3Config: every 4th layer without RoPE unless no_rope_layers lists them (1: rotate); with
    use_sliding_window those layers slide; tied embeddings and 4 KV heads when unsaid."""
    from edgemtp.config import FULL, SLIDING, parse_llama, read_config_json

    drop = ("layer_types", "rope_parameters", "tie_word_embeddings", "num_key_value_heads", "num_hidden_layers")
    hf = {k: v for k, v in read_config_json(tiny_gemma3[1]).items() if k not in drop}
    hf = {**hf, "model_type": "smollm3", "hidden_activation": None, "num_hidden_layers": 8, "num_attention_heads": 8}
    cfg = parse_llama(hf, "x")
    assert cfg.nope_layers == (3, 7) and cfg.layer_types == (FULL,) * 8 and cfg.sliding_window is None
    assert cfg.tie_word_embeddings and cfg.num_kv_heads == 4
    cfg = parse_llama({**hf, "no_rope_layers": [1, 0] * 4, "use_sliding_window": True, "sliding_window": 8}, "x")
    assert cfg.nope_layers == (1, 3, 5, 7) and cfg.layer_types == (FULL, SLIDING) * 4 and cfg.sliding_window == 8
    from edgemtp.exporters.gemma3 import drafter_kv

    assert drafter_kv(parse_llama(hf, "x")) == {FULL: 6}  # an MTP drafter reads the last layer with RoPE
    with pytest.raises(EdgemtpError, match="field 'no_rope_layers' must list 0 or 1 for each of the 8 layers"):
        parse_llama({**hf, "no_rope_layers": [1, 0]}, "x")
    with pytest.raises(EdgemtpError, match="field 'no_rope_layer_interval' must not be 0"):  # transformers divides
        parse_llama({**hf, "no_rope_layer_interval": 0}, "x")
    # layer_types' sliding layers slide by sliding_window with use_sliding_window off too (transformers' mask)
    cfg = parse_llama({**hf, "layer_types": [FULL, SLIDING] * 4, "sliding_window": 8}, "x")
    assert cfg.layer_types == (FULL, SLIDING) * 4 and cfg.sliding_window == 8
    assert parse_llama({**hf, "sliding_window": 8}, "x").sliding_window is None  # derived types: the flag decides
    with pytest.raises(EdgemtpError, match="field 'layer_types' names sliding layers, but sliding_window is null"):
        parse_llama({**hf, "layer_types": [FULL, SLIDING] * 4, "use_sliding_window": True, "sliding_window": None}, "x")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "smollm3", "granite"])
def test_kv_heads_read_as_transformers_reads_them(model_type):
    """num_key_value_heads unsaid: the config class's default (Qwen2Config's and Qwen3Config's 32 in transformers
    5, read as every head before); null: every head, as the config classes that take it read it."""
    transformers = pytest.importorskip("transformers")
    from edgemtp.config import parse_llama

    base = {"model_type": model_type, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 64, "head_dim": 16, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6}
    null = [] if model_type == "mistral" else [{**base, "num_key_value_heads": None}]  # MistralConfig refuses it
    for hf in [base, *null]:
        theirs = transformers.AutoConfig.for_model(**hf).num_key_value_heads
        assert parse_llama(hf, "x").num_kv_heads == theirs, (hf, theirs)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral", "smollm3", "gemma2"])
def test_rope_read_as_transformers_reads_it(model_type, tmp_path):
    """The RoPE base and scaling in transformers 5's order: rope_scaling when set, else rope_parameters; a base
    neither gives from the top-level rope_theta (it was 10000 beside a rope_parameters without one), else the
    config class's default (SmolLM3's 2e6, not 10000)."""
    transformers = pytest.importorskip("transformers")
    from edgemtp.exporters import load_config

    base = {"model_type": model_type, "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
    variants = [{}, {"rope_theta": 5e5}, {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e5},
                {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7e3}, "rope_theta": 5e5},
                {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                 "rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 5e5},
                # yarn without an original length: max_position_embeddings (gemma2's was refused before session 41)
                {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}]
    for i, extra in enumerate(variants):
        model_dir = tmp_path / str(i)
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({**base, **extra}))
        want = transformers.AutoConfig.from_pretrained(model_dir).rope_parameters
        got = load_config(model_dir)[0].rope["full_attention"]
        assert (got.theta, got.kind, got.factor) == (want["rope_theta"], want["rope_type"],
                                                     want.get("factor", 1.0)), extra
        if got.kind == "yarn":
            assert got.original_max_positions == want["original_max_position_embeddings"] == 256


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral", "smollm3", "gemma2", "gemma3_text"])
def test_longrope_outside_phi3_is_refused(model_type, tiny_gemma3, tmp_path):
    """ROPE_KINDS names longrope (for phi3), but only phi3's parser reads its factors: another architecture's
    export stopped with a numpy traceback."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    rope = {"full_attention": longrope, "sliding_attention": longrope} if model_type == "gemma3_text" else longrope
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": model_type, "rope_parameters": rope}))
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / "out"), "--max-context", "64"])
    assert_one_line_error(r, f"{model_dir / 'config.json'}", "rope_type 'longrope' is supported for phi3 only")
    assert not (tmp_path / "out").exists()


def test_gemma2_fields_read_as_transformers_reads_them(tiny_gemma3):
    """Gemma2Config's defaults where a field is missing (attention scores capped at 50, logits at 30, sliding
    layers first and every other one, one RoPE base for both kinds of layer); null turns a cap or the window
    off."""
    from edgemtp.config import FULL, SLIDING, read_config_json
    from edgemtp.exporters.gemma2 import parse_config

    drop = ("layer_types", "rope_parameters", "rope_theta", "rope_local_base_freq", "attn_logit_softcapping",
            "final_logit_softcapping", "sliding_window_pattern")
    hf = {k: v for k, v in read_config_json(tiny_gemma3[1]).items() if k not in drop}
    cfg = parse_config({**hf, "model_type": "gemma2"}, "x")
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.qk_norm) == (50.0, 30.0, False)
    assert cfg.layer_types == (SLIDING, FULL) * 2 and cfg.rope[SLIDING] == cfg.rope[FULL]
    assert cfg.rope[FULL].theta == 10000.0
    cfg = parse_config({**hf, "attn_logit_softcapping": None, "rope_theta": 500.0}, "x")
    assert cfg.attn_logit_softcapping is None and cfg.rope[SLIDING].theta == 500.0
    assert parse_config({**hf, "sliding_window": None}, "x").sliding_window is None  # sliding layers see it all
    with pytest.raises(EdgemtpError, match="field 'query_pre_attn_scalar' 0.0 must be positive"):  # was read as 256
        parse_config({**hf, "query_pre_attn_scalar": 0}, "x")


def test_multimodal_gemma3_config_reads_its_text_config(tmp_path):
    """model_type gemma3 (Gemma 3 4B and up): text_config's fields, Gemma3TextConfig's defaults where it is
    silent (as 4B's config.json is about its vocabulary and heads), the multimodal config's tie flag."""
    from edgemtp.exporters import load_config

    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "sliding_window": 1024,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "model_type": "gemma3_text"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    cfg = load_config(tmp_path)[0]
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (262_208, 8, 4, 256)
    assert cfg.tie_word_embeddings and cfg.rope["full_attention"].factor == 8.0 and cfg.sliding_window == 1024
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": "x"}))
    with pytest.raises(EdgemtpError, match="model_type 'gemma3' needs a 'text_config' object"):
        load_config(tmp_path)
    # Gemma 3 4B-it's config.json: the end-of-turn id is in the multimodal config's eos, which transformers'
    # generate stops on (GenerationConfig.from_model_config), with no generation_config.json beside it too
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                      "eos_token_id": [1, 106]}))
    assert load_config(tmp_path)[0].eos_token_ids == (1, 106)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                      "eos_token_id": "x"}))
    with pytest.raises(EdgemtpError, match="field 'eos_token_id' should be a token id"):
        load_config(tmp_path)


@pytest.mark.parametrize("kind", ["gemma3", "gemma4", "mistral3"])
def test_multimodal_configs_stop_on_their_own_eos(kind, tmp_path):
    """A multimodal config.json's own eos_token_id is what transformers' generate stops on
    (GenerationConfig.from_model_config: text_config's only where it has none), generation_config.json or not:
    Gemma 4's and Mistral 3's were left for text_config's (1 and 2 alone)."""
    transformers = pytest.importorskip("transformers")
    from edgemtp.exporters import load_config

    from .test_parity import tiny
    from .test_parity_gemma4 import TEXT

    if kind == "gemma4":
        config = transformers.Gemma4Config(text_config=TEXT, vision_config=None, audio_config=None)
    else:
        config = tiny(f"{kind}_multimodal").config
    config.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "eos_token_id": [1, 7]}))
    want = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert want.eos_token_id == [1, 7]
    assert load_config(tmp_path)[0].eos_token_ids == (1, 7)


def test_ministral3_and_mistral3_configs(tmp_path):
    """Ministral3Config (no window unless said, head_dim 128, llama_4_scaling_beta with its yarn) and the
    multimodal mistral3 wrapper (text_config by its model_type, the top-level tie flag, default true)."""
    from edgemtp.exporters import load_config

    text = {"model_type": "ministral3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 96, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384,
                                "rope_theta": 1e6, "llama_4_scaling_beta": 0.1}}
    for config in (text, {"model_type": "mistral3", "text_config": text}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        cfg = load_config(tmp_path)[0]
        assert ((cfg.model_type, cfg.head_dim, cfg.sliding_window, cfg.query_scale_beta)
                == ("ministral3", 128, None, 0.1))
        assert cfg.tie_word_embeddings == (config is not text)  # Ministral3Config: untied; Mistral3Config: tied
    # a null head_dim: Ministral3Config and Qwen3Config refuse it (read as 128 before session 41)
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import Ministral3Config, Qwen3Config

    for kind, config_class in (("ministral3", Ministral3Config), ("qwen3", Qwen3Config)):
        with pytest.raises(StrictDataclassFieldValidationError, match="Field 'head_dim' expected int"):
            config_class(**{**text, "model_type": kind, "head_dim": None})
        (tmp_path / "config.json").write_text(json.dumps({**text, "model_type": kind, "head_dim": None}))
        with pytest.raises(EdgemtpError, match=f"field 'head_dim' is null \\({kind} needs the head size\\)"):
            load_config(tmp_path)
    bad = {**text, "rope_parameters": {"rope_type": "default", "llama_4_scaling_beta": 0.1}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(EdgemtpError, match="llama_4_scaling_beta' needs rope_type 'yarn'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": {"model_type": "x"}}))
    with pytest.raises(EdgemtpError, match="text_config model_type 'x' is not supported"):
        load_config(tmp_path)


def test_a_null_kv_head_count_is_refused_where_transformers_refuses_it(tmp_path):
    """MistralConfig and Ministral3Config refuse a null num_key_value_heads (transformers 5.25: "Field
    'num_key_value_heads' expected int"); it was read as every head (multi-head attention, another model than
    transformers loads, if any). Llama's, Qwen's and the others' configs take null as every head, as edgemtp."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import LlamaConfig, Ministral3Config, MistralConfig

    from edgemtp.exporters import load_config

    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": None, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 96, "rms_norm_eps": 1e-5}
    for kind, config_class in (("mistral", MistralConfig), ("ministral3", Ministral3Config)):
        with pytest.raises(StrictDataclassFieldValidationError, match="Field 'num_key_value_heads' expected int"):
            config_class(**text)
        tower = {**text, "model_type": kind}
        for config in (tower, {"model_type": "mistral3", "text_config": tower}):
            (tmp_path / "config.json").write_text(json.dumps(config))
            with pytest.raises(EdgemtpError) as caught:
                load_config(tmp_path)
            assert str(caught.value).endswith(f"field 'num_key_value_heads' is null ({kind} needs the KV head "
                                              "count)"), caught.value
    assert LlamaConfig(**text).num_key_value_heads == 4
    (tmp_path / "config.json").write_text(json.dumps({**text, "model_type": "llama"}))
    assert load_config(tmp_path)[0].num_kv_heads == 4


def test_granite_multipliers(tiny_gemma3):
    """GraniteConfig's multipliers, 1 where unsaid (so a granite config without them is llama's maths), a
    logits_scaling of 0 refused (transformers divides by it)."""
    from edgemtp.config import parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "granite", "hidden_activation": None,
          "rope_parameters": None, "layer_types": None}
    cfg = parse_llama({**hf, "embedding_multiplier": 12.0, "logits_scaling": 8.0, "attention_multiplier": 0.015625,
                       "residual_multiplier": 0.22}, "x")
    assert (cfg.embed_scale, cfg.logit_scale, cfg.scale, cfg.residual_scale) == (12.0, 0.125, 0.015625, 0.22)
    cfg = parse_llama(hf, "x")
    assert (cfg.embed_scale, cfg.logit_scale, cfg.residual_scale) == (1.0, 1.0, 1.0) and cfg.scale == 1.0
    with pytest.raises(EdgemtpError, match="field 'logits_scaling' 0.0 must be positive"):
        parse_llama({**hf, "logits_scaling": 0}, "x")


def test_yarn_original_length_and_factor_as_transformers_fills_them(tiny_gemma3):
    """rope_type 'yarn' (tests/test_parity.py checks its maths): what transformers' standardize_rope_params and
    _compute_yarn_parameters fill in where a field is missing (they were refused): the original length is
    max_position_embeddings (a top-level original_max_position_embeddings wins over the parameters'), the
    factor max_position_embeddings / the original length."""
    from edgemtp.config import parse_llama, read_config_json

    hf = {**read_config_json(tiny_gemma3[1]), "model_type": "qwen3", "hidden_activation": None,
          "rope_parameters": None, "layer_types": None, "max_position_embeddings": 256}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    rope = parse_llama({**hf, "rope_scaling": yarn}, "x").rope["full_attention"]
    assert rope.kind == "yarn" and rope.scale == pytest.approx(0.1 * np.log(4.0) + 1)
    no_factor = parse_llama({**hf, "rope_scaling": {**yarn, "factor": None}}, "x").rope["full_attention"]
    assert (no_factor.factor, no_factor.original_max_positions) == (8.0, 32)
    no_original = parse_llama({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x").rope["full_attention"]
    assert (no_original.factor, no_original.original_max_positions) == (4.0, 256)
    top = parse_llama({**hf, "rope_scaling": yarn, "original_max_position_embeddings": 64}, "x").rope["full_attention"]
    assert top.original_max_positions == 64


def test_calibration_caps_gemma2_logits_by_its_default(tmp_path):
    """`cluster`'s full-head logits: Gemma2Config caps them at 30 where config.json says nothing (null: no cap)."""
    from edgemtp.calibration.model_files import logit_softcap

    for config, cap in (({"model_type": "gemma2"}, 30.0), ({"model_type": "gemma2", "final_logit_softcapping": None},
                                                           None), ({"model_type": "llama"}, None),
                        ({"model_type": "gemma3", "text_config": {"final_logit_softcapping": 25.0}}, 25.0)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert logit_softcap(tmp_path) == cap, config


def test_phi3_config_and_fused_weights(tmp_path):
    """Phi3Config's RoPE as transformers reads it ("su" is longrope; the base and partial_rotary_factor at the
    top level too), LongRoPE's limit on the KV capacity (past the original length it changes frequencies),
    and a fused matrix that does not hold the rows config.json implies: each named, nothing exported."""
    transformers = pytest.importorskip("transformers")
    importlib.import_module("transformers.modeling_rope_utils")  # read below as transformers.modeling_rope_utils
    from click.testing import CliRunner

    from edgemtp.cli import cli
    from edgemtp.exporters.phi3 import parse_config

    from .reference import save_tiny
    from .test_parity import tiny

    hf = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96,
          "vocab_size": 96, "max_position_embeddings": 256, "original_max_position_embeddings": 64,
          "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    rope = parse_config(hf, "x").rope["full_attention"]
    assert (rope.kind, rope.theta, rope.fraction, rope.scale) == ("default", 500.0, 0.5, 1.0)
    su = parse_config({**hf, "rope_scaling": {"type": "su", "short_factor": [2.0] * 4, "long_factor": [3.0] * 4}},
                      "x").rope["full_attention"]
    assert su.kind == "longrope" and su.ext_factors == (2.0,) * 4 and su.original_max_positions == 64
    assert su.scale == pytest.approx((1 + np.log(4) / np.log(64)) ** 0.5)
    # the length LongRoPE scales from is config.json's top-level field, 4096 when unsaid, whatever the RoPE
    # parameters say (transformers' Phi3Config overwrites theirs); rope_scaling, when set, over rope_parameters
    short = {"rope_type": "longrope", "short_factor": [2.0] * 4, "long_factor": [3.0] * 4}
    for extra in ({"rope_parameters": {**short, "original_max_position_embeddings": 32}},
                  {"rope_parameters": short, "original_max_position_embeddings": None},
                  {"rope_parameters": {**short, "original_max_position_embeddings": 32},
                   "max_position_embeddings": 8192},
                  {"rope_scaling": {**short, "short_factor": [4.0] * 4}, "rope_parameters": short}):
        model_dir = tmp_path / f"cfg{len(list(tmp_path.iterdir()))}"
        model_dir.mkdir()
        config = {**hf, "model_type": "phi3", **extra}
        (model_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        want = transformers.AutoConfig.from_pretrained(model_dir)
        got = parse_config(json.loads((model_dir / "config.json").read_text()), "x").rope["full_attention"]
        _, scale = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](want, None)
        assert got.original_max_positions == want.rope_parameters["original_max_position_embeddings"], extra
        assert got.scale == pytest.approx(scale) and list(got.ext_factors) == want.rope_parameters["short_factor"]
    for rope, message in (({"type": "su", "short_factor": [2.0] * 3}, "'rope_scaling.short_factor' must list 4"),
                          ({"type": "su", "short_factor": ["a"] * 4, "long_factor": [3.0] * 4},
                           "field 'rope_scaling.short_factor' must list 4 positive numbers"),  # was a bare ValueError
                          ({"type": "su", "short_factor": [2.0] * 4}, "field 'rope_scaling.long_factor' is missing"),
                          # 1e400 (json's inf): a pair that never turns; was exported
                          ({"type": "su", "short_factor": [2.0, 2.0, 2.0, float("inf")], "long_factor": [3.0] * 4},
                           "field 'rope_scaling.short_factor' must list 4 positive numbers"),
                          ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported for phi3")):
        with pytest.raises(EdgemtpError, match=re.escape(message)):
            parse_config({**hf, "rope_scaling": rope}, "x")
    with pytest.raises(EdgemtpError, match="field 'original_max_position_embeddings' 0 must be at least 2"):
        parse_config({**hf, "original_max_position_embeddings": 0, "rope_scaling": short}, "x")
    with pytest.raises(EdgemtpError) as e:  # the whole message: no knock-on 'partial_rotary_factor 0.0 must be in'
        parse_config({**hf, "partial_rotary_factor": float("nan")}, "x")
    assert str(e.value) == "x: field 'partial_rotary_factor' should be a finite number, got nan"

    model_dir = save_tiny(tiny("phi3_longrope"), tmp_path / "model")
    args = ["export", str(model_dir), "-o", str(tmp_path / "out"), "--max-context"]
    r = CliRunner().invoke(cli, args + ["65"])
    assert r.exit_code == 2 and r.output == ("error: --max-context 65 exceeds original_max_position_embeddings (64, "
                                             "config.json): past it LongRoPE turns to other frequencies, which "
                                             "the keys already cached were not rotated with\n")
    r = CliRunner().invoke(cli, args[:-1])  # by default within the original length (it asked for 256 and failed)
    assert r.exit_code == 0, r.output
    assert bundle.load(tmp_path / "out").target_contract.capacity == 64
    shutil.rmtree(tmp_path / "out")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    r = CliRunner().invoke(cli, args + ["64"])
    assert_one_line_error(r, f"{model_dir}: tensor 'model.layers.0.self_attn.qkv_proj.weight' has shape [128, 64], "
                          "but config.json implies 192 rows (64 + 64 + 64)")
    assert not (tmp_path / "out").exists()


def test_phi3_longrope_over_an_odd_number_of_rotated_dims_is_named():
    """LongRoPE with a partial_rotary_factor that rotates an odd number of dims (9 of 16): its short factors
    (one per pair, 4) do not match the 5 frequencies the tables have, which failed inside the export with a
    numpy broadcasting error. transformers refuses such a config too; default RoPE runs it (10 dims rotated)."""
    from edgemtp.exporters.phi3 import parse_config
    from edgemtp.exporters.rotary import inv_freq

    hf = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96,
          "vocab_size": 96, "max_position_embeddings": 256, "original_max_position_embeddings": 64,
          "partial_rotary_factor": 0.5625}
    assert len(inv_freq(parse_config(hf, "x").rope["full_attention"], 16)) == 5
    longrope = {"rope_type": "longrope", "short_factor": [2.0] * 4, "long_factor": [3.0] * 4}
    with pytest.raises(EdgemtpError, match=re.escape("field 'partial_rotary_factor' 0.5625 rotates 9 of the "
                                                     "head's 16 dims: LongRoPE needs an even number")):
        parse_config({**hf, "rope_scaling": longrope}, "x")


def test_overwrite_replaces_only_a_bundle(tiny_gemma3, tmp_path, monkeypatch):
    """--overwrite deletes what is at the output path: never a directory holding anything but a bundle."""
    model_dir, old = tiny_gemma3[1], tiny_gemma3[2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    (tmp_path / "afile").write_text("keep")
    for out, rule in ((mine, f"replaces only a bundle or an empty directory, and {mine} is not an edgemtp bundle "
                             "(no edgemtp.json)"),
                      (model_dir, "replaces only a bundle or an empty directory"),
                      (tmp_path / "afile", f"replaces only a bundle, and {tmp_path / 'afile'} is a file")):
        with pytest.raises(SwitchError) as e:
            export(model_dir, out, overwrite=True, capacity=64)
        # overwrite=True from Python, --overwrite from the CLI
        assert str(e.value).startswith(f"overwrite=True {rule}"), str(e.value)
        assert e.value.cli_message().startswith(f"--overwrite {rule}"), e.value.cli_message()
    monkeypatch.chdir(mine)
    with pytest.raises(SwitchError, match=f"^overwrite=True will not delete {mine.parent}, which holds the current "
                                          "directory$"):
        export(model_dir, mine.parent, overwrite=True, capacity=64)
    assert (mine / "precious.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "keep"
    assert (model_dir / "config.json").is_file()
    # an earlier bundle and an empty directory are replaced
    again, empty = copy_bundle(old, tmp_path), tmp_path / "empty"
    empty.mkdir()
    for out in (again, empty):
        export(model_dir, out, overwrite=True, capacity=64)
        assert bundle.load(out).manifest["graphs"]["target"]["contract"]["capacity"] == 64


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(capacity="abc"), "graphs.target.contract.capacity 'abc' must be a positive whole number"),
    (lambda c: c.update(capacity=4096), r"does not match target.onnx: past_key_values.\d+.key is \['batch', \d+, 64"),
    (lambda c: c.update(kv=c["kv"][1:]),
     "does not match target.onnx: the graph's input past_key_values.0.key is missing"),
])
def test_manifest_contract_must_match_the_graph(tiny_gemma3, tmp_path, edit, message):
    """A manifest edited after export (it cannot hash itself) is named, not left to fail inside a run."""
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    edit(m["graphs"]["target"]["contract"])
    edit(m["graphs"]["verify"]["contract"])  # shares the target's cache: must agree with it
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match=message):
        Engine.load(b)


def _set(path, value):
    """An edit of the manifest: the field at `path` set to `value` (DELETE: removed)."""
    def edit(m):
        for key in path[:-1]:
            m = m[key]
        if value is DELETE:
            del m[path[-1]]
        else:
            m[path[-1]] = value
    return edit


def _kv_slots(m, sliding: bool, window) -> None:
    """The first kv slot of a sliding (or a global) layer given the window `window(its window)`, in the
    target's contract and the verify graph's (which must agree)."""
    for g in ("target", "verify"):
        slot = next(s for s in m["graphs"][g]["contract"]["kv"] if bool(s.get("window")) == sliding)
        slot["window"] = window(slot.get("window"))


DELETE = object()
TARGET = ("graphs", "target")
CONTRACT = (*TARGET, "contract")


@pytest.mark.parametrize("edit,message", [
    (_set(("schema_version",), True), "schema_version True unsupported"),
    (_set(("format",), "onnx-bundle"), "edgemtp.json: field 'format' is not 'edgemtp-bundle'$"),
    (_set(("files",), DELETE), "edgemtp.json: field 'files' missing or not an object$"),
    (_set(("model",), []), "edgemtp.json: field 'model' missing or not an object$"),
    (_set(("tokenizer",), 5), "edgemtp.json: field 'tokenizer' missing or not a string$"),
    (_set(("graphs",), {}), "edgemtp.json: field 'graphs' has no 'target'$"),
    (_set(("files", "tokenizer.json"), "abc"), "files.tokenizer.json must be an object with 'bytes'"),
    (_set(("files", "tokenizer.json", "bytes"), "12"), "files.tokenizer.json must be an object with 'bytes'"),
    (_set(("files", "tokenizer.json", "sha256"), DELETE), "files.tokenizer.json must be an object .* 'sha256'"),
    (_set(TARGET, "target.onnx"), "graphs.target is not an object"),
    (_set((*TARGET, "file"), ["target.onnx"]), r"graphs.target.file \['target.onnx'\] must name a file"),
    (_set((*TARGET, "file"), {"a": 1}), "graphs.target.file {'a': 1} must name a file"),
    (_set(CONTRACT, "x"), "graphs.target.contract is not an object"),
    (_set((*CONTRACT, "vocab_size"), DELETE), "graphs.target.contract.vocab_size is missing"),
    (_set((*CONTRACT, "kv_update"), "weird"), "graphs.target.contract.kv_update 'weird' is unknown"),
    (_set((*CONTRACT, "kv", 0, "window"), -1), r"graphs.target.contract.kv\[0\].window -1 must be a positive"),
    (_set((*CONTRACT, "kv", 1, "num_heads"), "1"), r"graphs.target.contract.kv\[1\].num_heads '1' must be"),
    (_set((*CONTRACT, "kv", 1, "layer"), 0), r"graphs.target.contract.kv \[0, 0, .*\] names a layer twice"),
    (_set((*CONTRACT, "kv", 0), 3), r"graphs.target.contract.kv\[0\] must be an object"),
    (_set((*CONTRACT, "drafter_kv"), {"full_attention": 99}), "graphs.target.contract.drafter_kv .* must map"),
    (_set((*CONTRACT, "window_views"), "yes"), "graphs.target.contract.window_views 'yes' must be true or false"),
    (_set((*CONTRACT, "hidden_size"), 65), "model.hidden_size 64 differs from graphs.target.contract.hidden_size 65"),
    (_set(("graphs", "verify", "contract", "capacity"), 32),
     "graphs.verify.contract.capacity 32 differs from the target's"),
    (_set(("graphs", "verify", "contract"), "x"), "graphs.verify.contract is not an object"),
    # the model facts the runtime acts on (stop ids, sizes, the quant --draft auto reads)
    (lambda m: m["model"].update(eos_token_ids=[10**9]),
     r"model.eos_token_ids \[1000000000\] must be a list of token ids"),
    (lambda m: m["model"].update(eos_token_ids=1), "model.eos_token_ids 1 must be a list"),
    (lambda m: m["model"].update(bos_token_id="2"), "model.bos_token_id '2' is not a token id"),
    # ids equal to vocab_size: one past the last row of the logits
    (lambda m: m["model"].update(eos_token_ids=[96]), r"model.eos_token_ids \[96\] must be a list of token ids below "
     "vocab_size 96"),
    (lambda m: m["model"].update(bos_token_id=96), "model.bos_token_id 96 is not a token id below vocab_size 96"),
    # files the runtime reads but the sha256 pass would not check
    (_set(("files", "target.onnx.data"), DELETE), "external data 'target.onnx.data' is not listed in the manifest"),
    (_set(("tokenizer",), "vocab.json"), "field 'tokenizer' names a file not listed in 'files'"),
    (_set(("chat",), {"template": "chat.jinja"}), "chat.template must name a file listed in 'files'"),
    (_set(("chat",), {"template": "tokenizer.json", "special_tokens": {"eos": 1}}),
     "chat.special_tokens must map names to token strings"),
    (lambda m: m["model"].update(vocab_size=0), "model.vocab_size 0 must be a positive whole number"),
    # what info shows as it is: "model: 5", "-5 parameters", a source it drops without a word
    (lambda m: m["model"].update(model_type=5), "edgemtp.json: model.model_type 5 must be a string$"),
    (lambda m: m["model"].update(num_layers=-5), "edgemtp.json: model.num_layers -5 must be a positive whole number$"),
    (_set(("edgemtp_version",), 5), "edgemtp.json: edgemtp_version 5 must be a string$"),
    (_set(("source",), [1]), r"edgemtp.json: source \[1\] must be an object$"),
    (_set(("source", "parameters"), -5), "edgemtp.json: source.parameters -5 must be a positive whole number$"),
    (_set(("source", "parameters"), True), "edgemtp.json: source.parameters True must be a positive whole number$"),
    (_set(("source", "model"), 5), "edgemtp.json: source.model 5 must be a string$"),
    (lambda m: m["model"].update(vocab_size=m["model"]["vocab_size"] + 1),
     "model.vocab_size 97 differs from graphs.target.contract.vocab_size 96"),
    (lambda m: m["graphs"]["target"].update(quant="int3"), "graphs.target.quant 'int3' is unknown"),
    # a manifest whose sizes agree with each other but not with the graph: once a run that "worked" (vocab_size,
    # hidden_size) or an error inside ONNX Runtime's run (the rest)
    (lambda m: [c.update(vocab_size=97) for c in (m["model"], *(g["contract"] for g in m["graphs"].values()))],
     r"graphs.target.contract does not match target.onnx: its vocab_size is 97, but the graph's output logits is "
     r"\['batch', 'num_logits', 96\]"),
    (lambda m: [c.update(hidden_size=32) for c in (m["model"], *(g["contract"] for g in m["graphs"].values()))],
     "its hidden_size is 32, but the graph's output last_hidden_state"),
    (lambda m: m["graphs"]["target"]["contract"].update(window_views=False),
     "window_views is false, but the graph has the input window_seqlens_k"),
    (lambda m: m["graphs"]["verify"]["contract"].update(window_views=True),
     "graphs.verify.contract does not match target_verify.onnx: window_views is true, but the graph lacks the input "
     "window_seqlens_k"),
    (lambda m: m["graphs"]["target"].update(file="target_verify.onnx"),
     "graphs.target.contract does not match target_verify.onnx: its kv_update is 'in_place', but the graph's "
     r"present.0.key holds only the new positions \(kv_update 'rows'\)"),
    (lambda m: m["graphs"]["verify"].update(file="target.onnx"),
     "graphs.verify.contract does not match target.onnx: its kv_update is 'rows', but"),
    (lambda m: m["graphs"]["target"]["contract"].update(kv_update="rows"),
     "graphs.target.contract.kv_update 'rows' must be 'in_place'"),
    (lambda m: m["graphs"]["verify"]["contract"].update(kv_update="in_place"),
     "graphs.verify.contract.kv_update 'in_place' must be 'rows'"),
    # a window the graph's attention does not use: a shorter one handed sliding layers too short a view
    (lambda m: _kv_slots(m, sliding=True, window=lambda w: w - 1),
     r"does not match target.onnx: kv layer \d+'s window is \d+, but the graph's attention over "
     r"past_key_values.\d+.key has a window of \d+"),
    (lambda m: _kv_slots(m, sliding=False, window=lambda w: 4),
     r"kv layer \d+'s window is 4, but the graph's attention over past_key_values.\d+.key has no window"),
    (lambda m: m["files"].update({"a\0b": {"bytes": 1, "sha256": "0"}}), r"path 'a\\x00b' is not a file name"),
    # the bundle directory itself: named as the manifest lists it, not as the bundle's path
    (lambda m: m["files"].update({".": {"bytes": 1, "sha256": "0"}}),
     r"edgemtp.json: files entry '.' names the bundle directory, not a file$"),
    (lambda m: m["files"].update({"": {"bytes": 1, "sha256": "0"}}),
     r"edgemtp.json: files entry '' names the bundle directory, not a file$"),
    # the same file under another name: counted twice by info (and its bytes)
    (lambda m: m["files"].update({"./tokenizer.json": m["files"]["tokenizer.json"]}),
     r"edgemtp.json: files entry './tokenizer.json' lists 'tokenizer.json' again$"),
    (lambda m: m["files"].update({"x/../target.onnx": m["files"]["target.onnx"]}),
     r"edgemtp.json: files entry 'x/../target.onnx' lists 'target.onnx' again$"),
])
def test_malformed_manifest_fields_are_named(tiny_gemma3, tmp_path, edit, message):
    """Each manifest field the runtime acts on (model facts, graph entries and their contracts) is named when
    an edit broke it, not met as a KeyError, a generation that never stops or a failure inside ONNX Runtime;
    bundle.load checks the target and verify graphs' inputs and outputs against their contracts."""
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    m = json.loads((b / "edgemtp.json").read_text())
    edit(m)
    (b / "edgemtp.json").write_text(json.dumps(m))
    with pytest.raises(EdgemtpError, match=message):
        bundle.load(b)


def test_generation_config_stop_tokens_are_kept(tiny_gemma3, tmp_path):
    """generation_config.json's eos ids join config.json's (transformers stops on them; an instruction-tuned
    Gemma's <end_of_turn> is only there): the bundle stops on them. A broken one is named."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], model_dir)
    plain = Engine.load(tiny_gemma3[2]).generate("t1 t2 t3", max_new_tokens=8)
    stop = plain.tokens[3]
    assert stop not in plain.tokens[:3]
    want = bundle.load(tiny_gemma3[2]).model["eos_token_ids"] + [stop]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": want}))
    out = export(model_dir, tmp_path / "b", capacity=64)
    assert bundle.load(out).model["eos_token_ids"] == want
    got = Engine.load(out).generate("t1 t2 t3", max_new_tokens=8)
    assert got.tokens == plain.tokens[:4] and got.stats.stop_reason == "stop token"
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**6]}))
    with pytest.raises(EdgemtpError, match="generation_config.json: field 'eos_token_id'"):
        export(model_dir, tmp_path / "c", capacity=64)


def _edit_header(d, edit):
    """model.safetensors with its JSON header changed by `edit(header)` (the data left as it is)."""
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = edit(header)  # the header's new JSON text, or None: the edited header's
    blob = (text if isinstance(text, str) else json.dumps(header)).encode()
    blob += b" " * (-len(blob) % 8)
    (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def _sparse(path, head: bytes, size: int):
    """`path` of `size` bytes that starts with `head`, the rest a hole (no disk taken)."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_prompt_longer_than_capacity(tiny_gemma3):
    engine = Engine.load(tiny_gemma3[2])
    # refused by the prompt check, before any pass (a prefill past the capacity says "KV capacity of 64" too)
    with pytest.raises(EdgemtpError, match="^the prompt of 80 tokens does not fit the bundle's KV capacity of 64"):
        engine.generate(" ".join(["t5"] * 80))


def test_generation_stops_at_capacity(tiny_gemma3):
    import torch

    model, _, bundle_dir = tiny_gemma3
    engine = Engine.load(bundle_dir)
    engine.stop_ids = frozenset()
    ids = [(7 * i) % 90 + 3 for i in range(60)]  # many tokens: "t5" * 60 gave 23 throughout, whatever each step read
    gen = engine.generate(" ".join(f"t{i}" for i in ids), max_new_tokens=50)
    assert gen.stats.stop_reason == "KV capacity reached"
    assert len(gen.tokens) == 64 - 60 + 1  # the last one needs no KV slot of its own
    with torch.no_grad():  # transformers' greedy tokens, the last one from the full cache's logits
        for _ in range(len(gen.tokens)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen.tokens == ids[60:] and len(set(gen.tokens)) > 1


def test_prompt_that_fills_the_cache_gives_its_next_token(tiny_gemma3):
    import torch

    model, _, bundle_dir = tiny_gemma3
    engine = Engine.load(bundle_dir)
    engine.stop_ids = frozenset()
    ids = [(7 * i) % 90 + 3 for i in range(64)]
    stats = Stats()
    assert list(engine.token_ids(ids, 5, stats=stats)) == [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    assert stats.stop_reason == "KV capacity reached"
    with pytest.raises(EdgemtpError, match="prompt of 65 tokens does not fit the bundle's KV capacity of 64"):
        list(engine.token_ids(ids + [3], 5))


def test_kv_cache_is_updated_in_place(tiny_gemma3):
    """The graph writes into the runtime's buffers: no copy of the cache per step. The new positions' keys and
    values are in the buffers when the run returns (a copy back after it would pass a check of the buffers'
    addresses), nothing is written after it, and they are the verify graph's (a "rows" graph, copied in)."""
    engine = Engine.load(tiny_gemma3[2])
    target, reference = engine.target, engine.target._verify_target()
    cache, want = target.new_cache(1), reference.new_cache(1)
    buffers = {layer: (k.ctypes.data, cache.values[layer].ctypes.data) for layer, k in cache.keys.items()}
    at_run_end = []

    class Watched:  # the session, noting the cache as each run leaves it
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, io, *args):
            session.run_with_iobinding(io, *args)
            at_run_end.append({layer: (k.copy(), cache.values[layer].copy()) for layer, k in cache.keys.items()})

    session, target.session = target.session, Watched()
    length = 0
    for ids in ([1, 2, 3], [4], [5]):  # a prefill, a decode step, the same step's binding run again
        target.forward(np.array([ids]), cache)
        reference.forward(np.array([ids]), want)
        length += len(ids)
        for layer, k in cache.keys.items():
            v = cache.values[layer]
            assert (k.ctypes.data, v.ctypes.data) == buffers[layer]
            for got, seen, ref in ((k, at_run_end[-1][layer][0], want.keys[layer]),
                                   (v, at_run_end[-1][layer][1], want.values[layer])):
                assert np.array_equal(seen, got)  # all in place by the end of the run
                assert got[0, :, length - len(ids):length].any(axis=-1).all()  # each head, each new position
                np.testing.assert_allclose(got[0, :, :length], ref[0, :, :length], rtol=1e-4, atol=1e-5)
                assert not got[0, :, length:].any()
    assert len(at_run_end) == 3


def test_a_kv_cache_larger_than_the_machine_allocates_is_named(tiny_gemma3):
    """A capacity the graph leaves symbolic is the manifest's claim alone: one of 10**12 positions (a bundle from
    someone else) is refused in one line naming its size, not a numpy MemoryError's traceback."""
    engine = Engine.load(tiny_gemma3[2])
    engine.target.contract = dataclasses.replace(engine.target.contract, capacity=10**12)
    with pytest.raises(EdgemtpError, match=r"the KV cache of 1 row x 1,000,000,000,000 positions needs 2,048,000.0 GB "
                                           r"\(4 layers\), more than this machine can allocate"):
        engine.generate("t1 t2", max_new_tokens=2)


def test_a_batch_whose_kv_cache_outgrows_the_memory_is_refused_before_its_cache(tiny_gemma3, monkeypatch):
    """Mapping a batch's KV buffers succeeds for far more rows than the machine's memory holds (they are mapped
    lazily, each mapping checked alone): a batch that would need more once its rows ran to max_new_tokens was
    killed by the system part-way. It is refused up front, before any cache is made; one that fits runs."""
    from edgemtp.runtime import kv_cache

    engine = Engine.load(tiny_gemma3[2])
    slots = engine.target.contract.kv
    per_position = sum(2 * 4 * s.num_heads * s.head_dim for s in slots)
    lengths = [len(engine.encode(p)) for p in ("t1 t2", "t3 t4 t5")]
    need = per_position * sum(n + 5 for n in lengths)
    made = []
    monkeypatch.setattr(kv_cache.KVCache, "__init__", lambda *a, **k: made.append(1) or pytest.fail("a cache"))
    monkeypatch.setattr(kv_cache, "physical_memory", lambda: need - 1)
    with pytest.raises(EdgemtpError, match=r"the KV cache of 2 rows run to max_new_tokens=5 needs .* GB, more than "
                                           r"this machine's .* GB of memory \(fewer prompts at once, or a lower "
                                           r"max_new_tokens\)"):
        engine.generate_batch(["t1 t2", "t3 t4 t5"], max_new_tokens=5)
    assert not made
    monkeypatch.undo()
    monkeypatch.setattr(kv_cache, "physical_memory", lambda: need)
    assert [len(g.tokens) for g in engine.generate_batch(["t1 t2", "t3 t4 t5"], max_new_tokens=5)] == [5, 5]


def test_a_batch_is_counted_up_to_its_kv_capacity_and_checked_only_where_the_memory_is_known(monkeypatch):
    """check_fits counts each row up to the KV capacity, where it stops whatever max_new_tokens asks: a large
    max_new_tokens on a batch that fits must run. A machine that does not say its memory (0) checks nothing."""
    from edgemtp.contract import KVSlot
    from edgemtp.runtime import kv_cache

    slots = (KVSlot(0, 2, 4),)  # 64 bytes a position: keys and values, 2 heads of 4 floats
    monkeypatch.setattr(kv_cache, "physical_memory", lambda: 64 * 2 * 16)  # two rows of 16 positions
    kv_cache.check_fits(slots, 16, [3, 5], 10**9)
    with pytest.raises(EdgemtpError, match="the KV cache of 3 rows run to max_new_tokens=1000000000 needs"):
        kv_cache.check_fits(slots, 16, [3, 5, 1], 10**9)
    monkeypatch.setattr(kv_cache, "physical_memory", lambda: 0)
    kv_cache.check_fits(slots, 16, [3] * 1000, 10**9)


def test_the_memory_is_the_containers_cgroup_limit_where_it_is_lower(tmp_path, monkeypatch):
    """physical_memory read the machine's RAM only: in a container (docker --memory, a Kubernetes memory limit)
    a batch passed check_fits and was then killed by the system part-way. It is the smaller of the RAM and the
    cgroup's limit: v2's memory.max, else v1's memory.limit_in_bytes; "max", v1's huge "unlimited", no file or
    an unreadable one: no limit."""
    from edgemtp.runtime import kv_cache
    from edgemtp.runtime import session as S

    ram = kv_cache.physical_memory()
    assert ram > 2**30
    cgroup = tmp_path / "cgroup"
    monkeypatch.setattr(S, "CGROUP", cgroup)
    v2, v1 = cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"
    assert kv_cache.physical_memory() == ram  # no files
    v1.parent.mkdir(parents=True)
    for text, memory in (("max\n", ram), ("1048576\n", 2**20), ("", ram)):
        v2.write_text(text)
        assert kv_cache.physical_memory() == memory, text
    v2.unlink()
    for text, memory in (("2097152\n", 2**21), ("9223372036854771712\n", ram)):
        v1.write_text(text)
        assert kv_cache.physical_memory() == memory, text
    v1.unlink()
    v2.mkdir()  # unreadable
    assert kv_cache.physical_memory() == ram


def test_a_batch_refused_by_the_containers_limit_is_told_so(tmp_path, monkeypatch):
    """Refused by the cgroup's limit, the message names it (the machine may have far more): the user raises
    the container's limit, or asks for fewer rows."""
    from edgemtp.contract import KVSlot
    from edgemtp.runtime import kv_cache
    from edgemtp.runtime import session as S

    slots = (KVSlot(0, 2, 4),)  # 64 bytes a position
    monkeypatch.setattr(S, "CGROUP", tmp_path)
    (tmp_path / "memory.max").write_text(f"{64 * 2 * 10**7}\n")  # two rows of 10**7 positions: 1.28 GB
    assert kv_cache.physical_memory() == 64 * 2 * 10**7  # less than this machine's RAM
    kv_cache.check_fits(slots, 10**7, [3, 5], 10**9)
    with pytest.raises(EdgemtpError, match=r"needs 1.9 GB, more than this container's memory limit \(cgroup\) "
                                           r"of 1.3 GB \(fewer prompts"):
        kv_cache.check_fits(slots, 10**7, [3, 5, 1], 10**9)


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_tokens(tiny_gemma3, monkeypatch):
    """A prompt runs through the target PREFILL_CHUNK positions a pass (a pass's activations grow with its
    length): chunks of 3 over a 20-token prompt, across the sliding window of 8, give the tokens one pass gave,
    plain, drafting, batched and over a kept cache."""
    from edgemtp.runtime import target as target_mod
    from edgemtp.runtime.engine import Draft

    engine = Engine.load(tiny_gemma3[2], reuse_prefix=True)
    prompt = " ".join(f"t{i % 7}" for i in range(20))
    longer = prompt + " t3 t4 t5 t6 t0 t1 t2 t3"

    def run():
        engine.reuse_prefix = False  # let go of the kept cache: each run prefills from nothing first
        engine.reuse_prefix = True
        return [engine.generate(prompt, 8).tokens, engine.generate(longer, 8).tokens,  # the second over a kept one
                engine.generate(prompt, 8, draft=Draft("lookup", 3)).tokens,
                [g.tokens for g in engine.generate_batch([prompt, longer], 8)]]

    want = run()
    widths = []
    forward = target_mod.Target.forward
    monkeypatch.setattr(target_mod.Target, "forward",
                        lambda self, ids, *a, **k: widths.append(ids.shape) or forward(self, ids, *a, **k))
    monkeypatch.setattr(target_mod, "PREFILL_CHUNK", 3)
    assert run() == want
    assert max(w[1] for w in widths if w[0] == 1) == 4 and (1, 3) in widths  # chunks (and 4-wide verify windows)


def test_a_tokenizer_giving_ids_beyond_the_vocabulary_is_named(tiny_gemma3, tmp_path):
    """A tokenizer.json that disagrees with the model (a bundle from someone else) is named when it gives a prompt
    an id the model has no row for: it was "--prompt-ids[1] 500 is not a token id", a flag the user never gave. The
    first id past the vocabulary (its size, 96) is one; the token is named too (which word of the prompt to drop)."""
    b = copy_bundle(tiny_gemma3[2], tmp_path)
    tok = json.loads((b / "tokenizer.json").read_text())
    tok["model"]["vocab"]["big"] = 96
    (b / "tokenizer.json").write_text(json.dumps(tok))
    m = json.loads((b / "edgemtp.json").read_text())
    m["files"]["tokenizer.json"] = {"bytes": (b / "tokenizer.json").stat().st_size,
                                    "sha256": bundle.sha256(b / "tokenizer.json")}
    (b / "edgemtp.json").write_text(json.dumps(m))
    engine = Engine.load(b)
    assert engine.generate("t1 t2", max_new_tokens=2).tokens  # prompts without that token run
    with pytest.raises(EdgemtpError, match=r"tokenizer.json: encodes prompt with the token id 96 \('big'\), beyond "
                                           r"the model's vocabulary of 96 \(the tokenizer does not match the model\)"):
        engine.generate("t1 big", max_new_tokens=2)
    from edgemtp.evaluate import evaluate  # perplexity's text too: it went to the graph with that id

    with pytest.raises(EdgemtpError, match=r"tokenizer.json: encodes text.txt with the token id 96 \('big'\), "
                                           r"beyond"):
        evaluate(b, "t1 big t2 t3", text_name="text.txt")


def test_a_file_changed_just_before_a_long_hash_is_not_remembered(tiny_gemma3, tmp_path, monkeypatch):
    """A file's age against RACY_NS counts to when the load began checking, not to when its hash ended: on a
    coarse-timestamp file system a write in the ctime's tick, into bytes already hashed, leaves the stamp as it
    was, and hashing 1.3 GB takes longer than RACY_NS (such a file was remembered, then never hashed again)."""
    import time

    from edgemtp import verified

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 1_000_000_000)
    b = copy_bundle(tiny_gemma3[2], tmp_path)  # written just now
    hashed = []
    real_hash, real_clock = bundle.sha256, time.time_ns
    monkeypatch.setattr(bundle, "sha256", lambda p: hashed.append(p.name) or real_hash(p))
    # each hash takes "10 s": the clock has moved on when the first file is added to the record
    monkeypatch.setattr(verified.time, "time_ns", lambda: real_clock() + 10**10 * len(hashed))
    bundle.load(b)
    hashed.clear()
    bundle.load(b)
    assert sorted(hashed) == sorted(json.loads((b / "edgemtp.json").read_text())["files"])


def test_a_bundle_written_meanwhile_by_another_run_is_not_replaced(tmp_path):
    """Two exports to one output: the one finishing second fails, and the first's bundle stays (it was
    silently replaced); with --overwrite the second replaces it, as asked."""
    from edgemtp.bundle import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(SwitchError, match=f"^overwrite=True is needed to replace {out}, written by another run "
                                          "meanwhile$"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("second")
            out.mkdir()  # the other run renames its bundle into place first
            (out / "theirs").write_text("first")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs"]
    (out / "edgemtp.json").write_text("{}")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("second")
    assert [p.name for p in out.iterdir()] == ["mine"]


def test_an_output_that_is_a_link_replaces_the_directory_it_points_to(tmp_path):
    """-o models/current -> models/v3: --overwrite replaces v3 and the link stays. The link itself was replaced:
    a new directory in its place, the old bundle left where it was, and the link renamed aside for good."""
    from edgemtp.bundle import atomic_dir

    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "edgemtp.json").write_text("old")
    (tmp_path / "current").symlink_to("v3")
    with atomic_dir(tmp_path / "current", overwrite=True) as tmp:
        (tmp / "edgemtp.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]
    assert (tmp_path / "current").is_symlink() and (tmp_path / "current" / "edgemtp.json").read_text() == "new"


def test_an_overwrite_that_fails_leaves_the_old_bundle_whole(tmp_path, monkeypatch):
    """--overwrite renames the old bundle aside and removes it last: a rename that fails (its files in use on
    Windows, a permission) leaves it whole and in place, where it was removed first; one left aside by a killed
    run goes at the next export, as a killed export's directory does."""
    import os
    import time

    from edgemtp import scratch
    from edgemtp.bundle import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    for name in ("edgemtp.json", "target.onnx"):
        (out / name).write_text("old")
    real, calls = os.replace, []

    def failing(src, dst):  # the second rename (new bundle into place) fails
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        return real(src, dst)
    monkeypatch.setattr(scratch.os, "replace", failing)
    with pytest.raises(EdgemtpError, match="out: cannot replace it \\(Permission denied; is it in use\\?\\)"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "edgemtp.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing aside, no partial directory
    assert {p.name: p.read_text() for p in out.iterdir()} == {"edgemtp.json": "old", "target.onnx": "old"}
    monkeypatch.setattr(scratch.os, "replace", real)
    aside = tmp_path / ".out.partial-abcd1234"  # a killed run's, between its two renames
    aside.mkdir()
    os.utime(aside, (time.time() - 3600,) * 2)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "edgemtp.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in out.iterdir()] == ["edgemtp.json"]


def test_ministral3_rope_defaults_where_config_has_none():
    """Ministral3Config fills in its YaRN (theta 1e6, factor 16 over 16384 positions, llama_4_scaling_beta 0.1)
    where config.json has no rope_parameters (was default RoPE of base 10000, queries unscaled)."""
    from edgemtp.config import parse_llama

    hf = dict(model_type="ministral3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0)
    cfg = parse_llama(hf, "x")
    rope = cfg.rope["full_attention"]
    assert (rope.kind, rope.theta, rope.factor, rope.original_max_positions) == ("yarn", 1e6, 16.0, 16384)
    assert cfg.query_scale_beta == 0.1
    transformers = pytest.importorskip("transformers")
    want = transformers.Ministral3Config.from_dict(hf).rope_parameters
    assert (want["rope_theta"], want["factor"], want["llama_4_scaling_beta"]) == (1e6, 16.0, 0.1)


SIZES = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 30,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def test_gemma3_fields_left_out_are_gemma3_text_configs():
    """A Gemma 3 config.json gives the sizes and leaves the rest to Gemma3TextConfig: its layer pattern (five
    sliding, one global), RoPE bases (1e6 global, 1e4 local), attention scale (256 ** -0.5), epsilon, window,
    head size, positions, BOS and activation. A default read otherwise gives other logits without a word."""
    import transformers

    from edgemtp.config import FULL, SLIDING, parse_gemma3

    want = transformers.Gemma3TextConfig(**SIZES)
    cfg = parse_gemma3(dict(SIZES), "x")
    assert cfg.layer_types == tuple(want.layer_types)
    assert {t: cfg.rope[t].theta for t in (FULL, SLIDING)} == {t: want.rope_parameters[t]["rope_theta"]
                                                                for t in (FULL, SLIDING)}
    assert (cfg.scale, cfg.rms_norm_eps, cfg.sliding_window, cfg.head_dim, cfg.max_position_embeddings,
            cfg.bos_token_id, cfg.hidden_activation, cfg.final_logit_softcapping) == \
        (want.query_pre_attn_scalar ** -0.5, want.rms_norm_eps, want.sliding_window, want.head_dim,
         want.max_position_embeddings, want.bos_token_id, want.hidden_activation, want.final_logit_softcapping)


def test_llama_family_fields_left_out_are_the_config_classes():
    """qwen2's first sliding layer (max_window_layers 28) under use_sliding_window, YaRN's betas and attention
    factor (Ministral3Config's default RoPE; mscale / mscale_all_dim), ministral3's attention without biases,
    the default eos only where the vocabulary has it: each as transformers reads it."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgemtp.config import FULL, SLIDING, parse_llama

    hf = {**SIZES, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}
    assert parse_llama(hf, "x").layer_types == tuple(transformers.Qwen2Config(**hf).layer_types) == \
        (FULL,) * 28 + (SLIDING,) * 2
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}
    for model_type, cls, params in (("ministral3", transformers.Ministral3Config, None),
                                    ("llama", transformers.LlamaConfig, {**yarn, "mscale": 2.0, "mscale_all_dim": 1.0}),
                                    ("llama", transformers.LlamaConfig, yarn)):
        hf = {**SIZES, "model_type": model_type, **({"rope_parameters": params} if params else {})}
        rope = parse_llama(hf, "x").rope[FULL]
        _, factor = ROPE_INIT_FUNCTIONS["yarn"](cls(**hf), "cpu")
        assert rope.scale == pytest.approx(factor), model_type
        assert (rope.beta_fast, rope.beta_slow) == (32.0, 1.0), model_type
    assert not parse_llama({**SIZES, "model_type": "ministral3", "attention_bias": True}, "x").attention_bias
    smollm3 = {**SIZES, "model_type": "smollm3"}  # SmolLM3Config's eos 128001
    assert parse_llama({**smollm3, "vocab_size": 128_001}, "x").eos_token_ids == ()
    assert parse_llama({**smollm3, "vocab_size": 128_002}, "x").eos_token_ids == (128_001,)


@pytest.mark.parametrize("change,message", [
    ({"eos_token_id": 96}, r"field 'eos_token_id' \[96\] outside the vocabulary of 96"),
    ({"bos_token_id": 96}, "field 'bos_token_id' 96 outside the vocabulary of 96"),
    ({"head_dim": 15}, r"head_dim must be even \(rotary embedding\)"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 must be a multiple of num_key_value_heads 3"),
    ({"rms_norm_eps": -1e-6}, "field 'rms_norm_eps' -1e-06 must not be negative"),
])
def test_config_values_no_graph_can_take_are_refused(change, message):
    """An id one past the vocabulary, heads the rotary embedding or grouped attention cannot split, a negative
    epsilon: named as config.json is read, not met mid-export or as NaN logits. An epsilon of 0 is allowed."""
    from edgemtp.config import parse_gemma3, parse_llama

    with pytest.raises(EdgemtpError, match=message):
        parse_gemma3({**SIZES, **change}, "x")
    with pytest.raises(EdgemtpError, match=message):
        parse_llama({**SIZES, "model_type": "llama", **change}, "x")
    assert parse_llama({**SIZES, "model_type": "llama", "rms_norm_eps": 0.0}, "x").rms_norm_eps == 0.0
    # Qwen2Config's default of 32 KV heads where config.json leaves them out: the message says where 32 came from
    unsaid = {k: v for k, v in SIZES.items() if k != "num_key_value_heads"}
    with pytest.raises(EdgemtpError, match=r"num_attention_heads 4 must be a multiple of num_key_value_heads 32 "
                                           r"\(where config.json leaves it out: the transformers config class's"):
        parse_llama({**unsaid, "model_type": "qwen2"}, "x")


def _rope(**params):
    """An edit of config.json: rope_scaling (Gemma 3: merged into the full layers' RoPE) set to `params`."""
    return lambda c: c.update(rope_scaling=params)


@pytest.mark.parametrize("edit,field,message", [
    # a number past float64 (json reads 1e400 as inf): exported as a RoPE that rotates nothing, an epsilon or a cap
    # that turns every logit to NaN or leaves it uncapped
    (lambda c: c["rope_parameters"]["full_attention"].update(rope_theta="1e400"),
     "rope_parameters.full_attention.rope_theta", "should be a finite number, got inf"),
    (lambda c: c.update(rms_norm_eps="1e400"), "rms_norm_eps", "should be a finite number, got inf"),
    (lambda c: c.update(final_logit_softcapping="1e400"), "final_logit_softcapping", "should be a finite number"),
    (lambda c: c.update(query_pre_attn_scalar="1e400"), "query_pre_attn_scalar", "should be a finite number"),
    (lambda c: c.update(rms_norm_eps="nan"), "rms_norm_eps", "should be a finite number, got nan"),
    # a RoPE factor of 0 was read as 1 (transformers divides by it: infinite frequencies); negative ones turn the
    # rotation backwards (transformers warns that a factor must be at least 1)
    (_rope(rope_type="linear", factor=0), "rope_scaling.factor", "0.0 must be positive"),
    (_rope(rope_type="linear", factor=-2.0), "rope_scaling.factor", "-2.0 must be positive"),
    (_rope(rope_type="yarn", factor=0, original_max_position_embeddings=64), "rope_scaling.factor",
     "0.0 must be positive"),
    (_rope(rope_type="yarn", factor="1e400", original_max_position_embeddings=64), "rope_scaling.factor",
     "should be a finite number, got inf"),
    (_rope(rope_type="llama3", factor=0, original_max_position_embeddings=64), "rope_scaling.factor",
     "0.0 must be positive"),
    # YaRN's ramp took the log of it: a traceback (math domain error); llama3's wavelength bounds all 0 or negative
    (_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=0),
     "rope_scaling.original_max_position_embeddings", "0 must be positive"),
    (_rope(rope_type="llama3", factor=4.0, original_max_position_embeddings=-64),
     "rope_scaling.original_max_position_embeddings", "-64 must be positive"),
    # read as 256 (transformers: ZeroDivisionError building the model)
    (lambda c: c.update(query_pre_attn_scalar=0), "query_pre_attn_scalar", "0.0 must be positive"),
    # read as 6 (transformers: ZeroDivisionError deriving the layer types)
    (lambda c: c.update(sliding_window_pattern=0, layer_types=None), "sliding_window_pattern", "must not be 0"),
])
def test_config_numbers_no_graph_can_take_are_one_error_line(tiny_gemma3, tmp_path, edit, field, message):
    """From the CLI, each refused in one line naming config.json and the field, and nothing exported."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    # "1e400" as the number a user writes, not a string
    (model_dir / "config.json").write_text(json.dumps(config).replace('"1e400"', "1e400").replace('"nan"', "NaN"))
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / "out"), "--max-context", "64"])
    line = assert_one_line_error(r, model_dir / "config.json", f"field '{field}'")
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"rope_theta": float("inf")}, "field 'rope_theta' should be a finite number, got inf"),
    ({"rope_theta": "abc"}, "field 'rope_theta' should be float, got 'abc'"),
    ({"partial_rotary_factor": float("nan")}, "field 'partial_rotary_factor' should be a finite number, got nan"),
    # the RoPE parameters' own: not followed by 'partial_rotary_factor 0.0 is not supported with rope_type ...'
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": "half"}},
     "field 'rope_parameters.partial_rotary_factor' should be float, got 'half'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": float("nan")}},
     "field 'rope_scaling.partial_rotary_factor' should be a finite number, got nan"),
])
def test_a_refused_number_is_reported_once(change, message):
    """A field refused as read is the whole message: not followed by a knock-on check of the 0 it was replaced
    with ('rope_theta 0.0 must be positive', 'partial_rotary_factor 0.0 is not supported')."""
    from edgemtp.config import parse_llama

    with pytest.raises(EdgemtpError) as e:
        parse_llama({**SIZES, "model_type": "llama", **change}, "x")
    assert str(e.value) == f"x: {message}"


def test_a_refused_query_pre_attn_scalar_is_reported_once():
    from edgemtp.config import parse_gemma3

    with pytest.raises(EdgemtpError) as e:
        parse_gemma3({**SIZES, "query_pre_attn_scalar": float("inf")}, "x")
    assert str(e.value) == "x: field 'query_pre_attn_scalar' should be a finite number, got inf"


def test_generation_config_that_is_not_an_object_is_refused(tiny_gemma3, tmp_path):
    """A generation_config.json holding a list was silently ignored (its stop ids lost); transformers'
    GenerationConfig fails on it."""
    from click.testing import CliRunner

    from edgemtp.cli import cli

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_gemma3[1], model_dir)
    (model_dir / "generation_config.json").write_text("[1, 106]")
    r = CliRunner().invoke(cli, ["export", str(model_dir), "-o", str(tmp_path / "out"), "--max-context", "64"])
    assert_one_line_error(r, model_dir / "generation_config.json", exact=f"{model_dir / 'generation_config.json'}: "
                          "expected a JSON object, got list")
    assert not (tmp_path / "out").exists()


def test_window_views_hold_the_widest_sliding_window():
    """A one-row pass's view of the sliding layers' buffers starts where the widest window starts: with sliding
    layers of 8 and 16 positions, the 16-wide layer's window must still be inside the view (it began at the
    8-wide window's start, cutting that layer's oldest 8 positions)."""
    from edgemtp.contract import KVSlot, TargetContract

    kv = (KVSlot(0, 1, 8, 8), KVSlot(1, 1, 8, 16), KVSlot(2, 1, 8))
    contract = TargetContract(10, 8, 64, kv, {}, window_views=True)
    for length in range(64):
        start = contract.window_offset(length)
        assert start <= max(0, length - 16)  # the widest window's positions, up to the query's, are in view
        assert start >= max(0, length - 16 - 8)  # and the view keeps at most a half-window step of the past more
    assert TargetContract(10, 8, 64, kv, {}).window_offset(40) == 0  # without window views, the whole buffer


def test_kv_cache_views_are_its_buffers_and_one_that_would_copy_is_refused():
    """The OrtValues a pass binds are the cache's buffers: the whole row for full-attention layers, the sliding
    layers' from the window offset on (one row, one KV head: still contiguous). A view over two rows from an
    offset would be a copy, written into for nothing: refused. Two heads from an offset bind the row's shadows
    (copies filled and copied back by before_pass / after_pass). nbytes counts keys, values and shadows."""
    from edgemtp.contract import KVSlot
    from edgemtp.runtime.kv_cache import KVCache

    cache = KVCache((KVSlot(0, 1, 4, 8), KVSlot(1, 2, 4)), 2, 16)
    assert cache.nbytes == 2 * (2 * 1 * 16 * 4 + 2 * 2 * 16 * 4) * 4
    views = cache.ort_values(slice(1, 2), window_offset=8)
    for layer, offset, shape in ((0, 8, [1, 1, 8, 4]), (1, 0, [1, 2, 16, 4])):
        for value, buffer in zip(views[layer], (cache.keys[layer], cache.values[layer])):
            assert value.shape() == shape and value.data_ptr() == buffer[1, :, offset:].ctypes.data
    with pytest.raises(ValueError, match="layer 0: a view from position 8 needs one row and one KV head"):
        cache.ort_values(slice(0, 2), window_offset=8)
    wide = KVCache((KVSlot(0, 2, 4, 8),), 1, 32)
    assert wide.shadow_room == 32  # 1.5 windows and SHADOW_EXTRA, at most the capacity
    wide.keys[0][0] = np.arange(2 * 32 * 4).reshape(2, 32, 4)
    wide.lengths[0] = 9
    wide.before_pass(slice(0, 1), 4)
    (k, _), = wide.ort_values(slice(0, 1), window_offset=4).values()
    shadow = wide._shadows[0][0][0]
    assert k.shape() == [1, 2, 32, 4] and k.data_ptr() == shadow.ctypes.data
    np.testing.assert_array_equal(shadow[0, :, :5], wide.keys[0][0, :, 4:9])  # positions 4..8, each head's
    shadow[0, :, 5] = -1.0  # what a pass of one new position writes at position 9
    wide.after_pass(slice(0, 1), 4, 9, 1)
    assert (wide.keys[0][0, :, 9] == -1.0).all() and wide.nbytes == 2 * (2 * 32 * 4 + 2 * 32 * 4) * 4  # K, V; shadows


def checked_files(tmp_path, monkeypatch, n: int) -> list[Path]:
    """`n` small files, and a verification record of this test's own (none of its checks racy)."""
    from edgemtp import verified

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)
    files = [tmp_path / f"f{i}" for i in range(n)]
    for f in files:
        f.write_text(f.name)
    return files


def test_two_loads_at_once_both_remember_their_checks(tmp_path, monkeypatch):
    """Two processes loading bundles at once (two workers, a `generate` beside a `chat`) each read the record,
    hash for seconds, then write it: the later write dropped the other's checks, and its next load hashed its
    1.3 GB again. Each write keeps what another wrote since."""
    from edgemtp import verified

    files = checked_files(tmp_path, monkeypatch, 3)
    first = verified.Record()
    first.add(files[0], files[0].stat(), "sha-f0")
    first.save()
    one, other = verified.Record(), verified.Record()  # both read before either wrote
    one.add(files[1], files[1].stat(), "sha-f1")
    other.add(files[2], files[2].stat(), "sha-f2")
    one.save()
    other.save()
    again = verified.Record()
    assert [again.known(f, f.stat(), "sha-" + f.name) for f in files] == [True, True, True]
    assert list(again.files) == [str(f.resolve()) for f in files]  # the newest last (MAX_FILES keeps them)


def test_a_save_merges_under_the_lock_and_keeps_a_recheck_as_newest(tmp_path, monkeypatch):
    """A save holds the record's lock from its read to its write: a save begun while another process's is
    between the two waits for it and keeps its checks (without the lock the later write dropped them). A file
    checked again in this load counts as new in the record as it was then, not where the record had it, so
    MAX_FILES drops older checks first."""
    import threading

    from edgemtp import verified

    files = checked_files(tmp_path, monkeypatch, 4)
    first = verified.Record()
    for f in files[:2]:
        first.add(f, f.stat(), "sha-" + f.name)
    first.save()
    monkeypatch.setattr(verified, "MAX_FILES", 3)
    one, other = verified.Record(), verified.Record()
    one.add(files[0], files[0].stat(), "sha-f0")  # checked again: the newest, f1 the oldest
    one.add(files[2], files[2].stat(), "sha-f2")
    other.add(files[3], files[3].stat(), "sha-f3")
    read, write = threading.Event(), threading.Event()
    real_read = one._read

    def read_then_wait():  # `one` has read the record, and waits to write it
        files = real_read()
        read.set()
        assert write.wait(60)
        return files

    one._read = read_then_wait
    saving = threading.Thread(target=one.save)
    saving.start()
    assert read.wait(60)
    waiting = threading.Thread(target=other.save)
    waiting.start()
    waiting.join(1)  # not a timing check: without the lock `other` wrote meanwhile, and `one`'s write lost it
    write.set()
    saving.join()
    waiting.join()
    again = verified.Record()
    assert list(again.files) == [str(f.resolve()) for f in (files[0], files[2], files[3])]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit(143)], ids=["ctrl-c", "sigterm"])
def test_a_save_stopped_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM (the command's exit_on_termination_signals: SystemExit) while the record is written, at the
    end of every bundle load that hashed: its temporary .verified-*.json stayed in the cache directory for good
    (only an OSError removed it), one more each time. The record before it stays as it was."""
    import json as json_mod

    from edgemtp import verified

    files = checked_files(tmp_path, monkeypatch, 2)
    first = verified.Record()
    first.add(files[0], files[0].stat(), "sha-f0")
    first.save()
    cache = tmp_path / "cache" / "edgemtp"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    record = verified.Record()
    record.add(files[1], files[1].stat(), "sha-f1")

    def stopped(obj, f, **kwargs):  # half the record written, then the signal
        f.write(json_mod.dumps(obj)[:10])
        raise stop

    monkeypatch.setattr(verified.json, "dump", stopped)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        record.save()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


def test_the_record_keeps_the_newest_checks_and_no_file_written_while_hashed(tmp_path, monkeypatch):
    """At most MAX_FILES files are remembered, the most recently checked (a file checked again counts as new);
    a file whose stat changed while it was hashed is not remembered."""
    from edgemtp import verified

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)
    monkeypatch.setattr(verified, "MAX_FILES", 2)
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_text(f.name)
    record = verified.Record()
    for f in (files[0], files[1], files[2], files[0]):
        record.add(f, f.stat(), "sha-" + f.name)
    record.save()
    again = verified.Record()
    assert [again.known(f, f.stat(), "sha-" + f.name) for f in files] == [True, False, True]
    st = files[1].stat()
    files[1].write_text("written while it was hashed")
    again.add(files[1], st, "sha-f1")
    assert not again.known(files[1], st, "sha-f1") and not again.added
    # a relative XDG_CACHE_HOME is ignored, as the XDG specification says: ~/.cache instead
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setattr(verified.Path, "home", classmethod(lambda cls: tmp_path / "home"))
    assert verified.record_path() == tmp_path / "home" / ".cache" / "edgemtp" / "verified.json"


# ---- the bundle as an app embedding onnxruntime directly reads it (docs/bundle-contract.md) ----
# Written from that document and the manifest alone, never from edgemtp.runtime: a graph or runtime change
# the document does not follow makes these decoders part from the engine.

def _contract_session(bundle_dir, graph):
    import onnxruntime as ort

    manifest = json.loads((Path(bundle_dir) / "edgemtp.json").read_text())
    g = manifest["graphs"][graph]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the head table's overridable initializer warns at every load
    return manifest, g["contract"], ort.InferenceSession(str(Path(bundle_dir) / g["file"]), options,
                                                         providers=["CPUExecutionProvider"])


class ContractTarget:
    """A batch-1 KV cache and target.onnx passes as docs/bundle-contract.md states them."""

    def __init__(self, bundle_dir):
        self.manifest, self.contract, self.session = _contract_session(bundle_dir, "target")
        c = self.contract
        types = {i.name: i.type for i in self.session.get_inputs()}
        dtype = np.float16 if types[f"past_key_values.{c['kv'][0]['layer']}.key"] == "tensor(float16)" else np.float32
        self.kv = {(s["layer"], kind): np.zeros((1, s["num_heads"], c["capacity"], s["head_dim"]), dtype)
                   for s in c["kv"] for kind in ("key", "value")}
        windows = [s["window"] for s in c["kv"] if s["window"]]
        self.window = max(windows) if c.get("window_views") and windows else None
        self.length, self.history, self.offsets = 0, [], set()

    def offset(self, new):
        """Where the sliding layers' views start: 0 for a multi-position pass, else half-window steps."""
        if self.window is None or new > 1:
            return 0
        step = max(1, self.window // 2)
        return max(0, (self.length - self.window) // step * step)

    def run(self, ids, num_logits=1):
        import onnxruntime as ort

        c, new = self.contract, len(ids)
        total, off = self.length + new, self.offset(new)
        feeds = {"input_ids": np.array([ids], np.int64),
                 "position_ids": np.arange(self.length, total, dtype=np.int64)[None],
                 "seqlens_k": np.array([total - 1], np.int32),
                 "total_sequence_length": np.array(total, np.int32),
                 "num_logits": np.array(num_logits, np.int64)}
        if c.get("window_views"):
            feeds["window_seqlens_k"] = np.array([total - 1 - off], np.int32)
            feeds["window_total_sequence_length"] = np.array(total - off, np.int32)
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        copies = []  # several KV heads: (buffer, the copy of its rows from off on bound instead)
        for s in c["kv"]:
            for kind in ("key", "value"):
                buf = self.kv[(s["layer"], kind)]
                rows = buf[:, :, off:] if s["window"] and self.window else buf
                if not rows.flags.c_contiguous:  # each head's rows a capacity apart: a copy holding the new rows too
                    rows = np.concatenate([rows[:, :, :self.length - off], np.zeros_like(rows[:, :, :new])], axis=2)
                    copies.append((buf, rows))
                view = ort.OrtValue.ortvalue_from_numpy(rows)
                io.bind_ortvalue_input(f"past_key_values.{s['layer']}.{kind}", view)
                io.bind_ortvalue_output(f"present.{s['layer']}.{kind}", view)  # the same memory: in place
        logits = np.empty((1, num_logits, c["vocab_size"]), np.float32)
        hidden = np.empty((1, new, c["hidden_size"]), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        io.bind_ortvalue_output("last_hidden_state", ort.OrtValue.ortvalue_from_numpy(hidden))
        self.session.run_with_iobinding(io)
        for buf, rows in copies:  # the pass's new rows into the buffer
            buf[:, :, self.length:total] = rows[:, :, self.length - off:]
        self.length, self.history, self.offsets = total, self.history + list(ids), self.offsets | {off}
        return logits, hidden


@pytest.fixture(scope="module")
def tiny_mqa_bundle(tmp_path_factory):
    """A tiny Gemma 3 with one KV head, whose sliding layers are read through window views (as 270M's)."""
    from .reference import save_tiny
    from .test_parity import tiny

    root = tmp_path_factory.mktemp("tiny_mqa")
    export(save_tiny(tiny("gemma3_text_mqa"), root / "model"), root / "bundle", capacity=64)
    return root / "bundle"


@pytest.mark.parametrize("kind", ["kv_heads_2", "mqa"])
def test_an_app_decoding_by_the_documented_contract_gets_the_engines_tokens(kind, request):
    bundle_dir = request.getfixturevalue("tiny_gemma3")[2] if kind == "kv_heads_2" \
        else request.getfixturevalue("tiny_mqa_bundle")
    prompt = [2, *np.random.default_rng(5).integers(3, 96, size=11).tolist()]
    target = ContractTarget(bundle_dir)
    eos = set(target.manifest["model"]["eos_token_ids"])
    logits, _ = target.run(prompt, num_logits=3)  # the last 3 positions' logits
    tokens = []
    while len(tokens) < 30:
        tokens.append(int(np.argmax(logits[0, -1])))
        if tokens[-1] in eos:
            break
        logits, _ = target.run(tokens[-1:])
    with Engine.load(bundle_dir) as engine:
        assert tokens == list(engine.token_ids(prompt, 30))
    # one KV head: the sliding layers were read through views past their buffers' start (window 8)
    assert target.contract["window_views"] and max(target.offsets) > 0  # kv_heads_2: from copies of the rows


def engine_draft(bundle_dir, prompt, token, k):
    """The engine's own `k` drafts after `prompt` and its next `token`: (ids, logits, the DrafterSession)."""
    from edgemtp.runtime.drafter_session import DrafterSession, recent_ids

    with Engine.load(bundle_dir) as engine:
        cache = engine.target.new_cache(1)
        _, h = engine.target.forward(np.array([prompt]), cache, rows=slice(0, 1))
        drafter = DrafterSession.load(engine.bundle)
        ids, ref = drafter.draft(np.array([token]), h[:, -1], cache, slice(0, 1), k,
                                 recent=recent_ids([[*prompt, token]], max(drafter.context, 1)))
    return ids, ref, drafter


def contract_draft(bundle_dir, target, token, hidden, k):
    """k greedy draft steps of drafter.onnx after `target`'s last pass, as docs/bundle-contract.md states
    them -> (draft ids, each step's logits over the vocabulary [k, V], each step's outputs by name)."""
    _, c, session = _contract_session(bundle_dir, "drafter")
    width = c.get("head", {}).get("context", 0)
    recent, drafts, logits, steps = [*target.history, token], [], [], []
    for _ in range(k):
        feeds = {"input_ids": np.array([[token]], np.int64), "last_hidden_state": hidden,
                 "position_ids": np.array([[target.length]], np.int64)}  # every step: the committed length
        if width:
            tail = recent[-width:]
            feeds["context_ids"] = np.array([[-1] * (width - len(tail)) + tail], np.int64)
        for layer in c["kv_layers"]:
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{kind}"] = target.kv[(layer, kind)]
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        token, hidden = int(out["draft_ids"][0, 0]), out["next_hidden_state"]
        drafts.append(token)
        recent.append(token)
        steps.append(out)
        if "logits" in out:
            logits.append(out["logits"][0, 0])
        else:  # an id may come more than once, with one finite logit at most: the max, not the last, is its own
            scattered = np.full(target.contract["vocab_size"], -np.inf, np.float32)
            np.maximum.at(scattered, out["candidate_ids"][0, 0], out["candidate_logits"][0, 0])
            logits.append(scattered)
    return drafts, np.stack(logits), steps


def test_an_app_drafting_by_the_documented_contract_gets_the_engines_drafts(tiny_gemma3, tmp_path):
    from .test_drafter import drafter_setup

    _, bundle_dir, *_ = drafter_setup(tiny_gemma3[1], tiny_gemma3[2], tmp_path)
    prompt = [2, *np.random.default_rng(6).integers(3, 96, size=20).tolist()]  # past 2 windows (8)
    target = ContractTarget(bundle_dir)
    logits, hidden = target.run(prompt)
    token = int(np.argmax(logits[0, -1]))
    drafts, draft_logits, _ = contract_draft(bundle_dir, target, token, hidden[:, -1:], 3)

    ids, ref, drafter = engine_draft(bundle_dir, prompt, token, 3)
    assert drafts == ids[0].tolist()
    assert not drafter.clustered  # the tiny drafter's head is the full one: its logits are the engine's
    np.testing.assert_allclose(draft_logits, ref[0], atol=1e-4)


class ContractStaticTarget:
    """A --static target.onnx's passes as docs/bundle-contract.md (Static graphs) states them."""

    def __init__(self, bundle_dir):
        self.manifest, self.contract, self.session = _contract_session(bundle_dir, "target")
        c = self.contract
        self.kv = {(s["layer"], kind): np.zeros((1, s["num_heads"], c["capacity"], s["head_dim"]), np.float32)
                   for s in c["kv"] for kind in ("key", "value")}
        self.length = 0

    def bias(self, window):
        """[1, 1, W, capacity + W]: query i (position L + i) against the cache's rows, then the pass's own."""
        c, W, L = self.contract, self.contract["verify_window"], self.length
        query = L + np.arange(W)[:, None]
        key = np.concatenate([np.arange(c["capacity"]), L + np.arange(W)])[None]  # each column's position
        cached = np.arange(c["capacity"] + W) < L  # only the cache rows holding tokens
        own = np.arange(c["capacity"] + W) >= c["capacity"]
        seen = cached | (own & (key <= query))
        if window is not None:
            seen &= query - key < window
        return np.where(seen, 0, c["mask_value"]).astype(np.float32)[None, None]

    def step(self, ids):
        """One call for n <= W new tokens -> (logits [n, V], hidden [n, H]) of the real positions."""
        c, W, n = self.contract, self.contract["verify_window"], len(ids)
        feeds = {"input_ids": np.array([ids + [ids[-1]] * (W - n)], np.int64),
                 "position_ids": np.minimum(self.length + np.arange(W), c["capacity"] - 1)[None].astype(np.int64)}
        for name, window in c["attention_bias"].items():
            feeds[name] = self.bias(window)
        for (layer, kind), buf in self.kv.items():
            feeds[f"past_key_values.{layer}.{kind}"] = buf
        out = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        for (layer, kind), buf in self.kv.items():
            buf[:, :, self.length:self.length + n] = out[f"present.{layer}.{kind}"][:, :, :n]
        self.length += n
        return out["logits"][0, :n], out["last_hidden_state"][0, :n]

    def run(self, ids):
        """Any number of tokens, in calls of W -> the last position's logits [V]."""
        W = self.contract["verify_window"]
        for start in range(0, len(ids), W):
            logits, _ = self.step(ids[start:start + W])
        return logits[-1]


def test_an_app_decoding_a_static_bundle_by_the_documented_contract_gets_the_engines_tokens(tiny_gemma3, tmp_path):
    """Prefill in calls of W (the last one padded), then one-token calls until the cache is full: their
    padded positions run past the capacity, and the sliding layers' mask slides over the whole cache."""
    bundle_dir = export(tiny_gemma3[1], tmp_path / "static", capacity=64, static_window=5)
    target = ContractStaticTarget(bundle_dir)
    assert target.contract["static"] and target.contract["verify_window"] == 5
    prompt = [2, *np.random.default_rng(5).integers(3, 96, size=42).tolist()]  # 43: 8 calls of 5 and one of 3
    eos = set(target.manifest["model"]["eos_token_ids"])
    tokens = [int(np.argmax(target.run(prompt)))]
    while target.length < 64 and tokens[-1] not in eos:
        tokens.append(int(np.argmax(target.run(tokens[-1:]))))
    assert len(tokens) == 22 and target.length == 64  # the last calls' padding positions were clipped
    with Engine.load(bundle_dir) as engine:
        assert tokens == list(engine.token_ids(prompt, 30))
    with Engine.load(tiny_gemma3[2]) as engine:  # and the dynamic graph's
        assert tokens == list(engine.token_ids(prompt, 30))


def test_an_app_drafting_with_a_clustered_head_by_the_documented_contract_gets_the_engines_drafts(tiny_gemma3,
                                                                                                 tmp_path):
    """The clustered head with a context of 5 recent tokens: a 2-token prompt starts context_ids with -1s, a
    21-token one fills it; the candidates' logits, scattered over the vocabulary, are DrafterSession's."""
    from edgemtp.drafter import export as drafter_export

    from .test_drafter import clustered_drafter

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_gemma3[2], bundle_dir)
    clustered_drafter(tiny_gemma3[1], tmp_path / "drafter")
    drafter_export.add_to_bundle(bundle_dir, tmp_path / "drafter", top_k=1, context=5)
    repeated = 0
    for size in (1, 20):
        prompt = [2, *np.random.default_rng(7).integers(3, 96, size=size).tolist()]
        target = ContractTarget(bundle_dir)
        logits, hidden = target.run(prompt)
        token = int(np.argmax(logits[0, -1]))
        drafts, draft_logits, steps = contract_draft(bundle_dir, target, token, hidden[:, -1:], 3)
        ids, ref, drafter = engine_draft(bundle_dir, prompt, token, 3)
        assert drafter.clustered and drafter.context == 5
        assert drafts == ids[0].tolist()
        np.testing.assert_array_equal(np.isfinite(draft_logits), np.isfinite(ref[0]))  # the same candidates
        np.testing.assert_allclose(draft_logits[np.isfinite(ref[0])], ref[0][np.isfinite(ref[0])], atol=1e-4)
        recent = [*prompt, token, *drafts]
        for i, out in enumerate(steps):  # the candidates hold the context's tokens, and the draft is their best
            context = recent[max(0, len(prompt) + 1 + i - 5):len(prompt) + 1 + i]
            assert set(context) <= set(np.flatnonzero(np.isfinite(draft_logits[i])))
            assert drafts[i] == int(np.argmax(draft_logits[i]))
            cand = out["candidate_ids"][0, 0][np.isfinite(out["candidate_logits"][0, 0])]
            repeated += len(out["candidate_ids"][0, 0]) > len(set(out["candidate_ids"][0, 0].tolist()))
            assert len(cand) == len(set(cand.tolist()))  # a repeated id has one finite logit
    assert repeated  # some step listed an id twice: a scatter by assignment could have hidden it


def test_an_app_reading_a_clustered_head_with_int8_rows_gets_the_documented_logits(tiny_gemma3, tmp_path):
    """`head.rows: "int8"` (our drafters in an fp32 bundle, the default): the clusters' tokens' logits come
    from the int8 copy of the table, but the 8 best are recomputed exactly and the context ids' are exact,
    as docs/bundle-contract.md says; the same bundle with fp32 rows gives every candidate's exact logit."""
    from .test_drafter import clustered_drafter

    model_dir = tiny_gemma3[1]
    clustered_drafter(model_dir, tmp_path / "drafter")
    prompt = [2, *np.random.default_rng(7).integers(3, 96, size=20).tolist()]
    steps = {}
    for rows in ("int8", "fp32"):
        bundle_dir = export(model_dir, tmp_path / rows, capacity=64, drafter=tmp_path / "drafter", drafter_top_k=3,
                            drafter_head_rows=rows, drafter_head_context=5)
        head = json.loads((bundle_dir / "edgemtp.json").read_text())["graphs"]["drafter"]["contract"]["head"]
        assert head["rows"] == rows and head["context"] == 5
        target = ContractTarget(bundle_dir)
        logits, hidden = target.run(prompt)
        steps[rows] = contract_draft(bundle_dir, target, int(np.argmax(logits[0, -1])), hidden[:, -1:], 3)
    assert steps["int8"][0] == steps["fp32"][0]  # the same drafts
    clustered = head["candidates"] - head["context"]  # the clusters' tokens, then the context ids
    for approx, exact in zip(steps["int8"][2], steps["fp32"][2]):
        np.testing.assert_array_equal(approx["candidate_ids"], exact["candidate_ids"])
        a, e = approx["candidate_logits"][0, 0], exact["candidate_logits"][0, 0]
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(e))
        live = np.isfinite(e)
        off = np.abs(a[live] - e[live])
        assert off.max() < 1e-2  # int8 rows: close
        np.testing.assert_allclose(a[clustered:][live[clustered:]], e[clustered:][live[clustered:]], atol=1e-5)
        cluster_off = np.abs(a[:clustered] - e[:clustered])[live[:clustered]]
        assert (cluster_off < 1e-5).sum() >= 8  # the best 8, recomputed in fp32
        assert (cluster_off > 1e-5).any()  # the others are not exact
        assert cluster_off[np.argmax(a[:clustered][live[:clustered]])] < 1e-5  # the draft's among the exact

def documented_inputs(section: str) -> list[str]:
    """The input names in the first column of docs/bundle-contract.md's table under `section`, as written
    there ("`past_key_values.{layer}.key` / `.value`" is two names)."""
    doc = (Path(__file__).parent.parent / "docs" / "bundle-contract.md").read_text()
    table = doc.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in re.findall(r"^\| (.+?) \|", table, re.M)[1:]:  # past the header
        # the names, not their types' shapes ("`input_ids` int64 `[batch, 1]`") or what a name is per
        # ("... for each `l` in `kv_layers`")
        cell = [c for c in re.findall(r"`([^`]+)`", row.split("|")[0].split(" for each ")[0])
                if re.fullmatch(r"[\w.{}]+", c)]
        names += [cell[0].rsplit(".", 1)[0] + c if c.startswith(".") else c for c in cell]
    return names


def test_the_documented_input_tables_name_the_graphs_inputs(tiny_mqa_bundle, tiny_gemma3, tmp_path):
    """Each table of inputs in docs/bundle-contract.md names the graph's inputs, no more and no fewer (a KV
    input once per layer; the transposed head table, listed as an input, is not fed, as the document says)."""
    from .test_drafter import drafter_setup

    def inputs(bundle_dir, graph):
        _, contract, session = _contract_session(bundle_dir, graph)
        return contract, {i.name for i in session.get_inputs()} - {"model.embed_tokens.weight.T.gemv"}

    def expand(names, layers):
        return {n.replace("{layer}", str(i)).replace("{l}", str(i)) for n in names for i in layers}

    contract, names = inputs(tiny_mqa_bundle, "target")
    assert contract["window_views"]  # the window_* inputs are there
    assert expand(documented_inputs("`target.onnx`"), [s["layer"] for s in contract["kv"]]) == names
    _, bundle_dir, *_ = drafter_setup(tiny_gemma3[1], tiny_gemma3[2], tmp_path)
    contract, names = inputs(bundle_dir, "drafter")
    documented = expand(documented_inputs("`drafter.onnx`"), contract["kv_layers"])
    assert documented - {"context_ids"} == names and "context_ids" not in contract["inputs"]  # a full head's
    static = export(tiny_gemma3[1], tmp_path / "static", capacity=64, static_window=5)
    contract, names = inputs(static, "target")
    documented = documented_inputs("Static graphs")  # the KV buffers are in its text: the whole buffers
    assert documented[-1] == "contract.attention_bias"  # "each name in" it
    kv = expand(["past_key_values.{layer}.key", "past_key_values.{layer}.value"], [s["layer"] for s in contract["kv"]])
    assert {*documented[:-1], *contract["attention_bias"], *kv} == names
