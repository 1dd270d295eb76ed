"""The training data of one process, behind one interface whatever its mode.

Three modes, one `TrainData`:
- in memory: the whole (cached) dataset on every process; each epoch is a permutation
  drawn from (seed, epoch) only, split across processes by accelerate;
- per-rank shards: a shard folder whose shards each rank reads alone; every rank runs as
  many micro-batches as the fullest one (the others wrap around);
- streaming: rows read, tokenized and packed as training goes, each rank its own share.

`loader(epoch, skip)` gives this process's micro-batches of an epoch from micro-batch
`skip` on, collated and on the device: the position in the data is derived from the
step, so a resumed run replays the same batches without any sampler state.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.data.build import Datasets, collate, load_datasets
from launcher.recipe.schema import Recipe


def epoch_batches(n: int, micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation that depends only on (seed, epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + micro_batch] for i in range(0, n, micro_batch)]


def padding_free(recipe: Recipe, device: str) -> bool:
    """Whether packed micro-batches are one row each (data.padding_free, or where attention
    runs per segment: ftl's CPU backend, flash attention's varlen path). Under attention
    that masks a whole row instead, one row of 4 x 512 tokens costs 4x the attention of
    4 rows of 512, so rows of max_length stay the default there."""
    if recipe.data.padding_free is not None:
        return recipe.data.padding_free
    attn = recipe.model.attn_implementation
    if device == "cpu":
        return recipe.train.fast_dropout and attn in (None, "sdpa")
    return attn is not None and attn.startswith("flash")


@dataclass(frozen=True)
class Collate:
    """Turns a list of examples into one batch of tensors, by what the examples hold:
    conversations with images, images, packed rows, or padded token rows."""

    recipe: Recipe
    label_kind: str
    tokenizer: Any  # tokenizer, image processor or processor

    def __call__(
        self, batch: list[dict[str, Any]], *, train: bool = False, epoch: int = 0
    ) -> dict[str, Any]:
        if "images" in batch[0]:
            from launcher.data.vlm import collate_vision_chat

            return collate_vision_chat(batch, self.tokenizer)
        if "image" in batch[0]:
            from launcher.data.images import collate_images

            aug = self.recipe.data.augment
            return collate_images(
                batch,
                self.tokenizer,
                train=train,
                seed=self.recipe.train.seed,
                epoch=epoch,
                crop_scale=aug.crop_scale,
                hflip=aug.hflip,
            )
        if "position_ids" in batch[0]:
            from launcher.data.pack import collate_packed

            return collate_packed(batch, self.tokenizer.pad_token_id)
        return collate(batch, self.tokenizer.pad_token_id, label_kind=self.label_kind)


@dataclass
class TrainData:
    """This process's training and eval data; build it with `load_train_data`."""

    recipe: Recipe
    acc: Any  # the run's Accelerator
    collate: Collate
    sets: Datasets  # train (empty when streaming), eval, label names, stats
    rows_per_batch: int  # rows per micro-batch: 1 when a padding-free row is a whole one
    n_train: int  # examples an epoch is worth (what the schedule counts)
    part: tuple[int, int] | None = None  # (rank, world) when ranks read their own shards
    rank_batches: int = 0  # per-rank shards: micro-batches of every rank per epoch
    stream: Any = field(default=None, repr=False)  # the PackedStream once streaming started

    @property
    def labels(self) -> list[str] | None:
        return self.sets.labels

    @property
    def train(self) -> list[dict[str, Any]]:
        return self.sets.train

    @property
    def eval(self) -> list[dict[str, Any]]:
        return self.sets.eval

    def loader(self, epoch: int, skip: int) -> Any:
        """This process's micro-batches of `epoch` from its micro-batch `skip` on."""
        import torch
        from torch.utils.data import DataLoader

        r, acc = self.recipe, self.acc
        if r.data.streaming:
            return self._stream(skip)
        seed = r.train.seed
        if self.part is None:
            batches = epoch_batches(len(self.sets.train), self.rows_per_batch, seed, epoch)
        else:
            # this rank's own examples, in an order of its own, wrapped around to the common
            # number of micro-batches; each is listed once per process because accelerate
            # hands process r every world-th batch of the sampler
            rank, world = self.part
            own = epoch_batches(
                len(self.sets.train), self.rows_per_batch, seed + 7919 * rank, epoch
            )
            own = [own[i % len(own)] for i in range(self.rank_batches)]
            batches = [b for b in own for _ in range(world)]
        # A generator of its own: a DataLoader draws its base seed from the global RNG
        # otherwise, which would shift dropout masks after a resume.
        dl = DataLoader(
            self.sets.train,
            batch_sampler=batches[skip * acc.num_processes :],
            collate_fn=functools.partial(self.collate, train=True, epoch=epoch),
            generator=torch.Generator(),
        )
        return acc.prepare_data_loader(dl)

    def eval_loader(self) -> Any:
        """The eval set, longest first (less padding), split across processes; None
        without eval data."""
        import torch
        from torch.utils.data import DataLoader

        if not self.sets.eval:
            return None
        t = self.recipe.train
        longest_first = sorted(self.sets.eval, key=lambda e: -len(e.get("input_ids", ())))
        dl = DataLoader(
            longest_first,
            batch_size=t.eval_batch_size or t.micro_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            generator=torch.Generator(),
        )
        return self.acc.prepare_data_loader(dl)

    @property
    def stats(self) -> dict[str, Any]:
        """What the data held and what was done to it (rows dropped, packing, streaming)."""
        if self.stream is None:
            return dict(self.sets.stats)
        s = self.stream
        extra = {**s.stats, "truncated": s.ctx.stats["truncated"], "packed_row_tokens": s.capacity}
        return {**self.sets.stats, **extra}

    def _stream(self, skip: int) -> Any:
        """This rank's packed stream, collated, on the device; not an accelerate loader
        (each rank streams its own share; accumulation counts micro-batches)."""
        from launcher.data.build import format_context
        from launcher.data.stream import PackedStream

        r, acc = self.recipe, self.acc
        self.stream = PackedStream(
            r.data,
            format_context(r.data, self.collate.tokenizer),
            rank=acc.process_index,
            world=acc.num_processes,
            seed=r.train.seed,
            micro_batch=r.train.micro_batch_size,
            pad_id=self.collate.tokenizer.pad_token_id,
            skip=skip,
            padding_free=padding_free(r, acc.device.type),
        )
        device = acc.device
        return (
            {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in self.stream
        )


def load_train_data(recipe: Recipe, task: Any, tokenizer: Any, acc: Any) -> TrainData:
    """Read, tokenize (from the content-hashed cache when its key matches) and pack this
    process's data. On a cache miss the local main process tokenizes and the others wait
    on the manifest, outside any collective, so a long tokenization never trips the
    process group's timeout (a rank that reads its own shards builds its own entry)."""
    r, t = recipe, recipe.train
    collate_fn = Collate(r, task.label_kind, tokenizer)
    if r.data.streaming:  # the training rows stream in `loader`; evals come from data.eval
        return _streamed(r, task, tokenizer, acc, collate_fn)
    part = own_shards(r, task, acc)
    from launcher.data.cache import load_or_build

    sets = load_or_build(
        r.data,
        tokenizer,
        label_kind=task.label_kind,
        images=task.modality in ("image", "vision_language"),
        is_main=acc.is_local_main_process or part is not None,
        timeout_s=r.distributed.timeout_minutes * 60,
        log=acc.print,
        part=part,
    )
    rows = t.micro_batch_size
    if r.data.packing:
        from launcher.data.pack import pack

        flat = padding_free(r, acc.device.type)
        if flat:
            rows = 1
        sets.train, packing = pack(sets.train, r.data.max_length, t.micro_batch_size if flat else 1)
        sets.stats.update(packing, padding_free=flat)
        acc.print(
            f"packing: {packing['packed_examples']} examples in {packing['packed_rows']} "
            f"rows of {packing['packed_row_tokens']} tokens "
            f"({packing['packing_efficiency']:.1%} full"
            + (", padding-free: one row per micro-batch)" if flat else ")")
        )
    # as many micro-batches as examples would give (a padding-free row is a whole one)
    data = TrainData(r, acc, collate_fn, sets, rows, len(sets.train) * t.micro_batch_size // rows)
    if part is not None:  # every rank runs as many micro-batches as the fullest
        from accelerate.utils import gather_object

        examples = gather_object([len(sets.train)])
        data.part, data.rank_batches = part, max(-(-n // rows) for n in examples)
        sets.stats["examples_by_rank"] = examples
        sets.stats["shards_by_rank"] = gather_object([_shard_files(r, part)])
        data.n_train = data.rank_batches * t.micro_batch_size * acc.num_processes
        acc.print(
            f"shards per rank: examples {examples}, {data.rank_batches} "
            "micro-batches per process per epoch (the others wrap around)"
        )
    return data


def counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, examples) of a micro-batch; packed batches bring their own counts,
    which leave the batch here (the model must not see them)."""
    if "_tokens" in batch:
        return int(batch.pop("_tokens")), int(batch.pop("_samples"))
    if "input_ids" not in batch:  # image classification
        return 0, batch["pixel_values"].shape[0]
    return int(batch["attention_mask"].sum()), batch["input_ids"].shape[0]


def train_examples(data: TrainData) -> int:
    """Examples in the training set, over all ranks (what a resumed run must match)."""
    by_rank = data.sets.stats.get("examples_by_rank")
    return sum(by_rank) if data.part is not None else len(data.sets.train)


def own_shards(recipe: Recipe, task: Any, acc: Any) -> tuple[int, int] | None:
    """(rank, world) when each rank reads only its own shards of data.train."""
    from launcher.data.read import reads_own_shards

    world = acc.num_processes
    if reads_own_shards(recipe.data, world, task.uses_labels):
        return (acc.process_index, world)
    return None


def _shard_files(recipe: Recipe, part: tuple[int, int]) -> list[str]:
    from launcher.assets import resolve_path
    from launcher.data.read import own_shards as shards_of

    folder = resolve_path(recipe.data.train, base=Path.cwd())
    shards = json.loads((folder / "manifest.json").read_text())["shards"]
    return [s["file"] for s in shards_of(shards, part, "data.train")]


def _streamed(
    recipe: Recipe, task: Any, tokenizer: Any, acc: Any, collate_fn: Collate
) -> TrainData:
    """Streaming: the eval file tokenized up front, the training data streams; one endless
    pass of max_steps optimizer steps of micro-batches."""
    from launcher.recipe.resolve import accumulation

    d, t = recipe.data, recipe.train
    stats: dict[str, Any] = {"streaming": True, "train_examples": None}
    held: list[dict[str, Any]] = []
    if d.eval is not None:
        cfg = d.model_copy(update={"train": d.eval, "eval": None, "streaming": False})
        held = load_datasets(cfg, tokenizer, label_kind=task.label_kind).train
        stats["eval_examples"] = len(held)
    sets = Datasets(train=[], eval=held, labels=None, stats=stats)
    world = acc.num_processes
    n_train = t.max_steps * accumulation(t, world) * t.micro_batch_size * world
    return TrainData(recipe, acc, collate_fn, sets, t.micro_batch_size, n_train)
