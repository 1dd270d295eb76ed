"""Streaming for pretraining-size text (`data.streaming: true`, causal LM).

Nothing is read ahead: rows are read one line at a time, formatted and tokenized as they
come, and packed into rows of `max_length` (next-fit: an example that does not fit the
current row closes it; padding-free, as `data.padding_free` decides for the recipe, one
row of micro_batch x max_length is a micro-batch). Packed rows carry restarting position ids, as in `pack.py`, so no
token attends across examples. Memory holds one shuffle buffer of examples, whatever the
size of the data.

- **Ranks:** with a shard folder each rank reads its own shards (shard i to rank i mod
  world); with one file, rank r parses lines r+1, r+1+world, ... Each rank streams its own
  share, so there is no epoch length to agree on: `train.max_steps` sets the run.
- **Order:** examples pass through a shuffle buffer seeded by (seed, rank, pass). When the
  data ends, the next pass starts (`passes` in the summary).
- **Mixtures** (`data.mix`): each next example comes from source i with probability
  weight_i x rows_i / sum(weight x rows), its share in a non-streamed epoch of the same
  mixture; each source restarts on its own when it ends.
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
    """(file, line filter) pairs this rank reads of data.train."""
    return _files(cfg.train, "data.train", rank, world)[0]


def _files(value: str, key: str, rank: int, world: int) -> tuple[list[tuple[Path, Any]], int]:
    """(file, line filter) pairs this rank reads of one source, and how many rows they hold
    (a shard folder's manifest says; a JSONL file's lines are counted, not parsed)."""
    path = existing(resolve_path(value, base=Path.cwd()), key)
    if is_shard_folder(path):
        from launcher.data.shards import verify

        part = (rank, world) if world > 1 else None
        manifest = verify(path, key, select=lambda s: own_shards(s, part, key))
        mine = own_shards(manifest["shards"], part, key)
        return [(path / s["file"], None) for s in mine], sum(s["rows"] for s in mine)
    if path.suffix.lower() != ".jsonl":
        raise UserError(
            Problem(
                f"streaming reads JSONL files or shard folders, not {path.name}",
                key=key,
                hint="convert it with `ftl shard INPUT --num-shards N --out DIR`",
            )
        )
    keep = None if world == 1 else (lambda n: (n - 1) % world == rank)
    return [(path, keep)], -1


def _count_lines(path: Path, rank: int, world: int) -> int:
    """Non-blank lines of `path` that rank `rank` of `world` reads (bounded memory)."""
    n = mine = 0
    with path.open("rb") as f:
        for line in f:
            n += 1
            if line.strip() and (n - 1) % world == rank:
                mine += 1
    return mine


def _format(
    row: Any, fn: Any, ctx: FormatContext, cfg: DataCfg, key: str, bad: BadRows, stats: dict
) -> dict[str, Any] | None:
    """The row's example; None when it is dropped (too long) or skipped (bad)."""
    try:
        return fn(row.data, ctx)
    except TooLong:
        stats["dropped_too_long"] += 1
        return None
    except RowError as e:
        if cfg.on_bad_row == "skip":
            bad.add(f"{row.where}: {e}")
            stats["bad_rows_skipped"] = bad.count
            return None
        raise UserError(
            Problem(
                str(e),
                file=row.where,
                key=key,
                hint="fix the row, or set data.on_bad_row: skip to drop bad rows",
            )
        ) from None


def _empty(key: str, rank: int, world: int, bad: BadRows, stats: dict) -> UserError:
    return UserError(
        Problem(
            f"the training data is empty on process {rank} of {world} "
            f"({bad.count} bad rows skipped, {stats['dropped_too_long']} too long)",
            key=key,
            hint=f"point {key} at more data (or fewer processes)",
        )
    )


def examples(
    cfg: DataCfg, ctx: FormatContext, rank: int, world: int, seed: int, stats: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Formatted examples, pass after pass, through a seeded shuffle buffer."""
    if cfg.mix:
        yield from mixed_examples(cfg, ctx, rank, world, seed, stats)
        return
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
                ex = _format(row, fn, ctx, cfg, "data.train", bad, stats)
                if ex is None:
                    continue
                produced += 1
                buffer.append(ex)
                if len(buffer) >= cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        if produced == 0:
            raise _empty("data.train", rank, world, bad, stats)
        passes += 1
        stats["passes"] = passes


def mixed_examples(
    cfg: DataCfg, ctx: FormatContext, rank: int, world: int, seed: int, stats: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """data.train and the data.mix sources, interleaved: each next example comes from
    source i with probability weight_i x rows_i / sum(weight x rows), the share that
    source has in a non-streamed epoch of the same mixture. Each source starts its next
    pass when it ends (`mixture[i].passes`); one seeded shuffle buffer follows."""
    fn = FORMATS[cfg.format]
    specs = [(cfg.train, cfg.train_weight, "data.train")]
    specs += [(m.path, m.weight, f"data.mix[{i}].path") for i, m in enumerate(cfg.mix)]
    files, shares, report = [], [], []
    for value, weight, key in specs:
        mine, rows = _files(value, key, rank, world)
        if rows < 0:
            rows = _count_lines(mine[0][0], rank, world)
        if rows == 0:
            raise UserError(
                Problem(
                    f"{value} holds no rows for process {rank} of {world}",
                    key=key,
                    hint="point it at more data (or use fewer processes)",
                )
            )
        files.append((mine, key))
        shares.append(weight * rows)
        report.append({"path": value, "weight": weight, "rows": rows, "passes": 0})
    total = sum(shares)
    for r, share in zip(report, shares, strict=True):
        r["share"] = round(share / total, 4)
    stats["mixture"] = report
    bad = BadRows()

    def forever(i: int) -> Iterator[dict[str, Any]]:
        mine, key = files[i]
        while True:
            produced = 0
            for path, keep in mine:
                for row in iter_jsonl(path, key, cfg.on_bad_row, bad, keep):
                    ex = _format(row, fn, ctx, cfg, key, bad, stats)
                    if ex is not None:
                        produced += 1
                        yield ex
            if produced == 0:
                raise _empty(key, rank, world, bad, stats)
            report[i]["passes"] += 1

    streams = [forever(i) for i in range(len(files))]
    pick = random.Random(seed * 1_000_003 + 7919 * rank + 104_729)
    rng = random.Random(seed * 1_000_003 + 7919 * rank)
    buffer: list[dict[str, Any]] = []
    while True:
        i = pick.choices(range(len(streams)), weights=shares)[0]
        buffer.append(next(streams[i]))
        if len(buffer) >= cfg.shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))


def packed_rows(
    cfg: DataCfg,
    ctx: FormatContext,
    rank: int,
    world: int,
    seed: int,
    stats: dict[str, int],
    capacity: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of at most `capacity` tokens (max_length; padding-free: a micro-batch's worth),
    examples whole, position ids restarting."""
    capacity = capacity or cfg.max_length
    row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
    for ex in examples(cfg, ctx, rank, world, seed, stats):
        n = len(ex["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > capacity:
            yield row
            row = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE, *ex["labels"][1:]]
        row["position_ids"] += range(n)
        row["n_examples"] += 1


class PackedStream:
    """An iterable of collated micro-batches of this rank's stream, skipping the first
    `skip` (a resume). Iterating it twice gives the same batches. Padding-free, each
    micro-batch is one row of up to micro_batch x max_length tokens."""

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
        padding_free: bool = False,
    ):
        self.cfg, self.ctx = cfg, ctx
        self.rank, self.world, self.seed = rank, world, seed
        self.micro_batch, self.pad_id, self.skip = micro_batch, pad_id, skip
        self.capacity = cfg.max_length * (micro_batch if padding_free else 1)
        self.rows_per_batch = 1 if padding_free else micro_batch
        self.stats: dict[str, int] = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from launcher.data.pack import collate_packed

        rows = packed_rows(
            self.cfg, self.ctx, self.rank, self.world, self.seed, self.stats, self.capacity
        )
        done = 0
        while True:
            batch = [next(rows) for _ in range(self.rows_per_batch)]
            done += 1
            if done > self.skip:
                yield collate_packed(batch, self.pad_id)
