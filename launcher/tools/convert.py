"""`ftl convert zero|fsdp CKPT --out DIR` (also `tools/convert_checkpoint.py`).

Turns a training checkpoint into a Hugging Face model folder: safetensors shards written
one tensor at a time, with the config, tokenizer and chat template of the run. `CKPT` is
a checkpoint (`RUN/checkpoints/step-N`) or a run folder (its newest complete checkpoint).

- `zero`: DeepSpeed ZeRO-1/2/3 checkpoints, read with DeepSpeed's own consolidation
  (`deepspeed.utils.zero_to_fp32`, lazy: ZeRO-3 gathers one parameter at a time), so the
  tensors are bit-identical to what `zero_to_fp32` produces.
- `fsdp`: the full state dict that ftl's FSDP2 checkpoints hold (`pytorch_model_fsdp.bin`),
  loaded memory-mapped with `weights_only=True`.

`--adapter-only` keeps the LoRA/DoRA weights (and modules_to_save) of an adapter run and
writes a PEFT adapter folder instead. A report lists parameter counts and a checksum per
tensor (`conversion.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import atomic, compat
from launcher.errors import Problem, UserError
from launcher.recipe import runfolder
from launcher.tools.merge import DTYPES, TOKENIZER_FILES
from launcher.tools.stream import size_text, st_dtype, write_shard
from launcher.train.tasks import TASKS

FSDP_FILES = ("pytorch_model_fsdp.bin", "model.safetensors", "pytorch_model.bin")
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MAX_SHARD = 5 * 2**30


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
_ADAPTER = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"\.default(\.weight)?$"
)


def adapter_name(key: str) -> str | None:
    """PEFT's saved name for a training-time adapter key; None if not part of the adapter."""
    if _ADAPTER.search(key):
        return key.replace(".default.", ".").replace(".default", "")
    if ".modules_to_save.default." in key:
        return key.replace(".modules_to_save.default.", ".")
    return None


def adapter_config(
    run: Path | None, names: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """adapter_config.json for the extracted weights: from the run's saved adapter when it
    has one, else built from the run's recipe and the tensors themselves."""
    if run and (run / "model" / "adapter_config.json").is_file():
        return json.loads((run / "model" / "adapter_config.json").read_text())
    recipe = _recipe(run)
    if recipe is None:
        raise UserError(
            Problem(
                "an adapter needs its settings (alpha, base model) and this checkpoint is not "
                "inside a run folder with recipe.yaml",
                key="--adapter-only",
                hint="convert the checkpoint where ftl wrote it (RUN/checkpoints/step-N)",
            )
        )
    a = recipe.adapter
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n})
    rank = next(shapes[k][0] for k in shapes if k.endswith("lora_A.default.weight"))
    saved = sorted(
        {
            n.split(".modules_to_save.")[0].rsplit(".", 1)[-1]
            for n in shapes
            if ".modules_to_save." in n
        }
    )
    return {
        "peft_type": "LORA",
        "task_type": TASKS[recipe.task].peft_task_type or None,
        "base_model_name_or_path": recipe.model.name_or_path,
        "r": rank,
        "lora_alpha": a.alpha,
        "lora_dropout": a.dropout,
        "use_rslora": a.rslora,
        "use_dora": any("lora_magnitude_vector" in n for n in names),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _recipe(run: Path | None) -> Any:
    return runfolder.read_recipe(run) if run else None


def _run_folder(ckpt: Path) -> Path | None:
    run = ckpt.parent.parent
    return run if (run / runfolder.RECIPE).is_file() else None


def _side_files_from(run: Path | None) -> Path | None:
    """Where config and tokenizer come from: the run's saved model, else its base model."""
    if run is None:
        return None
    if (run / "model" / "config.json").is_file():
        return run / "model"
    recipe = _recipe(run)
    name = recipe.model.name_or_path if recipe is not None else None
    if name:
        from launcher.assets import resolve_path

        with contextlib.suppress(UserError):
            base = resolve_path(name, base=Path.cwd())
            if (base / "config.json").is_file():
                return base
    return None


# -- the conversion ----------------------------------------------------------------------
def convert(
    kind: str,
    path: Path,
    out: Path,
    *,
    dtype: str | None,
    adapter_only: bool,
    overwrite: bool,
    dry_run: bool,
    max_shard_mb: int | None,
) -> dict[str, Any]:
    import torch

    ckpt = find_checkpoint(path)
    if out.exists() and not overwrite and not dry_run:
        raise UserError(
            Problem(
                f"{out} already exists", key="--out", hint="add --overwrite, or pick another folder"
            )
        )
    source = open_zero(ckpt) if kind == "zero" else open_fsdp(ckpt)
    run = _run_folder(ckpt)
    keys = list(source.shapes)
    is_adapter = any(adapter_name(k) for k in keys)
    if adapter_only:
        if not is_adapter:
            raise UserError(
                Problem(
                    f"{ckpt} holds no adapter weights",
                    key="--adapter-only",
                    hint="drop --adapter-only to convert the full model",
                )
            )
        names = {k: adapter_name(k) for k in keys if adapter_name(k)}
    else:
        if is_adapter:
            raise UserError(
                Problem(
                    f"{ckpt} is from an adapter run: its weights are PEFT-wrapped",
                    key="CKPT",
                    hint="add --adapter-only (a PEFT adapter folder), then ftl merge it into the base",
                )
            )
        names = {k: k for k in keys}
    out_dtype = getattr(torch, DTYPES[dtype]) if dtype else None

    def written_dtype(key: str) -> Any:
        d = source.dtypes[key]
        return out_dtype if out_dtype is not None and d.is_floating_point else d

    items = [(k, names[k], st_dtype(written_dtype(k)), source.shapes[k]) for k in names]
    limit = max_shard_mb * 2**20 if max_shard_mb else MAX_SHARD
    shards: list[list[tuple[str, str, str, tuple[int, ...]]]] = [[]]
    held = 0
    for item in items:
        n = _nbytes(item[2], item[3])
        if shards[-1] and held + n > limit:
            shards.append([])
            held = 0
        shards[-1].append(item)
        held += n
    stem = "adapter_model" if adapter_only else "model"
    files = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    report: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "kind": kind,
        "adapter_only": adapter_only,
        "tensors": len(items),
        "parameters": sum(_numel(s) for *_, s in items),
        "files": {f: _describe_shard(sh) for f, sh in zip(files, shards, strict=True)},
    }
    if dry_run:
        return report
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    checksums: dict[str, str] = {}
    try:
        from tqdm.auto import tqdm

        with tqdm(
            total=len(items),
            unit="tensor",
            file=sys.stderr,
            desc="convert",
            dynamic_ncols=True,
            mininterval=1.0,
        ) as bar:
            for name, shard in zip(files, shards, strict=True):
                planned = [(new, dt, shape) for _k, new, dt, shape in shard]
                write_shard(
                    tmp / name, planned, _produce(source, shard, written_dtype, checksums, bar)
                )
        if len(files) > 1:
            weight_map = {new: f for f, sh in zip(files, shards, strict=True) for _k, new, *_ in sh}
            total = sum(_nbytes(i[2], i[3]) for i in items)
            (tmp / f"{stem}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        if adapter_only:
            cfg = adapter_config(run, list(names.values()), source.shapes)
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _copy_side_files(run, tmp, adapter_only, out_dtype, source)
        report["checksum"] = checksum_name()
        report["checksums"] = checksums
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        atomic.publish(tmp, out)  # the old output stays until the new one is in
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == 28:
            raise UserError(
                Problem(
                    f"the disk under {parent} is full; the partial output was removed", key="--out"
                )
            ) from None
        raise
    return report


def _produce(
    source: Source,
    shard: list,
    written_dtype: Callable[[str], Any],
    checksums: dict[str, str],
    bar: Any,
) -> Iterator[Any]:
    for key, new, _dt, _shape in shard:
        tensor = source.read(key).to(written_dtype(key)).contiguous()
        import torch

        checksums[new] = checksum(tensor.reshape(-1).view(torch.uint8).numpy().data)
        bar.update(1)
        yield tensor
        del tensor


def checksum_name() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3_64"
    except ImportError:
        return "sha256"


def checksum(data: Any) -> str:
    """A fast checksum of the tensor's bytes: xxh3_64 (hex) when xxhash is installed (it
    comes with `datasets`), else the first 16 hex digits of SHA-256."""
    try:
        import xxhash

        return xxhash.xxh3_64_hexdigest(data)
    except ImportError:
        return hashlib.sha256(data).hexdigest()[:16]


def _copy_side_files(
    run: Path | None, folder: Path, adapter_only: bool, out_dtype: Any, source: Source
) -> None:
    src = _side_files_from(run)
    if src is None:
        return
    for name in SIDE_FILES:
        if adapter_only and name == "config.json":
            continue
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        emb = next((s for k, s in source.shapes.items() if k.endswith("embed_tokens.weight")), None)
        if emb and "vocab_size" in config:
            config["vocab_size"] = emb[0]
        if out_dtype is not None:
            config["dtype"] = str(out_dtype).replace("torch.", "")
            config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _describe_shard(shard: list[tuple[str, str, str, tuple[int, ...]]]) -> str:
    """'1.1 GiB, 201 tensors (201 F32)' for one output file."""
    dtypes: dict[str, int] = {}
    for _k, _new, dt, _shape in shard:
        dtypes[dt] = dtypes.get(dt, 0) + 1
    size = size_text(sum(_nbytes(dt, shape) for _k, _n, dt, shape in shard))
    shown = ", ".join(f"{n} {d}" for d, n in dtypes.items())
    return f"{size}, {len(shard)} tensors ({shown})"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(st: str, shape: tuple[int, ...]) -> int:
    size = {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "BOOL": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
    }[st]
    return _numel(shape) * size


# -- command line (ftl convert, tools/convert_checkpoint.py) -----------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["zero", "fsdp"], help="the checkpoint's strategy")
    p.add_argument("checkpoint", type=Path, help="RUN/checkpoints/step-N, or a run folder")
    p.add_argument("--out", required=True, type=Path, help="folder for the Hugging Face model")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="output dtype (default: as stored, fp32)"
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="an adapter run: write the PEFT adapter (LoRA/DoRA, modules_to_save)",
    )
    p.add_argument("--max-shard-mb", type=int, help="output shard size (default 5 GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")


def run(args: argparse.Namespace) -> int:
    if args.max_shard_mb is not None and args.max_shard_mb < 1:
        raise UserError(Problem("must be at least 1", key="--max-shard-mb"))
    report = convert(
        args.kind,
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        adapter_only=args.adapter_only,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        max_shard_mb=args.max_shard_mb,
    )
    head = (
        f"{report['checkpoint']} ({report['kind']}): {report['tensors']} tensors, "
        f"{report['parameters'] / 1e6:.2f}M parameters"
    )
    if args.dry_run:
        print(head)
        for name, size in report["files"].items():
            print(f"  {name}  {size}")
        return 0
    print(f"ftl convert: {head} -> {args.out}")
    return 0
