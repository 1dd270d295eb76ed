"""`ftl shard INPUT... --num-shards N --out DIR` (also `tools/shard_dataset.py`).

Splits JSONL, CSV/TSV, Parquet files or a saved Hugging Face dataset into N balanced,
shuffled JSONL shards plus `manifest.json` (rows, tokens and an xxh3 checksum per shard
and per input), streaming:

1. one pass reads every row once and keeps only its size (rows: 1, tokens: the count of
   `--tokenizer` over the row's text fields), 4 bytes per row;
2. a seeded permutation deals the rows out: `--by rows` round-robin (shard sizes differ by
   at most one row), `--by tokens` each row to the lightest shard so far (the totals
   differ by at most one row's tokens);
3. a second pass appends each row to its shard's file;
4. each shard is shuffled in memory (seeded), one at a time: memory is bounded by the
   largest shard, never the whole input.

The same inputs, shard count, `--by` and `--seed` give byte-identical shards. Everything
is written into a temporary folder next to `--out` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.data.shards import MANIFEST, hash_file, verify  # noqa: F401 (verify re-exported)
from launcher.errors import Problem, UserError

TEXT_SUFFIXES = (".jsonl", ".csv", ".tsv")


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf"
        raise UserError(
            Problem(
                f"{path} is a folder but not a saved dataset (no dataset_info.json)",
                key="INPUT",
                hint="pass files (.jsonl, .csv, .tsv, .parquet) or a datasets.save_to_disk folder",
            )
        )
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return suffix[1:]
    if suffix == ".parquet":
        return "parquet"
    raise UserError(
        Problem(
            f"unsupported input type '{suffix}': {path}",
            key="INPUT",
            hint="use .jsonl, .csv, .tsv, .parquet files or a saved Hugging Face dataset folder",
        )
    )


def iter_rows(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Every row of one input, in order, with where it came from; bounded memory."""
    kind = _kind(path)
    if kind == "jsonl":
        with path.open(encoding="utf-8-sig") as f:
            n = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise UserError(
                        Problem(
                            f"not UTF-8 text (byte {e.start}: {e.reason})",
                            file=f"{path}:{n + 1}",
                            key="INPUT",
                            hint="re-save the file as UTF-8",
                        )
                    ) from None
                if not line:
                    return
                n += 1
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        Problem(
                            f"malformed JSON: {e.msg} (column {e.colno})",
                            file=f"{path}:{n}",
                            key="INPUT",
                            hint="fix or remove the line",
                        )
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(
                        Problem("a JSONL row must be an object", file=f"{path}:{n}", key="INPUT")
                    )
                yield row, f"{path}:{n}"
    elif kind in ("csv", "tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            for r in reader:
                yield {k: v for k, v in r.items() if k is not None}, f"{path}:{reader.line_num}"
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own error types for a bad file
            raise UserError(
                Problem(f"not a readable Parquet file: {e}", file=str(path), key="INPUT")
            ) from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row, f"{path}[{i}]"
                i += 1
    else:
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: the splits one after the other
            for split in ds:
                for i, row in enumerate(ds[split]):
                    yield row, f"{path}/{split}[{i}]"
        else:
            for i, row in enumerate(ds):
                yield row, f"{path}[{i}]"


def _row_size(row: dict[str, Any], tokenizer: Any) -> int:
    if tokenizer is None:
        return 1
    texts: list[str] = []

    def walk(v: Any) -> None:  # every string in the row, chat messages included
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(row)
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def assign(sizes: list[int], num_shards: int, seed: int, by: str) -> tuple[Any, list[int]]:
    """Shard of every row and the size total of every shard (deterministic)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(sizes))
    shard_of = np.empty(len(sizes), dtype=np.int32)
    totals = [0] * num_shards
    if by == "rows":
        shard_of[order] = np.arange(len(sizes)) % num_shards
        for s in shard_of.tolist():
            totals[s] += 1
        return shard_of, totals
    heap = [(0, s) for s in range(num_shards)]
    for i in order.tolist():
        total, s = heapq.heappop(heap)
        shard_of[i] = s
        heapq.heappush(heap, (total + sizes[i], s))
    for total, s in heap:
        totals[s] = total
    return shard_of, totals


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.jsonl"


def shard(
    inputs: list[Path],
    out: Path,
    num_shards: int,
    *,
    by: str = "rows",
    seed: int = 0,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shards and the manifest; returns the manifest."""
    import random

    from tqdm import tqdm

    if num_shards < 1:
        raise UserError(Problem("must be at least 1", key="--num-shards"))
    for p in inputs:
        if not p.exists():
            raise UserError(Problem(f"input not found: {p}", key="INPUT"))
        _kind(p)
    if out.exists() and not overwrite:
        raise UserError(
            Problem(f"{out} already exists", key="--out", hint="add --overwrite, or pick another")
        )
    sizes: list[int] = []
    bar = tqdm(desc="reading", unit=" rows", disable=not progress)
    for p in inputs:
        for row, _where in iter_rows(p):
            sizes.append(_row_size(row, tokenizer))
            bar.update(1)
    bar.close()
    if len(sizes) < num_shards:
        raise UserError(
            Problem(
                f"{len(sizes)} rows cannot fill {num_shards} shards",
                key="--num-shards",
                hint=f"use at most {len(sizes)} shards",
            )
        )
    shard_of, totals = assign(sizes, num_shards, seed, by)

    with atomic.folder(out, what="shards", key="--out") as tmp:
        files = [
            (tmp / shard_name(i, num_shards)).open("w", encoding="utf-8") for i in range(num_shards)
        ]
        try:
            i = 0
            bar = tqdm(total=len(sizes), desc="writing", unit=" rows", disable=not progress)
            for p in inputs:
                for row, _where in iter_rows(p):
                    files[shard_of[i]].write(json.dumps(row, ensure_ascii=False, default=str))
                    files[shard_of[i]].write("\n")
                    i += 1
                    bar.update(1)
            bar.close()
        finally:
            for f in files:
                f.close()
        shards = []
        for s in range(num_shards):  # shuffle inside each shard, one shard in memory at a time
            path = tmp / shard_name(s, num_shards)
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            random.Random(f"{seed}/{s}").shuffle(lines)
            path.write_text("".join(lines), encoding="utf-8")
            shards.append(
                {
                    "file": path.name,
                    "rows": len(lines),
                    **({"tokens": totals[s]} if by == "tokens" else {}),
                    "bytes": path.stat().st_size,
                    "xxh3": hash_file(path),
                }
            )
        manifest = {
            "format": "ftl-shards/1",
            "num_shards": num_shards,
            "by": by,
            "seed": seed,
            "rows": len(sizes),
            **({"tokens": sum(totals)} if by == "tokens" else {}),
            "inputs": [
                {"path": str(p), **({"xxh3": hash_file(p)} if p.is_file() else {})} for p in inputs
            ],
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help=".jsonl, .csv, .tsv, .parquet files or a saved Hugging Face dataset",
    )
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest")
    p.add_argument(
        "--by",
        choices=["rows", "tokens"],
        default="rows",
        help="balance rows, or tokens (needs --tokenizer)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder (or pkg: path) for --by tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    tok = None
    if args.by == "tokens":
        if not args.tokenizer:
            raise UserError(
                Problem(
                    "--by tokens counts tokens with a tokenizer",
                    key="--tokenizer",
                    hint="pass --tokenizer MODEL_DIR",
                )
            )
        from transformers import AutoTokenizer

        from launcher.assets import resolve_path

        where = resolve_path(args.tokenizer, base=Path.cwd())
        try:
            tok = AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError) as e:
            raise UserError(Problem(f"cannot load the tokenizer: {e}", key="--tokenizer")) from None
    m = shard(
        args.inputs,
        args.out,
        args.num_shards,
        by=args.by,
        seed=args.seed,
        tokenizer=tok,
        overwrite=args.overwrite,
    )
    sizes = [s.get("tokens", s["rows"]) for s in m["shards"]]
    print(
        f"{m['rows']} rows in {m['num_shards']} shards of {min(sizes)}-{max(sizes)} "
        f"{args.by} -> {args.out} ({MANIFEST})"
    )
    return 0
