"""Streaming for pretraining-size text (`data.streaming: true`, causal LM).

Nothing is read ahead: rows are read one line at a time, formatted and tokenized as they
come, and packed into rows of `max_length` (next-fit: an example that does not fit the
current row closes it). Packed rows carry restarting position ids, as in `pack.py`, so no
token attends across examples. Memory holds one shuffle buffer of examples, whatever the
size of the data.

- **Ranks:** with a shard folder each rank reads its own shards (shard i to rank i mod
  world); with one file, rank r parses lines r+1, r+1+world, ... Each rank streams its own
  share, so there is no epoch length to agree on: `train.max_steps` sets the run.
- **Order:** examples pass through a shuffle buffer seeded by (seed, rank, pass). When the
  data ends, the next pass starts (`passes` in the summary).
- **Resume:** the stream is deterministic; a resumed run regenerates it and skips the
  micro-batches already trained on (re-reading, not re-training, that part).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.assets import resolve_path
from launcher.data.formats import FORMATS, FormatContext, RowError, TooLong
from launcher.data.pack import IGNORE
from launcher.data.read import BadRows, existing, is_shard_folder, iter_jsonl, own_shards
from launcher.errors import Problem, UserError
from launcher.recipe.schema import DataCfg


def _sources(cfg: DataCfg, rank: int, world: int) -> list[tuple[Path, Any]]:
    """(file, line filter) pairs this rank reads."""
    path = existing(resolve_path(cfg.train, base=Path.cwd()), "data.train")
    if is_shard_folder(path):
        from launcher.tools.shard import verify

        part = (rank, world) if world > 1 else None
        manifest = verify(path, "data.train", select=lambda s: own_shards(s, part, "data.train"))
        return [
            (path / s["file"], None) for s in own_shards(manifest["shards"], part, "data.train")
        ]
    if path.suffix.lower() != ".jsonl":
        raise UserError(
            Problem(
                f"streaming reads JSONL files or shard folders, not {path.name}",
                key="data.train",
                hint="convert it with `ftl shard INPUT --num-shards N --out DIR`",
            )
        )
    keep = None if world == 1 else (lambda n: (n - 1) % world == rank)
    return [(path, keep)]


def examples(
    cfg: DataCfg, ctx: FormatContext, rank: int, world: int, seed: int, stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Formatted examples, pass after pass, through a seeded shuffle buffer."""
    fn = FORMATS[cfg.format]
    sources = _sources(cfg, rank, world)
    bad = BadRows()
    passes = 0
    while True:
        rng = random.Random(seed * 1_000_003 + 7919 * rank + passes)
        buffer: list[dict[str, Any]] = []
        produced = 0
        for path, keep in sources:
            for row in iter_jsonl(path, "data.train", cfg.on_bad_row, bad, keep):
                try:
                    ex = fn(row.data, ctx)
                except TooLong:
                    stats["dropped_too_long"] += 1
                    continue
                except RowError as e:
                    if cfg.on_bad_row == "skip":
                        bad.add(f"{row.where}: {e}")
                        stats["bad_rows_skipped"] = bad.count
                        continue
                    raise UserError(
                        Problem(
                            str(e),
                            file=row.where,
                            key="data.train",
                            hint="fix the row, or set data.on_bad_row: skip to drop bad rows",
                        )
                    ) from None
                produced += 1
                buffer.append(ex)
                if len(buffer) >= cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        if produced == 0:
            raise UserError(
                Problem(
                    f"the training data is empty on process {rank} of {world} "
                    f"({bad.count} bad rows skipped, {stats['dropped_too_long']} too long)",
                    key="data.train",
                    hint="point data.train at more data (or fewer processes)",
                )
            )
        passes += 1
        stats["passes"] = passes


def packed_rows(
    cfg: DataCfg, ctx: FormatContext, rank: int, world: int, seed: int, stats: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Rows of at most max_length tokens, examples whole, position ids restarting."""
    row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
    for ex in examples(cfg, ctx, rank, world, seed, stats):
        n = len(ex["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > cfg.max_length:
            yield row
            row = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE, *ex["labels"][1:]]
        row["position_ids"] += range(n)
        row["n_examples"] += 1


class PackedStream:
    """An iterable of collated micro-batches of this rank's stream, skipping the first
    `skip` (a resume). Iterating it twice gives the same batches."""

    def __init__(
        self,
        cfg: DataCfg,
        ctx: FormatContext,
        *,
        rank: int,
        world: int,
        seed: int,
        micro_batch: int,
        pad_id: int,
        skip: int = 0,
    ):
        self.cfg, self.ctx = cfg, ctx
        self.rank, self.world, self.seed = rank, world, seed
        self.micro_batch, self.pad_id, self.skip = micro_batch, pad_id, skip
        self.stats: dict[str, int] = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from launcher.data.pack import collate_packed

        rows = packed_rows(self.cfg, self.ctx, self.rank, self.world, self.seed, self.stats)
        done = 0
        while True:
            batch = [next(rows) for _ in range(self.micro_batch)]
            done += 1
            if done > self.skip:
                yield collate_packed(batch, self.pad_id)
