"""Lazy reader of Hugging Face safetensors checkpoints (fp32 / bf16 / fp16), no torch needed.

Tensors are memory-mapped and converted one at a time, so export holds at most one converted
tensor beside the graph. A multimodal checkpoint's text tower (`model.language_model.*`) is
read under the plain text-model names (`model.*`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import EdgemtpError, missing, not_a_file

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
           "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}
# multimodal checkpoints nest the text model; the exporters ask for text-model names
# a multimodal checkpoint's text tower -> the text model's names: transformers 5's layout and the older
# (llava-style) one, whose untied head is language_model.lm_head (transformers renames both on load)
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    key: str = ""  # the tensor's name in the file (a multimodal tower's, a fused matrix's: Checkpoint renames them)
    row: int = 0  # its first row there (a part of a fused matrix: split_rows)


class Checkpoint:
    """`ckpt[name]` -> float32 (or integer) numpy array; `name in ckpt`; `ckpt.keys()`."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise EdgemtpError(f"{self.dir}: not a directory (expected a Hugging Face model directory)")
        files, index = weight_files(self.dir)
        self.entries: dict[str, _Entry] = {}
        renamed = set()  # the text tower's tensors, where the checkpoint nests it
        # every tensor of each file, as transformers reads the shards an index names (its weight_map only picks
        # the files, and of a tensor in two of them the last file's wins)
        why = ("which is meant is unknown: transformers reads every tensor of the shards "
               f"{INDEX} names, the last file's winning") if index is not None else f"and no {INDEX} says which to read"
        for f in files:
            for name, e in read_header(f).items():
                if _text_name(name) in self.entries:  # stale shards beside new ones: which is meant is unknown
                    raise EdgemtpError(f"{self.dir}: tensor '{name}' is in both "
                                       f"{self.entries[_text_name(name)].file.name} and {f.name} ({why})")
                self.entries[_text_name(name)] = e
                if _text_name(name) != name:
                    renamed.add(_text_name(name))
        # a multimodal checkpoint's other towers (vision, audio, their projections): no text graph reads them
        self.outside_text = ({n for n in self.entries if n not in renamed and n != "lm_head.weight"} if renamed
                             else set())

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype ("BF16", "F32", "I8", ...)."""
        return self._entry(name).dtype

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as float32 (an integer one as it is); one holding NaN or inf is refused, naming it."""
        e = self._entry(name)
        return _finite(e, _convert(self._mapped(e), e.dtype))

    def rows(self, name: str, ids) -> np.ndarray:
        """Rows `ids` of a tensor (e.g. a few embedding rows) without converting the rest (checked as `[]` is)."""
        e = self._entry(name)
        ids = np.asarray(ids)
        return _finite(e, _convert(self._mapped(e)[ids], e.dtype), ids)

    def check_finite(self, block_bytes: int = 1 << 26) -> None:
        """Reads every tensor of the text model, a block of rows at a time, refusing the first holding NaN or inf
        as `[]` does: a command that reads its weights late (train-drafter, after building its windows) says so
        at once."""
        for name, e in self.entries.items():
            if name in self.outside_text:
                continue
            if not e.shape:
                self[name]
                continue
            step = max(1, block_bytes // max(1, (e.end - e.start) // max(1, e.shape[0])))
            for i in range(0, e.shape[0], step):
                self.rows(name, np.arange(i, min(i + step, e.shape[0])))

    def equal(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether tensors a and b hold the same values (torch.equal, as transformers compares weights it would
        tie), a few rows at a time: an embedding table converted whole can take gigabytes."""
        ea, eb = self._entry(a), self._entry(b)
        if ea.shape != eb.shape:
            return False
        ma, mb = self._mapped(ea).reshape(-1, *ea.shape[1:]), self._mapped(eb).reshape(-1, *eb.shape[1:])
        return all(np.array_equal(_convert(ma[i:i + rows], ea.dtype), _convert(mb[i:i + rows], eb.dtype))
                   for i in range(0, len(ma), rows))

    def split_rows(self, name: str, parts: dict[str, int]) -> None:
        """Tensor `name` read from now on as consecutive row ranges under the names of `parts` (name -> rows):
        a fused matrix (Phi-3's qkv_proj) as its parts, with no copy (rows are contiguous bytes)."""
        e = self._entry(name)
        if not e.shape or e.shape[0] != sum(parts.values()):
            raise EdgemtpError(f"{self.dir}: tensor '{name}' has shape {list(e.shape)}, but config.json implies "
                               f"{sum(parts.values())} rows ({' + '.join(map(str, parts.values()))})")
        row = (e.end - e.start) // e.shape[0]
        start, first = e.start, e.row
        for part, rows in parts.items():
            self.entries[part] = replace(e, shape=(rows, *e.shape[1:]), start=start, end=start + rows * row, row=first)
            start, first = start + rows * row, first + rows
        del self.entries[name]

    @staticmethod
    def _mapped(e: _Entry) -> np.ndarray:
        raw = np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.start, shape=(e.end - e.start,))
        return raw.view(_DTYPES[e.dtype]).reshape(e.shape)

    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise EdgemtpError(f"{self.dir}: tensor '{name}' not found in the checkpoint") from None


INDEX = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files to read and the index's tensor -> file map: the shards
    model.safetensors.index.json names where there is one (other *.safetensors beside them, an earlier
    download's, are not read, as transformers does not), else every *.safetensors (a tensor in two of the
    files is an error: Checkpoint)."""
    path = model_dir / INDEX
    if path.is_file():
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("weight_map is not an object of file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise EdgemtpError(f"{path}: not a valid safetensors index ({e})") from None
        except RecursionError:  # arrays or objects nested deeper than the parser recurses
            raise EdgemtpError(f"{path}: not a valid safetensors index (nested too deeply)") from None
        names = sorted(set(weight_map.values()))
        # shards are files of the directory, as transformers writes them: not a path to a file elsewhere
        outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise EdgemtpError(f"{path}: names {outside[0]!r}, which is not a file name in {model_dir}")
        lacking = [n for n in names if not (model_dir / n).is_file()]
        if lacking:
            raise EdgemtpError(f"{path}: names {lacking[0]}, which is not in {model_dir}")
        return [model_dir / n for n in names], weight_map
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EdgemtpError(f"{model_dir}: no *.safetensors files (expected a Hugging Face model directory)")
    return files, None


def _convert(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bf16 is the top half of an fp32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32"):  # an F32 tensor stays memory-mapped (read-only): no copy of the weights
        return arr.astype(np.float32, copy=False)
    return np.array(arr)


def _finite(e: _Entry, arr: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """arr (e's tensor, or its rows `ids`), refused if it holds NaN or inf: a damaged or badly converted checkpoint
    exported as is, and only surfaced as NaN logits when the bundle generated."""
    bad = non_finite(arr)
    if bad is None:
        return arr
    value, at, more = bad
    if ids is not None:  # the tensor's own row, not the block's
        at = (int(ids.reshape(-1)[at[0]]), *at[1:]) if ids.ndim else (int(ids), *at)
    if at:
        at = (at[0] + e.row, *at[1:])
    raise EdgemtpError(f"{e.file}: tensor '{e.key}' {holds((value, at, more))}: a damaged or badly converted "
                       "checkpoint (weights must be finite numbers)")


def non_finite(arr: np.ndarray) -> tuple[str, tuple[int, ...], str] | None:
    """None where every value of `arr` is finite (or it is not floating-point), else the first other one as
    ("NaN" / "inf" / "-inf", its index, " (and N more)" or "")."""
    if arr.dtype.kind != "f":
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        # one pass and no copy: a sum is finite where every value is; only a sum that is not (or that overflowed)
        # looks at each value
        if np.isfinite(arr.sum()):
            return None
        bad = ~np.isfinite(arr)
    count = int(bad.sum())
    if not count:  # the sum overflowed
        return None
    at = np.unravel_index(int(np.argmax(bad)), arr.shape)
    value = arr[at]
    return ("NaN" if np.isnan(value) else "inf" if value > 0 else "-inf", tuple(int(i) for i in at),
            f" (and {count - 1} more)" if count > 1 else "")


def holds(bad: tuple[str, tuple[int, ...], str]) -> str:
    """non_finite()'s answer in words: "holds NaN at [2, 3] (and 4 more)"."""
    value, at, more = bad
    return f"holds {value} at {list(at)}{more}"


def _text_name(name: str) -> str:
    for prefix, text in _TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return text + name[len(prefix):]
    return name


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit (MAX_HEADER_SIZE)


def read_header(path: Path) -> dict[str, _Entry]:
    if path.exists() and not path.is_file():  # a FIFO would be waited on forever, a device read without end
        raise EdgemtpError(f"{path}: {not_a_file(path)}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0:
                raise ValueError("bad header length")
            if n > size - 8:  # a download cut short, most likely
                raise ValueError(f"truncated: a header of {n} bytes in a file of {size}")
            if n > MAX_HEADER_BYTES:  # read whole and parsed: 300 MB took 1.5 GB and 21 s
                raise ValueError(f"a header of {n} bytes, more than the safetensors library reads ({MAX_HEADER_BYTES})")
            header = json.loads(f.read(n), object_pairs_hook=_unique)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise EdgemtpError(f"{path}: not a valid safetensors file ({e})") from None
    except RecursionError:  # arrays or objects nested deeper than the parser recurses
        raise EdgemtpError(f"{path}: not a valid safetensors file (nested too deeply)") from None
    if not isinstance(header, dict):
        raise EdgemtpError(f"{path}: not a valid safetensors file (its header is not a JSON object)")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, info, base, size)
    # tensors sharing bytes: each would read the other's (the safetensors library refuses such a header)
    shared = overlapping((e.start, e.end, name) for name, e in out.items())
    if shared:
        raise EdgemtpError(f"{path}: tensors '{shared[0]}' and '{shared[1]}' share bytes (their data_offsets overlap)")
    return out


def overlapping(spans) -> tuple[str, str] | None:
    """The names of two of the (start, end, name) byte spans that overlap, or None (a file's tensor table)."""
    spans = sorted(spans)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            return a, b
    return None


def _unique(pairs: list) -> dict:
    """A JSON object's pairs as a dict, refusing a name given twice (json.loads keeps the last: a tensor's
    first entry would be dropped without a word)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"'{key}' is given twice")
        out[key] = value
    return out


def _entry(path: Path, name: str, info, base: int, size: int) -> _Entry:
    """One header entry, checked as the safetensors library checks it: a header that lies (offsets that do
    not hold the shape's bytes, a wrong dtype) would otherwise surface as a numpy error mid-export."""
    if not isinstance(info, dict):
        raise EdgemtpError(f"{path}: tensor '{name}' has a header entry that is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise EdgemtpError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
    if not (isinstance(shape, list) and all(_whole(d) for d in shape)):
        raise EdgemtpError(f"{path}: tensor '{name}' has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise EdgemtpError(f"{path}: tensor '{name}' has data_offsets {offsets!r}, not [start, end]")
    start, end = offsets
    if base + end > size:
        raise EdgemtpError(f"{path}: truncated (tensor '{name}' runs past the end of the file)")
    # Python's integers: numpy's int64 product wraps (a shape of 2**32 x 2**32 needed 0 bytes) or overflows
    want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if end - start != want:
        raise EdgemtpError(f"{path}: tensor '{name}' has {end - start} bytes, but {dtype} {shape} needs {want}")
    return _Entry(path, dtype, tuple(shape), base + start, base + end, name)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def open_tokenizer(path: Path):
    """A model directory's tokenizer.json as a `tokenizers.Tokenizer`, a missing or damaged file named
    (tokenizers raises a bare Exception on bad JSON)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise EdgemtpError(f"{path}: {missing(path)} (the model directory needs its tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise EdgemtpError(f"{path}: not a valid tokenizer.json ({str(e)[:200]})") from None
