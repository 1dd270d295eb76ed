"""From a `DataCfg` to tokenized train and eval examples, checked row by row."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.assets import resolve_path
from launcher.data.formats import (
    FORMATS,
    FormatContext,
    RowError,
    TooLong,
    label_of,
    labels_of,
    tags_of,
)
from launcher.data.read import BadRows, Row, read_rows
from launcher.errors import Problem, UserError
from launcher.recipe.schema import DataCfg


@dataclass
class Datasets:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None  # label names by class id, for classification tasks
    stats: dict[str, Any] = field(default_factory=dict)


def split_rows(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic hold-out: the same rows, seed and fraction give the same split anywhere."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(rows) * fraction)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)])


def mix_rows(
    sources: list[list[Any]], weights: list[float], seed: int
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Weighted mixture: each source contributes round(weight x rows) rows per epoch, whole
    copies first and the fraction as a seeded sample without replacement, then the lot is
    interleaved by one seeded shuffle (the loop shuffles each epoch again). Returns the rows
    and, per source, its rows and how many the mixture holds."""
    rng = random.Random(seed)
    out: list[Any] = []
    report = []
    for rows, weight in zip(sources, weights, strict=True):
        whole, frac = int(weight), weight - int(weight)
        picked = rows * whole
        extra = round(frac * len(rows))
        if extra:
            picked = picked + [rows[i] for i in sorted(rng.sample(range(len(rows)), extra))]
        out += picked
        report.append({"rows": len(rows), "weight": weight, "used": len(picked)})
    rng.shuffle(out)
    return out, report


def _empty(cfg: DataCfg, why: str) -> UserError:
    return UserError(
        Problem(
            f"the training data is empty ({cfg.train}: {why})",
            key="data.train",
            hint="point data.train at a file with examples",
        )
    )


def _label_set(cfg: DataCfg, rows: list[Row], kind: str) -> list[str]:
    """The label (or tag) names by id: data.labels, or every one the training rows use."""
    if cfg.labels is not None:
        return list(cfg.labels)
    found: set[str] = set()
    ctx = format_context(cfg, None)
    for r in rows:
        try:
            if kind == "tags":
                found.update(tags_of(r.data, ctx)[1])
            elif kind == "multi_hot":
                found.update(labels_of(r.data, cfg.label_field))
            else:
                found.add(label_of(r.data, cfg.label_field))
        except RowError:
            continue  # reported (or skipped) with its line when the row is formatted
    if kind == "tags" and "O" in found:
        return ["O", *sorted(found - {"O"})]  # "outside" first, as NER models print it
    return sorted(found)


CHUNK_ROWS = 512  # rows per task when several workers format the data

# what a worker formats with: set before the workers fork, so the tokenizer or processor
# is inherited, never pickled
_WORKER: dict[str, Any] = {}


def _format_rows(rows: list[Row]) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """Each row's outcome, in order: ("ok", example), ("long", None) or ("bad", message),
    and the stats (truncations...) the format counted on the way."""
    ctx: FormatContext = _WORKER["ctx"]
    fn = FORMATS[_WORKER["fmt"]]
    before = dict(ctx.stats)
    out: list[tuple[str, Any]] = []
    for row in rows:
        try:
            out.append(("ok", fn(row.data, ctx)))
        except TooLong:
            out.append(("long", None))
        except RowError as e:
            out.append(("bad", str(e)))
    return out, {k: v - before.get(k, 0) for k, v in ctx.stats.items()}


def _outcomes(rows: list[Row], ctx: FormatContext, fmt: str, workers: int) -> list[tuple[str, Any]]:
    """Format every row, in this process or in `workers` forked ones (the same outcomes in
    the same order either way; the stats are summed into `ctx.stats`)."""
    _WORKER.update(ctx=ctx, fmt=fmt)
    try:
        if workers <= 1 or len(rows) <= CHUNK_ROWS:
            return _format_rows(rows)[0]  # counted into ctx.stats in place
        import multiprocessing as mp

        chunks = [rows[i : i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no threads over fork
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_format_rows, chunks, chunksize=1)
        for _, counted in results:
            for k, v in counted.items():
                ctx.stats[k] = ctx.stats.get(k, 0) + v
        return [o for part, _ in results for o in part]
    finally:
        _WORKER.clear()


def _tokenize(
    rows: list[Row],
    ctx: FormatContext,
    fmt: str,
    cfg: DataCfg,
    key: str,
    bad: BadRows,
) -> list[dict[str, Any]]:
    out = []
    for row, (kind, value) in zip(rows, _outcomes(rows, ctx, fmt, cfg.num_workers), strict=True):
        if kind == "ok":
            out.append(value)
        elif kind == "long":
            ctx.stats["dropped_too_long"] += 1
        elif cfg.on_bad_row == "skip":
            bad.add(f"{row.where}: {value}")
        else:
            raise UserError(
                Problem(
                    value,
                    file=row.where,
                    key=key,
                    hint="fix the row, or set data.on_bad_row: skip to drop bad rows",
                )
            )
    return out


def format_context(
    cfg: DataCfg, tokenizer: Any, labels: list[str] | None = None, label_kind: str = "tokens"
) -> FormatContext:
    """What the formats read: the tokenizer (or processor), the limits and field names."""
    return FormatContext(
        tokenizer=tokenizer,
        cfg=cfg,
        label2id={name: i for i, name in enumerate(labels or [])},
        label_kind=label_kind,
    )


def load_datasets(
    cfg: DataCfg,
    tokenizer: Any,
    *,
    label_kind: str = "tokens",
    images: bool = False,
    part: tuple[int, int] | None = None,
) -> Datasets:
    """Read, split and tokenize the recipe's data; every bad row is reported or counted.

    `label_kind` is the task's (see `launcher.train.tasks.Task.label_kind`); token
    classification reads a tag set, classification a label set. `images`: image paths in
    the rows are relative to the data file (for vision chat `tokenizer` is the processor).
    `part` (rank, world): read only this rank's shards of the data.train shard folder.
    """
    bad = BadRows()
    read = dict(
        on_bad_row=cfg.on_bad_row,
        bad=bad,
        text_field=cfg.text_field,
        label_field=cfg.label_field,
        tokens_field=cfg.tokens_field,
        tags_field=cfg.tags_field,
        image_field=cfg.image_field if images and cfg.format != "vision_chat" else None,
        chat_images=(cfg.images_field, cfg.messages_field)
        if images and cfg.format == "vision_chat"
        else None,
    )
    sources = [(cfg.train, cfg.train_weight, "data.train")] + [
        (m.path, m.weight, f"data.mix[{i}].path") for i, m in enumerate(cfg.mix)
    ]
    per_source = [
        read_rows(
            resolve_path(path, base=Path.cwd()), key=key, part=part if i == 0 else None, **read
        )
        for i, (path, _, key) in enumerate(sources)
    ]
    if cfg.eval is not None:
        eval_rows = read_rows(resolve_path(cfg.eval, base=Path.cwd()), key="data.eval", **read)
    elif cfg.eval_split:  # each source holds out its own fraction, before any weighting
        split = [split_rows(rows, cfg.eval_split, cfg.split_seed) for rows in per_source]
        per_source = [kept for kept, _ in split]
        eval_rows = [r for _, held in split for r in held]
    else:
        eval_rows = []
    mixture = None
    if cfg.mix:
        train_rows, mixture = mix_rows(per_source, [w for _, w, _ in sources], cfg.split_seed)
        for m, (path, _, _) in zip(mixture, sources, strict=True):
            m["path"] = path
    else:
        train_rows = per_source[0]
    if cfg.max_samples is not None:
        train_rows = train_rows[: cfg.max_samples]
    if not train_rows:
        raise _empty(cfg, f"no rows read, {bad.count} bad rows skipped")
    set_kind = "tags" if cfg.format == "token_tags" else label_kind
    labels = (
        _label_set(cfg, train_rows, set_kind)
        if set_kind in ("class", "multi_hot", "tags")
        else None
    )
    if labels is not None and len(labels) < 2:
        field_name = cfg.tags_field if set_kind == "tags" else cfg.label_field
        raise UserError(
            Problem(
                f"classification needs at least 2 labels, found {labels}",
                key="data.labels",
                hint=f"check data.{'tags' if set_kind == 'tags' else 'label'}_field "
                f"('{field_name}')",
            )
        )
    ctx = format_context(cfg, tokenizer, labels, label_kind)
    train = _tokenize(train_rows, ctx, cfg.format, cfg, "data.train", bad)
    evals = _tokenize(eval_rows, ctx, cfg.format, cfg, "data.eval", bad)
    if not train:
        raise _empty(
            cfg,
            f"{len(train_rows)} rows read, {bad.count} bad rows skipped, "
            f"{ctx.stats['dropped_too_long']} too long",
        )
    if (cfg.eval is not None or cfg.eval_split) and not evals:
        raise UserError(
            Problem(
                "the eval data is empty",
                key="data.eval" if cfg.eval else "data.eval_split",
                hint="point data.eval at a file with examples, or raise data.eval_split",
            )
        )
    stats = {
        "train_examples": len(train),
        "eval_examples": len(evals),
        "bad_rows_skipped": bad.count,
        "bad_row_examples": bad.examples or [],
        "truncated": ctx.stats["truncated"],
        "dropped_too_long": ctx.stats["dropped_too_long"],
    }
    if mixture is not None:
        stats["mixture"] = mixture
    if "dropped_images_too_long" in ctx.stats or cfg.format == "vision_chat":
        stats["dropped_images_too_long"] = ctx.stats.get("dropped_images_too_long", 0)
    return Datasets(train=train, eval=evals, labels=labels, stats=stats)


def collate(
    examples: list[dict[str, Any]], pad_id: int, pad_to_multiple: int = 1, *, label_kind: str = ""
) -> dict[str, Any]:
    """Right-pad a micro-batch. Token labels (LM, tags, seq2seq targets) pad with -100 to
    their own longest row; class ids, multi-hot rows and scores stack as they are."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    longest = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
    first = examples[0]["labels"]
    if label_kind == "multi_hot":
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.float)
    elif label_kind == "score" or isinstance(first, float):
        labels = torch.tensor([float(e["labels"]) for e in examples], dtype=torch.float)
    elif isinstance(first, list):
        width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    else:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
