"""Bundles: a directory with `edgemtp.json`, ONNX graphs, head tensors and the tokenizer.

Writing goes to a temporary sibling directory renamed into place at the end, so an interrupted
export never leaves a half bundle. Loading checks every file against the manifest (presence, size,
sha256) and refuses any path that leaves the bundle directory: a bundle may come from someone else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .contract import TargetContract, graph_mismatch
from .errors import EdgemtpError, SwitchError, missing
from .json_file import read_json
from .manifest_graphs import check_graphs, whole
from .onnx_wire import GraphFacts, WireError, read_graph_facts
from .scratch import (as_open_makes, held_dir, hidden_prefix, link_to_nothing, nearest_existing, parents_made,
                      replace_dir, through_link)
from .verified import Record, stamp

MANIFEST = "edgemtp.json"
FORMAT = "edgemtp-bundle"
# 2: a target contract may have window_views (graph inputs an older runtime would not feed); 3: window_views on
# sliding layers with several KV heads, whose view from an offset on an older runtime bound in place (not contiguous
# memory: it refused the pass). A bundle is written with the oldest version that describes it (schema_of).
SCHEMA_VERSION = 3
READS = (1, 2, 3)  # version 1 bundles load as they are
# an exported manifest is kB (12 kB for Gemma 3 270M): one far larger is not read whole into memory
MAX_MANIFEST_BYTES = 1 << 24


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output(out: Path, overwrite: bool, inputs: dict | None = None) -> None:
    """Where a bundle may be written: a new path, or with --overwrite an earlier bundle or an empty
    directory. --overwrite deletes what is there, so it never takes a directory holding anything else
    (a model directory, a home directory, the current one, one of the `inputs`: {path: what it is}). A refusal
    that overwrite would lift, or that is about it, is a SwitchError: overwrite=True from Python, --overwrite from
    the CLI."""
    out = Path(out)
    if (link := link_to_nothing(out)) is not None:
        raise EdgemtpError(f"{out}: {link} is a symbolic link to nothing (dangling, or a loop)")
    existing = nearest_existing(out)
    if existing != out and not existing.is_dir():
        raise EdgemtpError(f"{out}: {existing} is a file, not a directory")
    if not out.exists():
        return
    if not overwrite:
        raise SwitchError("overwrite", True, f"is needed to replace {out}, which already exists")
    if not out.is_dir():
        raise SwitchError("overwrite", True, f"replaces only a bundle, and {out} is a file")
    here = Path.cwd().resolve()
    if here == out.resolve() or out.resolve() in here.parents:
        raise SwitchError("overwrite", True, f"will not delete {out}, which holds the current directory")
    # a bundle holding a file or directory of its own besides: the manifest check below would pass it
    for source, what in (inputs or {}).items():
        if any(out.resolve() in p.parents for p in (Path(source).absolute(), Path(source).resolve())):
            raise SwitchError("overwrite", True, f"would delete {source}, {what}, which {out} holds (write the "
                              "bundle elsewhere)")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SwitchError("overwrite", True, f"replaces only a bundle or an empty directory, and {out} is not an "
                          f"edgemtp bundle (no {MANIFEST})")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yields a temporary directory next to `out`; renames it to `out` only if the block succeeds."""
    out = through_link(Path(out))
    check_output(out, overwrite)
    with contextlib.ExitStack() as held:
        held.enter_context(parents_made(out))  # removed again if the export fails
        try:  # held while it lives: a killed export's is removed by the next one (scratch.py)
            tmp = held.enter_context(held_dir(out.parent, hidden_prefix(out, "partial-")))
        except OSError as e:
            raise EdgemtpError(f"{out}: cannot write a bundle in {out.parent} ({e.strerror})") from None
        as_open_makes(tmp)  # mkdtemp's 0700 would keep the bundle from other users (a shared model)
        try:
            yield tmp
            for f in tmp.rglob("*"):  # as open() makes them: onnxruntime's quantizer writes its data file 0600
                if f.is_file():
                    as_open_makes(f)
            if out.exists() and not overwrite:  # made by another run since check_output: not ours to replace
                raise SwitchError("overwrite", True, f"is needed to replace {out}, written by another run meanwhile")
            try:
                replace_dir(tmp, out, hidden_prefix(out, "partial-"), overwrite=overwrite)
            except OSError as e:  # the old bundle is left as it was
                raise EdgemtpError(f"{out}: cannot replace it ({e.strerror or e}; is it in use?)") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: dict) -> None:
    """Adds size and sha256 of every file already in `bundle_dir` and the edgemtp version writing it, then writes
    the manifest."""
    from . import __version__

    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(bundle_dir).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    own = {k: v for k, v in manifest.items() if k != "edgemtp_version"}  # a quantized copy's source bundle's
    full = {"format": FORMAT, "schema_version": schema_of(own), "edgemtp_version": __version__, **own, "files": files}
    (bundle_dir / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")


def schema_of(manifest: dict) -> int:
    """The oldest schema version describing `manifest`, so an older edgemtp still runs a bundle it can: 3 where a
    contract's window views cover sliding layers with several KV heads and can start past position 0, else 2 (a
    window about as long as the capacity keeps every view at 0: the whole buffers, which schema 2 binds too)."""
    for graph in manifest.get("graphs", {}).values():
        c = graph.get("contract") or {}
        if c.get("window_views") and any(s.get("window") and s.get("num_heads", 1) > 1 for s in c.get("kv", [])):
            contract = TargetContract.from_json(c)
            if contract.window_offset(contract.capacity - 1) > 0:  # the last pass a row can take
                return 3
    return 2


@dataclass(frozen=True)
class GraphEntry:
    path: Path
    quant: str
    contract: dict


@dataclass(frozen=True)
class Bundle:
    dir: Path
    manifest: dict
    # file -> its stamp (verified.stamp) when load checked it: graphs loaded later (the MTP drafter, the batched
    # verify graph, on first use) must read those files, not a re-export's (see check_unchanged)
    stamps: dict = field(default_factory=dict, compare=False, repr=False)
    # graph name -> its GraphFacts (onnx_wire.py) as load read them
    facts: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.manifest["tokenizer"]

    @property
    def chat(self) -> tuple[Path, dict[str, str]] | None:
        """(the chat template's file, the special tokens it may print); None: the model has no template."""
        chat = self.manifest.get("chat")
        return (self.dir / chat["template"], dict(chat.get("special_tokens", {}))) if chat else None

    def graph(self, name: str) -> GraphEntry:
        g = self.manifest["graphs"].get(name)
        if g is None:
            raise EdgemtpError(f"{self.dir / MANIFEST}: bundle has no '{name}' graph")
        return GraphEntry(self.dir / g["file"], g.get("quant", "fp32"), g.get("contract", {}))

    def check_unchanged(self) -> None:
        """Raises EdgemtpError if a file of the bundle is not the one load checked. A graph loaded on first use
        reads the files then: after an export --overwrite (a new directory renamed into place) a verify graph
        read the new weights while the target ran the old ones, and gave tokens neither model gives. A file
        with another stamp but the manifest's bytes (a copy) is fine, and hashed once."""
        for rel, then in self.stamps.items():
            p = self.dir / rel
            try:
                now = stamp(p.stat())
            except OSError:
                raise EdgemtpError(f"{p}: missing since the bundle was loaded (load it again)") from None
            if now == then:
                continue
            info = self.manifest["files"][rel]
            if now[2] != info["bytes"] or sha256(p) != info["sha256"]:
                raise EdgemtpError(f"{p}: changed since the bundle was loaded (re-exported or edited: load it "
                                   "again)")
            self.stamps[rel] = now

    def has_graph(self, name: str) -> bool:
        return name in self.manifest["graphs"]

    @property
    def target_contract(self) -> TargetContract:
        try:
            return TargetContract.from_json(self.graph("target").contract)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EdgemtpError(f"{self.dir / MANIFEST}: graphs.target.contract is malformed "
                               f"({e.__class__.__name__}: {e})") from None


def load(bundle_dir: Path, verify: bool = True) -> Bundle:
    """Validated load. `verify=False` skips the sha256 pass (sizes are still checked)."""
    d = Path(bundle_dir)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise EdgemtpError(f"{d}: not a bundle directory")
    if not mpath.is_file():
        raise EdgemtpError(f"{mpath}: {missing(mpath)} (not an edgemtp bundle)")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise EdgemtpError(f"{mpath}: {size} bytes, more than a manifest holds (at most {MAX_MANIFEST_BYTES})")
    m = read_json(mpath)
    _check_fields(m, mpath)
    record = Record() if verify else None
    stamps = {rel: _check_file(d, rel, info, mpath, record) for rel, info in m["files"].items()}
    if record is not None:
        record.save()
    facts = {}
    for name, g in m["graphs"].items():
        if g.get("file") not in m["files"]:
            raise EdgemtpError(f"{mpath}: graphs.{name}.file names a file not listed in 'files'")
        graph = facts[name] = _check_external_data(d, d / g["file"], m["files"])
        if name in ("target", "verify") and not g.get("contract", {}).get("static"):
            _check_contract(mpath, name, g, graph)
    if m["tokenizer"] not in m["files"]:
        raise EdgemtpError(f"{mpath}: field 'tokenizer' names a file not listed in 'files'")
    _check_chat(m, mpath)
    return Bundle(d, m, stamps, facts)


def _check_chat(m: dict, mpath: Path) -> None:
    """The optional "chat" entry: {"template": a file of the bundle, "special_tokens": {name: token text}}."""
    chat = m.get("chat")
    if chat is None:
        return
    if not isinstance(chat, dict) or chat.get("template") not in m["files"]:
        raise EdgemtpError(f"{mpath}: chat.template must name a file listed in 'files'")
    special = chat.get("special_tokens", {})
    if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in special.items()):
        raise EdgemtpError(f"{mpath}: chat.special_tokens must map names to token strings")


def _check_fields(m: dict, mpath: Path) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EdgemtpError(f"{mpath}: field 'format' is not '{FORMAT}'")
    version, reads = m.get("schema_version"), ", ".join(map(str, READS))
    if not whole(version):
        raise EdgemtpError(f"{mpath}: schema_version {version!r} unsupported (this edgemtp reads {reads})")
    if version not in READS:  # a user with a bundle of another release: say which side to bring up to date
        from . import __version__

        if version > max(READS):
            made = m.get("edgemtp_version")
            made = f"exported by edgemtp {made}; " if isinstance(made, str) else ""
            raise EdgemtpError(f"{mpath}: schema_version {version} is newer than this edgemtp ({__version__}) reads "
                               f"({reads}): {made}upgrade edgemtp, or re-export the bundle with this one")
        raise EdgemtpError(f"{mpath}: schema_version {version} is older than this edgemtp ({__version__}) reads "
                           f"({reads}): re-export the bundle with this edgemtp")
    for key, kind, shown in (("model", dict, "an object"), ("graphs", dict, "an object"), ("files", dict, "an object"),
                             ("tokenizer", str, "a string")):  # JSON's names: the user edits JSON, not Python
        if not isinstance(m.get(key), kind):
            raise EdgemtpError(f"{mpath}: field '{key}' missing or not {shown}")
    if "target" not in m["graphs"]:
        raise EdgemtpError(f"{mpath}: field 'graphs' has no 'target'")
    named = {}  # each file by its name without '.' and '..' steps: 'tokenizer.json' and './tokenizer.json' are one
    for rel, info in m["files"].items():
        if not (isinstance(info, dict) and whole(info.get("bytes")) and isinstance(info.get("sha256"), str)):
            raise EdgemtpError(f"{mpath}: files.{rel} must be an object with 'bytes' (a whole number) and "
                               "'sha256' (a hex string)")
        if posixpath.normpath(rel) == ".":  # the check of the file itself would name the bundle's path, not the entry
            raise EdgemtpError(f"{mpath}: files entry {rel!r} names the bundle directory, not a file")
        first = named.setdefault(posixpath.normpath(rel), rel)
        if first != rel:  # info counted it twice, and its bytes
            raise EdgemtpError(f"{mpath}: files entry {rel!r} lists {first!r} again")
    _check_model(m, mpath)
    _check_made_by(m, mpath)
    check_graphs(m, mpath)


def _check_model(m: dict, mpath: Path) -> None:
    """The model facts the runtime acts on (stop tokens, sizes, the quant that picks --draft auto) are
    whole numbers in range and agree with the target graph's contract: an edited manifest is named here,
    not met as a generation that never stops or an array of the wrong size."""
    model = m["model"]
    for key in ("vocab_size", "hidden_size"):
        if not whole(model.get(key), 1):
            raise EdgemtpError(f"{mpath}: model.{key} {model.get(key)!r} must be a positive whole number")
    vocab = model["vocab_size"]
    bos, eos = model.get("bos_token_id"), model.get("eos_token_ids", [])
    if bos is not None and not (whole(bos) and bos < vocab):
        raise EdgemtpError(f"{mpath}: model.bos_token_id {bos!r} is not a token id below vocab_size {vocab}")
    if not isinstance(eos, list) or not all(whole(t) and t < vocab for t in eos):
        raise EdgemtpError(f"{mpath}: model.eos_token_ids {eos!r} must be a list of token ids below vocab_size "
                           f"{vocab}")
    # shown by info only, but shown: "model: 5", "-5 layers"
    if not isinstance(model.get("model_type", ""), str):
        raise EdgemtpError(f"{mpath}: model.model_type {model['model_type']!r} must be a string")
    if "num_layers" in model and not whole(model["num_layers"], 1):
        raise EdgemtpError(f"{mpath}: model.num_layers {model['num_layers']!r} must be a positive whole number")


def _check_made_by(m: dict, mpath: Path) -> None:
    """What made the bundle (info's "made by" and parameter count), optional: a bundle written before they were
    recorded has neither. One of the wrong kind was dropped or printed as it is ("-5 parameters")."""
    version = m.get("edgemtp_version", "")
    if not isinstance(version, str):
        raise EdgemtpError(f"{mpath}: edgemtp_version {version!r} must be a string")
    source = m.get("source", {})
    if not isinstance(source, dict):
        raise EdgemtpError(f"{mpath}: source {source!r} must be an object")
    if not isinstance(source.get("model", ""), str):
        raise EdgemtpError(f"{mpath}: source.model {source['model']!r} must be a string")
    if "parameters" in source and not whole(source["parameters"], 1):
        raise EdgemtpError(f"{mpath}: source.parameters {source['parameters']!r} must be a positive whole number")


def inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths and anything that resolves outside `root`."""
    try:
        p = (root / rel).resolve()
    except ValueError:  # an embedded NUL byte: no file can have that name
        raise EdgemtpError(f"{root / MANIFEST}: path {rel!r} is not a file name") from None
    if Path(rel).is_absolute() or not (p.is_relative_to(root.resolve()) or _hub_blob(root, rel, p)):
        how = "is a symbolic link to a file outside the bundle (copy the file in)" if (root / rel).is_symlink() \
            else "points outside the bundle"
        raise EdgemtpError(f"{root / MANIFEST}: path '{rel}' {how}")
    return p


def _hub_blob(root: Path, rel: str, p: Path) -> bool:
    """Whether `rel` is a link of a Hugging Face hub cache's snapshot (what snapshot_download returns without
    local_dir: REPO/snapshots/REVISION/FILE, a link to REPO/blobs/SHA; the bundle may be a folder of the
    repository, REVISION/FOLDER/FILE) to its own repository's blobs. The file's content is checked against the
    manifest's sha256 as any other file's."""
    folder = root.resolve()
    repos = [d.parent.parent for d in (folder, *folder.parents) if d.parent.name == "snapshots"]
    return (".." not in Path(rel).parts and (root / rel).is_symlink() and bool(repos)
            and p.parent == repos[0] / "blobs")


def _check_file(d: Path, rel: str, info: dict, mpath: Path, record: Record | None) -> tuple:
    """Checks one file of the manifest -> its stamp (verified.stamp), taken before the hash: a change while
    hashing shows later. `record`: None checks the size only; else the sha256 too, unless the record knows
    the file unchanged since it last matched (verified.py)."""
    p = inside(d, rel)
    name = d / rel  # messages name the file as the bundle lists it (a hub snapshot's link, not its blob)
    if not p.is_file():
        raise EdgemtpError(f"{name}: {missing(p)} (listed in {mpath.name})")
    st = p.stat()
    if st.st_size != info.get("bytes"):
        raise EdgemtpError(f"{name}: size {st.st_size} differs from the manifest's {info.get('bytes')} "
                           "(file changed after export)")
    if record is not None and not record.known(p, st, info.get("sha256")):
        if sha256(p) != info.get("sha256"):
            raise EdgemtpError(f"{name}: sha256 differs from the manifest (file changed after export)")
        record.add(p, st, info["sha256"])
    else:  # not hashed: opened, so that a file this process may not read is named here, not by ONNX Runtime's
        open(p, "rb").close()  # load, whose message names the graph (for its data file) among lines of its log
    return stamp(st)


def _check_contract(mpath: Path, name: str, g: dict, graph: GraphFacts) -> None:
    """The graph's KV inputs and logits / hidden outputs against its contract (check_graphs checked the fields
    themselves); a static graph's are checked when it is loaded (static_target)."""
    problem = graph_mismatch(TargetContract.from_json(g["contract"]), graph.inputs, graph.outputs, graph.windows)
    if problem:
        raise EdgemtpError(f"{mpath}: graphs.{name}.contract does not match {g['file']}: {problem}")


def graph_facts(graph: Path) -> GraphFacts:
    """What the checks read from a graph file (onnx_wire.py: no onnx package at run time)."""
    try:
        return read_graph_facts(graph)
    except (WireError, UnicodeDecodeError):
        raise EdgemtpError(f"{graph}: not a valid ONNX file") from None
    except OSError as e:
        raise EdgemtpError(f"{graph}: cannot read ({e.strerror})") from None


def _check_external_data(d: Path, graph: Path, files: dict) -> GraphFacts:
    """The graph's facts, after checking that its external data are files of the bundle."""
    facts = graph_facts(graph)
    for location in facts.data_files:
        inside(d, location)
        if location not in files:
            raise EdgemtpError(f"{graph}: external data '{location}' is not listed in the manifest")
    return facts
