"""safetensors, one tensor at a time (used by `ftl merge` and `ftl convert`).

Reading through safetensors' mmap keeps every page it touched resident until the file is
closed (a whole shard), and its writer needs every tensor of a shard in memory. These
read and write the same format with plain file I/O, so only the tensor at hand is held.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError

ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    key: str
    dtype: str  # safetensors name, e.g. BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> list[Entry]:
    """The tensors of a safetensors file, in file order; UserError if it is damaged."""
    import struct

    def damaged(why: str) -> UserError:
        return UserError(
            Problem(
                f"cannot read {path}: {why}",
                hint="the file is damaged or incomplete (an interrupted copy or download?): "
                "copy it again",
            )
        )

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise damaged("the header length points past the end of the file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise damaged("the header is not valid JSON") from None
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(Entry(key, info["dtype"], tuple(info["shape"]), 8 + n + begin, 8 + n + end))
    entries.sort(key=lambda e: e.start)
    if entries and entries[-1].end > size:
        raise damaged(f"it ends before its last tensor ({entries[-1].key}) does")
    return entries


def read_tensor(path: Path, entry: Entry) -> Any:
    import torch

    with path.open("rb") as f:
        f.seek(entry.start)
        data = bytearray(entry.end - entry.start)  # read straight into it: one copy
        if f.readinto(data) != len(data):
            raise UserError(Problem(f"cannot read {path}: it ends inside {entry.key}"))
    dtype = getattr(torch, ST_DTYPES[entry.dtype])
    if not data:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


def st_dtype(torch_dtype: Any) -> str:
    name = str(torch_dtype).replace("torch.", "")
    return next(k for k, v in ST_DTYPES.items() if v == name)


def write_shard(path: Path, planned: list[tuple[str, str, tuple[int, ...]]], tensors: Any) -> int:
    """Write a safetensors file whose tensors come one by one from `tensors` (in the order
    of `planned`: key, dtype, shape); the header is known before any data. Returns bytes."""
    import struct

    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in planned:
        n = (
            math.prod(shape)
            * torch.empty((), dtype=getattr(torch, ST_DTYPES[dtype])).element_size()
        )
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for (key, dtype, shape), tensor in zip(planned, tensors, strict=True):
            if st_dtype(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(
                    f"{key}: planned {dtype}{shape}, got {tensor.dtype}{tuple(tensor.shape)}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
