"""From a `DataCfg` to tokenized train and eval examples, checked row by row."""

from __future__ import annotations

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


def _label_set(cfg: DataCfg, rows: list[Row], kind: str) -> list[str]:
    """The label (or tag) names by id: data.labels, or every one the training rows use."""
    if cfg.labels is not None:
        return list(cfg.labels)
    found: set[str] = set()
    ctx = FormatContext(
        tokenizer=None,
        max_length=1,
        label_field=cfg.label_field,
        tokens_field=cfg.tokens_field,
        tags_field=cfg.tags_field,
    )
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


def _tokenize(
    rows: list[Row], ctx: FormatContext, fmt: str, cfg: DataCfg, key: str, bad: BadRows
) -> list[dict[str, Any]]:
    fn = FORMATS[fmt]
    out = []
    for row in rows:
        try:
            out.append(fn(row.data, ctx))
        except TooLong:
            ctx.stats["dropped_too_long"] += 1
        except RowError as e:
            if cfg.on_bad_row == "skip":
                bad.add(f"{row.where}: {e}")
                continue
            raise UserError(
                Problem(
                    str(e),
                    file=row.where,
                    key=key,
                    hint="fix the row, or set data.on_bad_row: skip to drop bad rows",
                )
            ) from None
    return out


def load_datasets(
    cfg: DataCfg, tokenizer: Any, *, label_kind: str = "tokens", images: bool = False
) -> Datasets:
    """Read, split and tokenize the recipe's data; every bad row is reported or counted.

    `label_kind` is the task's (see `launcher.train.tasks.Task.label_kind`); token
    classification reads a tag set, classification a label set. `images`: image paths in
    the rows are relative to the data file (for vision chat `tokenizer` is the processor).
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
    train_rows = read_rows(resolve_path(cfg.train, base=Path.cwd()), key="data.train", **read)
    if cfg.eval is not None:
        eval_rows = read_rows(resolve_path(cfg.eval, base=Path.cwd()), key="data.eval", **read)
    elif cfg.eval_split:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_split, cfg.split_seed)
    else:
        eval_rows = []
    if cfg.max_samples is not None:
        train_rows = train_rows[: cfg.max_samples]
    if not train_rows:
        raise UserError(
            Problem(
                f"the training data is empty ({cfg.train}: no rows read, "
                f"{bad.count} bad rows skipped)",
                key="data.train",
                hint="point data.train at a file with examples",
            )
        )
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
    ctx = FormatContext(
        tokenizer=tokenizer,
        max_length=cfg.max_length,
        text_field=cfg.text_field,
        label_field=cfg.label_field,
        messages_field=cfg.messages_field,
        label2id={name: i for i, name in enumerate(labels or [])},
        prompt_template=cfg.prompt_template,
        too_long=cfg.too_long,
        label_kind=label_kind,
        tokens_field=cfg.tokens_field,
        tags_field=cfg.tags_field,
        source_field=cfg.source_field,
        target_field=cfg.target_field,
        source_prefix=cfg.source_prefix,
        max_target_length=cfg.max_target_length,
        image_field=cfg.image_field,
        images_field=cfg.images_field,
    )
    train = _tokenize(train_rows, ctx, cfg.format, cfg, "data.train", bad)
    evals = _tokenize(eval_rows, ctx, cfg.format, cfg, "data.eval", bad)
    if not train:
        raise UserError(
            Problem(
                f"the training data is empty ({cfg.train}: {len(train_rows)} rows read, "
                f"{bad.count} bad rows skipped, {ctx.stats['dropped_too_long']} too long)",
                key="data.train",
                hint="point data.train at a file with examples",
            )
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
