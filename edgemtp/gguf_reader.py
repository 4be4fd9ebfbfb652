"""Reading a llama.cpp GGUF file: its metadata as plain Python values and its tensors memory-mapped, still
quantized (gguf_import.py dequantizes them with the `gguf` package)."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from edgemtp.checkpoint import overlapping
from edgemtp.errors import EdgemtpError, not_a_file

if TYPE_CHECKING:  # for the annotation only: reading needs no gguf package
    import gguf

GGUF_MAGIC = b"GGUF"
# items of all metadata arrays together: Gemma 3's vocabulary (tokens, scores, types) holds 786,432; each item is a
# Python object (8 bytes of a u8 array, 64 of an empty array, as a list), so a hostile file's arrays took 9 times
# its size in memory (2.7 GB for one of 300 MB) and, nested, minutes
MAX_ARRAY_ITEMS = 1 << 23


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF lists dimensions fastest-varying first, numpy the reverse
    qtype: "gguf.GGMLQuantizationType"
    data: np.ndarray  # raw bytes [rows, bytes per row], memory-mapped


def read_gguf(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF v2/v3 file; metadata maps field names to plain Python values.

    Why not `gguf.GGUFReader`: it builds numpy views for every element of every array field, which
    takes 30 s and more for Gemma's 262k-token vocabulary. This reads the same header in about a second
    and memory-maps the tensor data, which `gguf.quants.dequantize` then decodes.
    """
    if not path.is_file():
        raise EdgemtpError(f"{path}: {not_a_file(path)}")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise EdgemtpError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return _parse(buf)
    except struct.error:  # a count, size or type read from past the end: a download cut short, most likely
        raise EdgemtpError(f"{path}: unreadable GGUF file (truncated: its header runs past the end of the file, "
                           f"{len(buf)} bytes)") from None
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, struct.error) as err:
        raise EdgemtpError(f"{path}: unreadable GGUF file ({_one_line(err)})") from None
    except RecursionError:  # arrays of arrays nested thousands deep: no real file has them
        raise EdgemtpError(f"{path}: unreadable GGUF file (metadata arrays nested too deep)") from None


def _parse(buf: np.ndarray) -> tuple[dict, list[GGUFTensor]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    raw, buf = buf, memoryview(buf)  # slicing a memoryview is much cheaper than slicing a memmap
    version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3; big-endian files neither)")
    pos, meta, budget = 24, {}, [MAX_ARRAY_ITEMS]
    for _ in range(n_fields):
        name, pos = _string(buf, pos)
        if name in meta:  # llama.cpp refuses the file: which value is meant would be a guess
            raise ValueError(f"field {name} is listed twice")
        (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        meta[name], pos = _value(buf, pos, vtype, budget, name)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
        pos += 4 + 8 * n_dims + 12
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f"general.alignment = {align!r} must be a positive whole number")
    if align & (align - 1):  # as llama.cpp refuses it: tensors would be read from other offsets than written
        raise ValueError(f"general.alignment = {align} must be a power of two")
    start = pos + (-pos % align)
    tensors, seen = [], set()
    for name, shape, qtype, offset in infos:
        if name in seen:  # the model directory keeps one tensor per name: which one would be a guess
            raise ValueError(f"tensor {name} is listed twice")
        seen.add(name)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if 0 in shape:  # no weight is empty: numpy and memoryview fail on one far from here
            raise ValueError(f"tensor {name} of shape {list(shape)} is empty")
        if not shape or shape[-1] % block:  # rows are whole blocks: a shorter row would shift every next one
            raise ValueError(f"tensor {name} of shape {list(shape)} is not made of whole {qtype.name} blocks "
                             f"of {block}")
        if offset % align:  # llama.cpp refuses it: writers pad each tensor to the alignment
            raise ValueError(f"tensor {name} at offset {offset} is not a multiple of general.alignment {align}")
        row_bytes = shape[-1] // block * block_bytes
        rows = math.prod(shape[:-1])  # Python's integers: numpy's int64 product wraps (2**32 x 2**32 rows: 0)
        data = raw[start + offset: start + offset + rows * row_bytes]
        if data.size != rows * row_bytes:
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors.append(GGUFTensor(name, shape, qtype, data.reshape(rows, row_bytes)))
    # tensors sharing bytes (llama.cpp refuses them too): each would be imported with the other's numbers
    shared = overlapping((offset, offset + t.data.size, t.name) for (_, _, _, offset), t in zip(infos, tensors))
    if shared:
        raise ValueError(f"tensors {shared[0]} and {shared[1]} share bytes (their offsets overlap)")
    return meta, tensors


_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("<Q", buf, pos)
    if size > len(buf) - pos - 8:  # a slice would silently stop at the end of the file
        raise ValueError(f"a string of {size} bytes runs past the end of the file")
    return bytes(buf[pos + 8: pos + 8 + size]).decode("utf-8"), pos + 8 + size


def _value(buf: memoryview, pos: int, vtype: int, budget: list[int], name: str):
    """One metadata value (of field `name`) at `pos` and the position after it; `budget`: the array items still
    allowed (MAX_ARRAY_ITEMS)."""
    if vtype == _STRING:
        return _string(buf, pos)
    if vtype in _SCALARS:
        dtype = np.dtype(_SCALARS[vtype])
        if dtype.itemsize > len(buf) - pos:
            raise struct.error("a value runs past the end of the file")
        return np.frombuffer(buf, dtype, 1, pos)[0].item(), pos + dtype.itemsize
    if vtype != _ARRAY:
        raise ValueError(f"unknown metadata value type {vtype}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if count > len(buf) - pos:  # every item takes a byte at least; a count of 2**63 and more is an OverflowError
        raise ValueError(f"an array of {count} items runs past the end of the file")
    budget[0] -= count
    if budget[0] < 0:
        raise ValueError(f"field {name}: metadata arrays of more than {MAX_ARRAY_ITEMS} items in all (a vocabulary "
                         "of 262,144 tokens takes 786,432)")
    if item_type in _SCALARS:  # numeric arrays in one go (scores, token types)
        dtype = np.dtype(_SCALARS[item_type])
        if count * dtype.itemsize > len(buf) - pos:
            raise ValueError(f"an array of {count} items runs past the end of the file")
        return np.frombuffer(buf, dtype, count, pos).tolist(), pos + count * dtype.itemsize
    items = []
    for _ in range(count):
        item, pos = _value(buf, pos, item_type, budget, name)
        items.append(item)
    return items, pos


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
