"""`ftl merge --base MODEL --adapter DIR --out DIR` (also `tools/merge_adapter.py`).

Folds a PEFT LoRA / rsLoRA / DoRA adapter into its base model without ever holding the
whole model: the base's safetensors are read one tensor at a time, each targeted weight
gets its delta in float32, and the result is written as sharded safetensors with an
index, next to the config, tokenizer, chat template and generation config. Peak memory
is about one output shard plus the adapter.

    LoRA     W' = W + s * B @ A,  s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA     W' = m / ||W + s * B @ A||_row * (W + s * B @ A)
    embedding LoRA  E' = E + s * (B @ A)^T
    modules_to_save: the adapter's copy replaces the base tensor (grown embeddings too)

Written into a temporary folder next to `--out` and renamed into place at the end; a
failure (a bad tensor, a full disk) removes the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import Problem, UserError
from launcher.tools.peft_adapter import Adapter, Delta, merged, read_adapter
from launcher.tools.qlora import dequantized, qlora_settings, quantized_by_bnb
from launcher.tools.stream import (
    ST_DTYPES,
    Entry,
    read_header,
    read_tensor,
    size_text,
    st_dtype,
    write_shard,
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# files copied from the adapter folder first (ftl saves the tokenizer it trained with
# there, added tokens included), else from the base
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def base_shards(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / f for f in files]
    single = base / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(base.glob("*.safetensors"))
    if found:
        return found
    raise UserError(
        Problem(
            f"{base} holds no safetensors weights",
            key="--base",
            hint="pass a Hugging Face model folder saved with safetensors "
            "(`huggingface-cli download` fetches them)",
        )
    )


# -- planning and writing -----------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One tensor of the merged model."""

    key: str
    source: tuple[Path, Entry] | None  # the base's tensor (None: the adapter's only)
    dtype: str  # safetensors dtype written
    shape: tuple[int, ...]
    dequantize: bool = False  # round-trip through the 4-bit format QLoRA trained against

    @property
    def nbytes(self) -> int:
        import torch

        size = torch.empty((), dtype=getattr(torch, ST_DTYPES[self.dtype])).element_size()
        return math.prod(self.shape) * size


@dataclass
class Plan:
    base: Path
    adapter: Adapter
    out: Path
    dtype: str | None
    shards: list[list[Item]]  # the output files, in order
    qlora: dict[str, Any] | None = None  # {"type", "double_quant", "dtype"}: 4-bit base

    @property
    def items(self) -> list[Item]:
        return [item for shard in self.shards for item in shard]

    def file_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


FLOATS = {"F64", "F32", "F16", "BF16"}


def plan(
    base: Path,
    adapter_dir: Path | None,
    out: Path,
    dtype: str | None,
    max_shard_mb: int | None,
    overwrite: bool,
    qlora: dict[str, Any] | None = None,
) -> Plan:
    """Every check, from headers only: nothing is read in full and nothing is written.
    Without an adapter the plan re-streams the base (a copy, resharded or cast)."""
    import torch

    adapter = read_adapter(adapter_dir) if adapter_dir else Adapter(base, {"lora_alpha": 0})
    if not base.is_dir():
        raise UserError(
            Problem(
                f"{base} is not a model folder",
                key="--base",
                hint="download the base first (huggingface-cli download NAME --local-dir DIR)",
            )
        )
    if not (base / "config.json").is_file():
        raise UserError(Problem(f"{base} has no config.json", key="--base"))
    if out.exists() and not overwrite:
        raise UserError(
            Problem(
                f"{out} already exists", key="--out", hint="add --overwrite, or pick another folder"
            )
        )
    if out.resolve() in (base.resolve(), (adapter_dir or base).resolve()):
        raise UserError(Problem("--out must differ from --base and --adapter", key="--out"))
    files = base_shards(base)
    out_st = st_dtype(getattr(torch, DTYPES[dtype])) if dtype else None
    cfg = adapter.config
    items: list[Item] = []
    for path in files:
        for e in read_header(path):
            shape = tuple(adapter.replaced[e.key].shape) if e.key in adapter.replaced else e.shape
            d = adapter.deltas.get(e.key)
            if d is not None:
                _check_delta(e.key, shape, d, cfg)
            written = out_st if out_st and e.dtype in FLOATS else e.dtype
            dq = bool(qlora) and quantized_by_bnb(e.key, e.shape) and e.key not in adapter.replaced
            items.append(Item(e.key, (path, e), written, shape, dq))
    seen = {i.key for i in items}
    missing = sorted(k for k in adapter.deltas if k not in seen)
    if missing:
        raise UserError(
            Problem(
                f"the adapter was trained on another base: it changes {missing[0]}, "
                f"which {base} does not have ({len(missing)} such tensor(s))",
                key="--base",
                hint=f"merge into {cfg.get('base_model_name_or_path')}",
            )
        )
    for key in sorted(set(adapter.replaced) - seen):  # e.g. a head the base ties
        if not _tied_head(base, key):
            t = adapter.replaced[key]
            items.append(Item(key, None, out_st or st_dtype(t.dtype), tuple(t.shape)))
    largest = max(p.stat().st_size for p in files)
    limit = max_shard_mb * 2**20 if max_shard_mb else largest
    shards: list[list[Item]] = [[]]
    held = 0
    for item in items:
        if shards[-1] and held + item.nbytes > limit:
            shards.append([])
            held = 0
        shards[-1].append(item)
        held += item.nbytes
    return Plan(base, adapter, out, dtype, shards, qlora)


def _check_delta(key: str, shape: tuple[int, ...], d: Delta, cfg: dict[str, Any]) -> None:
    rows, cols = d.b.shape[0], d.a.shape[1]
    update = (cols, rows) if d.embedding or cfg.get("fan_in_fan_out") else (rows, cols)
    if tuple(shape) != update or d.b.shape[1] != d.a.shape[0]:
        raise UserError(
            Problem(
                f"the adapter was trained on another base: {key} is {tuple(shape)} in the "
                f"base but the adapter's update is {update} "
                f"(lora_A {tuple(d.a.shape)}, lora_B {tuple(d.b.shape)})",
                key="--base",
                hint=f"merge into the model the adapter was trained on "
                f"({cfg.get('base_model_name_or_path')})",
            )
        )
    if d.magnitude is not None and d.magnitude.shape[0] != shape[0]:
        raise UserError(
            Problem(
                f"the adapter was trained on another base: {key} has {shape[0]} rows but "
                f"its DoRA magnitude {d.magnitude.shape[0]}",
                key="--base",
            )
        )


def _produce(p: Plan, shard: list[Item], report: dict[str, int], bar: Any) -> Iterator[Any]:
    """The merged tensors of one output shard, one at a time."""
    import torch

    cfg = p.adapter.config
    for item in shard:
        dtype = getattr(torch, ST_DTYPES[item.dtype])
        if item.key in p.adapter.replaced:  # the adapter's own copy of this weight
            tensor = p.adapter.replaced[item.key]
            report["replaced"] += 1
        else:
            path, entry = item.source  # type: ignore[misc]
            tensor = read_tensor(path, entry)
        if item.dequantize:
            tensor = dequantized(tensor, p.qlora)  # type: ignore[arg-type]
        if item.key in p.adapter.deltas:
            tensor = merged(tensor, p.adapter.deltas[item.key], cfg, dtype)
            report["merged"] += 1
        else:
            report["copied"] += item.key not in p.adapter.replaced
            tensor = tensor.to(dtype)
        bar.update(1)
        yield tensor
        del tensor


def merge(p: Plan, *, progress: bool = True) -> dict[str, Any]:
    """Run the plan; return a report (tensors merged, replaced, copied; bytes)."""
    from tqdm.auto import tqdm

    report = {"merged": 0, "replaced": 0, "copied": 0, "bytes": 0, "shards": len(p.shards)}
    names = p.file_names()
    with atomic.folder(p.out, what="merged model", key="--out") as tmp:
        with tqdm(
            total=len(p.items),
            disable=not progress,
            unit="tensor",
            file=sys.stderr,
            desc="merge",
            dynamic_ncols=True,
            mininterval=1.0,
        ) as bar:
            for name, shard in zip(names, p.shards, strict=True):
                planned = [(i.key, i.dtype, i.shape) for i in shard]
                report["bytes"] += write_shard(tmp / name, planned, _produce(p, shard, report, bar))
        if len(names) > 1:
            index = {
                "metadata": {"total_size": report["bytes"]},
                "weight_map": {i.key: n for n, sh in zip(names, p.shards, strict=True) for i in sh},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_config(p, tmp)
        _copy_side_files(p, tmp)
    return report


def _tied_head(base: Path, key: str) -> bool:
    config = json.loads((base / "config.json").read_text())
    return key.endswith("lm_head.weight") and bool(config.get("tie_word_embeddings"))


def _write_config(p: Plan, folder: Path) -> None:
    config = json.loads((p.base / "config.json").read_text())
    for key, tensor in p.adapter.replaced.items():
        if key.endswith("embed_tokens.weight") and "vocab_size" in config:
            config["vocab_size"] = tensor.shape[0]  # added tokens grew the embeddings
    if p.dtype is not None:
        config["dtype"] = DTYPES[p.dtype]
        config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_side_files(p: Plan, folder: Path) -> None:
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        for source in (p.adapter.path, p.base):
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
                break


def describe(p: Plan) -> str:
    """What --dry-run prints: inputs, what changes, and every file with its size and dtypes."""
    cfg = p.adapter.config
    kind = "DoRA" if cfg.get("use_dora") else "LoRA"
    if cfg.get("use_rslora"):
        kind = "rs" + kind
    sources = sorted({str(i.source[0].name) for i in p.items if i.source})
    lines = [
        f"base     {p.base} ({len(sources)} file(s))",
        f"adapter  {p.adapter.path}: {kind} r={cfg.get('r')} alpha={cfg.get('lora_alpha')}, "
        f"{len(p.adapter.deltas)} weight(s) changed, {len(p.adapter.replaced)} replaced "
        f"(modules_to_save), {size_text(p.adapter.nbytes)}",
        f"out      {p.out}" + (f" (written as {DTYPES[p.dtype]})" if p.dtype else ""),
    ]
    if p.qlora:
        n = sum(i.dequantize for i in p.items)
        lines.insert(
            2,
            f"qlora    {n} linear weight(s) taken as the {p.qlora['type']} 4-bit model saw them "
            f"(double quant {p.qlora['double_quant']}), then merged",
        )
    for name, shard in zip(p.file_names(), p.shards, strict=True):
        dtypes: dict[str, int] = {}
        for i in shard:
            dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
        shown = ", ".join(f"{n} {d}" for d, n in dtypes.items())
        lines.append(
            f"  {name}  {size_text(sum(i.nbytes for i in shard))}  {len(shard)} tensors ({shown})"
        )
    extra = ["model.safetensors.index.json"] if len(p.shards) > 1 else []
    lines.append(
        "  " + ", ".join([*extra, "config.json", "tokenizer", "chat template", "generation config"])
    )
    params = sum(math.prod(i.shape) for i in p.items)
    lines.append(f"  {params / 1e6:.2f}M parameters")
    return "\n".join(lines)


# -- command line (ftl merge, tools/merge_adapter.py) -------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, type=Path, help="the adapter folder (PEFT format)")
    p.add_argument(
        "--base",
        type=Path,
        help="the base model folder (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's)")
    p.add_argument(
        "--max-shard-mb", type=int, help="output shard size (default: the base's largest)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--qlora-base",
        choices=["auto", "dequantized", "original"],
        default="auto",
        help="a QLoRA adapter learned against 4-bit weights: merge into those (dequantized; "
        "auto: when the run's recipe says quant.bits 4) or into the original weights",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be written; write nothing"
    )


def run(args: argparse.Namespace) -> int:
    from launcher.assets import resolve_path

    adapter_dir = args.adapter
    base = args.base
    if base is None:
        cfg_path = adapter_dir / "adapter_config.json"
        name = (
            json.loads(cfg_path.read_text()).get("base_model_name_or_path")
            if cfg_path.is_file()
            else None
        )
        if not name:
            read_adapter(adapter_dir)  # says what is wrong with the adapter folder
            raise UserError(
                Problem("the adapter does not name its base", key="--base", hint="pass --base")
            )
        base = resolve_path(name, base=Path.cwd())
    if args.max_shard_mb is not None and args.max_shard_mb < 1:
        raise UserError(Problem("must be at least 1", key="--max-shard-mb"))
    qlora = qlora_settings(adapter_dir) if args.qlora_base != "original" else None
    if args.qlora_base == "dequantized" and qlora is None:
        raise UserError(
            Problem(
                "--qlora-base dequantized needs the run's recipe.yaml (quant.bits: 4) next to "
                "the adapter folder",
                key="--qlora-base",
                hint="merge the adapter where ftl saved it (RUN/model)",
            )
        )
    p = plan(
        Path(base), adapter_dir, args.out, args.dtype, args.max_shard_mb, args.overwrite, qlora
    )
    if args.dry_run:
        print(describe(p))
        return 0
    report = merge(p)
    if p.qlora:
        print(f"ftl merge: QLoRA adapter: merged into the dequantized {p.qlora['type']} base")
    print(
        f"ftl merge: {report['merged']} weight(s) merged, {report['replaced']} replaced, "
        f"{report['copied']} copied -> {p.out} ({report['shards']} shard(s), "
        f"{report['bytes'] / 2**20:.1f} MiB)"
    )
    return 0
