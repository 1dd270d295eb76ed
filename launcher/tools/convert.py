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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import Problem, UserError
from launcher.recipe import runfolder
from launcher.tools.checkpoint_readers import Source, find_checkpoint, open_fsdp, open_zero
from launcher.tools.merge import DTYPES, TOKENIZER_FILES
from launcher.tools.stream import size_text, st_dtype, write_shard
from launcher.train.tasks import TASKS

SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MAX_SHARD = 5 * 2**30


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
    checksums: dict[str, str] = {}
    with atomic.folder(out, what="converted model", key="--out") as tmp:
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
