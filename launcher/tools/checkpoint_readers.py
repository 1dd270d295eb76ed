"""Reading training checkpoints one tensor at a time (for `ftl convert`).

- ZeRO-1/2/3: DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`, lazy: ZeRO-3
  gathers one parameter at a time), so the tensors are bit-identical to what
  `zero_to_fp32` produces; the file-backed pages of tensors already written are released.
- FSDP2: the full state dict ftl's checkpoints hold, memory-mapped, `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import compat
from launcher.errors import Problem, UserError
from launcher.recipe import runfolder

FSDP_FILES = ("pytorch_model_fsdp.bin", "model.safetensors", "pytorch_model.bin")


@dataclass
class Source:
    """What a checkpoint holds: tensor names, shapes and dtypes, and how to read each."""

    checkpoint: Path
    kind: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, Any]  # torch dtypes
    read: Callable[[str], Any]


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one of a run folder."""
    if runfolder.is_complete(path) or (path / "latest").is_file():
        return path
    found = runfolder.complete_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        Problem(
            f"{path} is neither a checkpoint nor a run folder with a complete checkpoint",
            key="CKPT",
            hint="pass RUN/checkpoints/step-N, or the run folder itself",
        )
    )


def open_zero(ckpt: Path) -> Source:
    import torch

    if not (ckpt / "latest").is_file():
        hint = (
            "this looks like an FSDP checkpoint: use ftl convert fsdp"
            if any((ckpt / f).exists() for f in FSDP_FILES)
            else "pass a checkpoint written under distributed.strategy zero1/zero2/zero3"
        )
        raise UserError(
            Problem(
                f"{ckpt} is not a DeepSpeed checkpoint (no 'latest' file)", key="CKPT", hint=hint
            )
        )
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed narrates on stdout
        # imported here: DeepSpeed's logger binds to the stdout of its import time
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), lazy_mode=True)
        except (FileNotFoundError, ValueError, RuntimeError, EOFError) as e:
            raise UserError(
                Problem(
                    f"cannot read the DeepSpeed checkpoint {ckpt}: {e}",
                    key="CKPT",
                    hint="a checkpoint cut short? use an earlier complete one",
                )
            ) from None
    shapes = {k: tuple(v.shape) for k, v in lazy.items()}
    dtypes = {k: getattr(v, "dtype", torch.float32) for k, v in lazy.items()}

    # ZeRO-3: the fp32 partitions every parameter is gathered from, memory-mapped from the
    # optimizer files; those whose mapping is file-backed can drop pages once read
    flats = {
        f.data_ptr(): f
        for t in lazy.values()
        if not isinstance(t, torch.Tensor)
        for rank_groups in compat.zero_flat_groups(t)
        for f in rank_groups
    }
    ranges = _file_backed_ranges() if flats else []
    releasable = [f for f in flats.values() if _inside(f, ranges)]

    def read(key: str) -> Any:
        t = lazy[key]
        if isinstance(t, torch.Tensor):  # ZeRO-1/2: DeepSpeed rebuilt it already
            return t
        param = t.contiguous()  # ZeRO-3: gathered from every rank's partition, a new tensor
        for flat in releasable:  # the mapped pages it read may go now
            release_mapped_pages(flat)
        return param

    return Source(ckpt, "zero", shapes, dtypes, read)


def _file_backed_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _inside(tensor: Any, ranges: list[tuple[int, int]]) -> bool:
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    return bool(size) and any(lo <= start and start + size <= hi for lo, hi in ranges)


def release_mapped_pages(tensor: Any) -> bool:
    """Drop the resident pages of a tensor that memory-maps a file (torch.load(mmap=True)):
    they were read once and are re-read from the page cache if needed again. Without it
    every page of the fp32 partitions ends up counted in the converter's memory. Callers
    pass only file-backed tensors (`_inside(t, _file_backed_ranges())`): on anonymous
    memory MADV_DONTNEED would zero the data. True if released."""
    import mmap

    if not sys.platform.startswith("linux"):
        return False
    start = tensor.data_ptr()
    size = tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    aligned = start - start % page
    libc = _libc()
    return libc.madvise(aligned, size + (start - aligned), 4) == 0  # MADV_DONTNEED


def _libc() -> Any:
    import ctypes

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


_LIBC: Any = None


def open_fsdp(ckpt: Path) -> Source:
    import torch

    found = next((ckpt / f for f in FSDP_FILES if (ckpt / f).is_file()), None)
    if found is None:
        if any(ckpt.glob("pytorch_model_fsdp_*")):
            raise UserError(
                Problem(
                    f"{ckpt} holds a sharded (DCP) FSDP checkpoint; ftl writes full state dicts",
                    key="CKPT",
                    hint="convert it with torch.distributed.checkpoint.format_utils "
                    "(dcp_to_torch_save) first",
                )
            )
        hint = (
            "this looks like a DeepSpeed checkpoint: use ftl convert zero"
            if (ckpt / "latest").is_file()
            else "pass a checkpoint written under strategy fsdp"
        )
        raise UserError(
            Problem(
                f"{ckpt} holds no FSDP model state ({', '.join(FSDP_FILES)})", key="CKPT", hint=hint
            )
        )
    if found.suffix == ".safetensors":
        from safetensors import safe_open

        from launcher.tools.stream import ST_DTYPES

        f = safe_open(str(found), "pt")
        keys = list(f.keys())  # noqa: SIM118
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {k: getattr(torch, ST_DTYPES[f.get_slice(k).get_dtype()]) for k in keys}
        return Source(ckpt, "fsdp", shapes, dtypes, f.get_tensor)
    try:
        state = torch.load(found, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            Problem(
                f"cannot read {found}: {e}",
                key="CKPT",
                hint="a checkpoint cut short? use an earlier complete one",
            )
        ) from None
    if "model" in state and isinstance(state["model"], dict):  # accelerate's nesting
        state = state["model"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return Source(
        ckpt,
        "fsdp",
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        tensors.__getitem__,
    )


# -- adapters ----------------------------------------------------------------------------
