"""The shard-folder format: `manifest.json` beside the shards, each with its size and
xxh3 checksum. `ftl shard` (launcher/tools/shard.py) writes it; the data layer reads and
checks it (per-rank shards, streaming, the cache key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError

MANIFEST = "manifest.json"


def hash_file(path: Path) -> str:
    """xxh3-64 of a file's bytes, read in 1 MiB blocks (the manifest's checksum)."""
    import xxhash

    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path, key: str = "data.train", select: Any = None) -> dict[str, Any]:
    """Read a shard folder's manifest and check every shard's size and checksum (or those
    `select(shards)` returns: a rank checks only the shards it reads)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(Problem(f"no {MANIFEST} in {folder}", key=key))
    manifest = json.loads(path.read_text())
    for s in select(manifest["shards"]) if select else manifest["shards"]:
        f = folder / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"] or hash_file(f) != s["xxh3"]:
            raise UserError(
                Problem(
                    f"shard {f} is missing or changed since {MANIFEST} was written",
                    file=str(f),
                    key=key,
                    hint="re-run ftl shard",
                )
            )
    return manifest
