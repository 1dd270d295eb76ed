"""Sample packing for causal LMs: several examples share one row, never one attention.

Examples are placed into bins of `max_length` tokens by best-fit decreasing (each example,
longest first, goes into the fullest bin it still fits). A packed row carries
`position_ids` that restart at 0 for every example. transformers reads restarting
position ids (with no attention mask) as packed sequences:
- SDPA and eager attention get a block-diagonal causal mask;
- flash attention gets the varlen path (`cu_seqlens`).
So no token attends across examples. That detection needs `use_cache=False`, which the
packed batch carries.

The first label of every example is -100. Unpacked, the first token is never a target
(nothing comes before it), so a packed row's loss is exactly the token-weighted loss of
its examples computed one by one.
"""

from __future__ import annotations

import bisect
from typing import Any

IGNORE = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `capacity` (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))  # the tightest bin with room >= n
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack(
    examples: list[dict[str, Any]], max_length: int, rows_per_bin: int = 1
) -> tuple[list[dict[str, Any]], dict]:
    """Packed rows (input_ids, labels, position_ids, n_examples) and packing stats.

    `rows_per_bin` > 1 packs padding-free micro-batches: bins of rows_per_bin x max_length
    tokens, each one row that is a whole micro-batch (every example still at most
    max_length, so positions stay within the model's). Small examples in a bigger bin
    leave almost no room unused, and the row carries no padding at all."""
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = max_length * rows_per_bin
    rows = []
    for members in best_fit_decreasing(lengths, capacity):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):  # the original order inside a row
            e = examples[i]
            ids += e["input_ids"]
            labels += [IGNORE, *e["labels"][1:]]
            positions += range(len(e["input_ids"]))
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": positions,
                "n_examples": len(members),
            }
        )
    tokens = sum(lengths)
    stats = {
        "packed_rows": len(rows),
        "packed_examples": len(examples),
        "packing_efficiency": round(tokens / (len(rows) * capacity), 4) if rows else 0.0,
        "packed_row_tokens": capacity,
    }
    return rows, stats


def collate_packed(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad packed rows to the longest. No attention mask: the restarting position ids
    are the mask. Padding forms a segment of its own (positions restart there too), so it
    attends to nothing real and carries no loss. `_tokens` and `_samples` are counts for the
    throughput log, removed before the forward."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        positions[i, :n] = torch.tensor(r["position_ids"])
        positions[i, n:] = torch.arange(longest - n)
    # segment boundaries over the flattened batch, as flash attention's varlen path takes
    # them (and ftl's CPU attention backend, which then skips the block-diagonal mask)
    flat = positions.flatten()
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int(lengths.max()),
        "max_length_k": int(lengths.max()),
        # transformers reads restarting positions as packed sequences only without a KV
        # cache; with one (the default in eval mode) segments would attend to each other
        "use_cache": False,
        "_tokens": sum(len(r["input_ids"]) for r in rows),
        "_samples": sum(r["n_examples"] for r in rows),
    }
