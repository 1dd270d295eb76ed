"""`ftl preprocess RECIPE [-o key=value ...] [--cache-dir DIR] [--force]` (also
`tools/preprocess_dataset.py`).

Formats, tokenizes and masks the recipe's data into the content-hashed cache that
`ftl train` loads (launcher/data/cache.py), and prints its stats. Run it once before a
multi-process or multi-node run: every process then loads the cache, nobody waits.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from launcher.cli.validate import add_recipe_arguments
from launcher.errors import Problem, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache folder (default: data.cache_dir, else $FTL_CACHE_DIR, else "
        "~/.cache/ftl/data); a folder holding manifest.json is that one entry",
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild the entry even when its key matches"
    )


def _histogram(h: dict[str, Any]) -> str:
    """'0-63: 5, 64-127: 12, ..., 448+: 3' (empty bins left out)."""
    edges, counts = h["edges"], h["counts"]
    names = [f"{a}-{b - 1}" for a, b in zip(edges[:-2], edges[1:-1], strict=True)]
    names.append(f"{edges[-2]}+")
    return ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True) if c)


def stats_table(manifest: dict[str, Any]) -> str:
    """The manifest's stats as a two-column Markdown table."""
    s = manifest["stats"]
    rows = [
        ("rows in", s["rows_in"]),
        ("rows out", s["rows_out"]),
        ("dropped: bad rows", s["dropped"]["bad_row"]),
        ("dropped: too long", s["dropped"]["too_long"]),
        ("truncated", s["truncated"]),
    ]
    for split in ("train", "eval"):
        n = s["lengths"][split]
        if not n["examples"]:
            continue
        rows += [
            (f"{split} examples", n["examples"]),
            (f"{split} tokens", n["tokens"]),
            (f"{split} length min / mean / max", f"{n['min']} / {n['mean']} / {n['max']}"),
            (f"{split} length histogram", _histogram(n["histogram"])),
        ]
    if "packing" in s:
        p = s["packing"]
        rows.append(
            (
                "packing (if data.packing)",
                f"{p['packed_examples']} examples in {p['packed_rows']} rows, "
                f"{p['packing_efficiency']:.1%} full",
            )
        )
    if manifest.get("labels"):
        labels = manifest["labels"]
        shown = ", ".join(labels[:10]) + (f" (+{len(labels) - 10})" if len(labels) > 10 else "")
        rows.append(("labels", shown))
    if "build_s" in s:
        per_s = s["rows_out"] / s["build_s"] if s["build_s"] else 0.0
        rows.append(("build time", f"{s['build_s']:.2f} s ({per_s:,.0f} rows/s)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'stat'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from launcher.recipe import load_recipe
    from launcher.train.tasks import TASKS

    recipe = load_recipe(args.recipe, args.override)
    task = TASKS[recipe.task]
    if task.modality == "image" or recipe.data.format in ("image_classification", "vision_chat"):
        raise UserError(
            Problem(
                f"task {recipe.task} / format {recipe.data.format} reads images while training: "
                "there is nothing to preprocess",
                key="data.format",
                hint="ftl preprocess caches tokenized text; image tasks are never cached",
            )
        )
    if not recipe.data.cache:
        print(
            "ftl preprocess: note: data.cache is false, so ftl train will not use this cache "
            "(set data.cache: true)",
            file=sys.stderr,
        )
    from launcher.data.cache import prepare
    from launcher.models.build import load_tokenizer

    start = time.perf_counter()
    print(f"loading the tokenizer of {recipe.model.tokenizer or recipe.model.name_or_path}")
    tokenizer = load_tokenizer(recipe.model, needs_eos=task.needs_eos)
    done = prepare(
        recipe.data.model_copy(update={"cache": True}),
        tokenizer,
        label_kind=task.label_kind,
        cache_dir=args.cache_dir,
        force=args.force,
        log=lambda msg: print(msg, flush=True),
    )
    print(stats_table(done.manifest))
    state = "cache hit" if done.hit else "built"
    print(f"{state}: {done.entry} ({time.perf_counter() - start:.1f} s)")
    return 0
