"""A content-hashed cache of tokenized examples: what `ftl preprocess` writes, `ftl train` loads.

An entry is a folder `<cache root>/<key>/` holding Parquet shards of the examples that
`load_datasets` returns (train and eval, unpacked) and `manifest.json` (the key, what it
was computed from, checksums of the shards, counts and stats). The key is a sha256 over:

- the content of every data file (data.train, data.mix, data.eval; a folder: every file
  in it);
- the tokenizer's saved files (vocabulary, merges, added and special tokens, settings);
- the chat template text;
- `cache_key.FORMAT_VERSION` (bumped whenever the formatting code changes what it produces);
- the whole data section except `cache`, `cache_dir` and `packing`, and the task's
  label kind;
- the transformers and tokenizers versions.

Packing is not in the key: the cache holds the unpacked examples, and the loop packs them
at start (deterministic, and cheap next to tokenizing), so turning packing on or off reuses
the entry. Image tasks are never cached: image files are read while training and are not
hashed.

The entry is written into a temporary folder and published atomically
(`launcher/atomic.py`), and the manifest is its last file: a folder with a manifest is complete. In a multi-process run the main
process builds a missing entry; the others poll the filesystem for its manifest (no
collective, so no collective timeout) and stop with the main process's error if it
failed (it leaves a failure marker next to the entry).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.assets import resolve_path
from launcher.data.build import Datasets, load_datasets
from launcher.data.cache_key import components, digest, explain
from launcher.data.shards import hash_file
from launcher.errors import Problem, UserError
from launcher.recipe.schema import DataCfg

ENTRY_FORMAT = "ftl-data-cache/1"
MANIFEST = "manifest.json"
SHARD_ROWS = 20_000  # examples per Parquet shard
IMAGE_FORMATS = ("image_classification", "vision_chat")
FAILED_FRESH_S = 600.0  # a failure marker older than this (when a wait starts) is stale


@dataclass
class Prepared:
    """What `prepare` did: the datasets, and where they live in the cache."""

    datasets: Datasets
    entry: Path | None  # None: not cached (data.cache false, or an image task)
    hit: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    rebuilt_because: list[str] = field(default_factory=list)


def cache_root(cfg: DataCfg, cache_dir: str | None = None) -> Path:
    """The cache folder: `cache_dir`, else data.cache_dir, else $FTL_CACHE_DIR, else
    ~/.cache/ftl/data."""
    chosen = cache_dir or cfg.cache_dir or os.environ.get("FTL_CACHE_DIR")
    if chosen:
        return resolve_path(chosen, base=Path.cwd())
    return Path.home() / ".cache" / "ftl" / "data"


def _read_manifest(entry: Path) -> dict[str, Any]:
    path = entry / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != ENTRY_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {ENTRY_FORMAT!r}")
        return manifest
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(
            Problem(
                f"unreadable data cache manifest: {e}",
                file=str(path),
                key="data.cache_dir",
                hint=f"delete {entry} and rerun `ftl preprocess RECIPE`",
            )
        ) from None


def _plain(value: Any) -> bool:
    """Values Parquet stores and gives back unchanged: numbers and (nested) lists of them."""
    if isinstance(value, bool):
        return False  # would come back as bool, but formats never produce one: refuse
    if isinstance(value, (int, float)):
        return True  # not str: a path (an image...) names a file the key does not hash
    if isinstance(value, list):
        return all(_plain(v) for v in value[:8])
    return False


def cacheable(cfg: DataCfg, images: bool, examples: list[dict[str, Any]] | None = None) -> bool:
    """Image tasks bypass the cache: their files are read while training, not hashed."""
    if images or cfg.format in IMAGE_FORMATS:
        return False
    return examples is None or all(_plain(v) for e in examples[:64] for v in e.values())


def _lengths(examples: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """Token counts of one split: total, min/mean/max, and a histogram of 8 equal bins up to
    max_length (the last bin also holds anything longer)."""
    n = [len(e["input_ids"]) for e in examples]
    if not n:
        return {"examples": 0, "tokens": 0}
    width = -(-max_length // 8)
    edges = [i * width for i in range(9)]
    counts = [0] * 8
    for x in n:
        counts[min(x // width, 7)] += 1
    return {
        "examples": len(n),
        "tokens": sum(n),
        "min": min(n),
        "mean": round(sum(n) / len(n), 2),
        "max": max(n),
        "histogram": {"edges": edges, "counts": counts},
    }


def build_stats(cfg: DataCfg, data: Datasets, *, label_kind: str) -> dict[str, Any]:
    """The manifest's stats: rows in and out, dropped rows by reason, lengths, packing."""
    s = data.stats
    out = len(data.train) + len(data.eval)
    stats: dict[str, Any] = {
        "rows_in": out + s["bad_rows_skipped"] + s["dropped_too_long"],
        "rows_out": out,
        "dropped": {"bad_row": s["bad_rows_skipped"], "too_long": s["dropped_too_long"]},
        "truncated": s["truncated"],
        "lengths": {
            "train": _lengths(data.train, cfg.max_length),
            "eval": _lengths(data.eval, cfg.max_length),
        },
    }
    if label_kind == "tokens":  # causal LM: what packing into rows of max_length gives
        from launcher.data.pack import pack

        stats["packing"] = pack(data.train, cfg.max_length)[1]
    return stats


def _write_entry(
    entry: Path, comps: dict[str, Any], key: str, data: Datasets, stats: dict[str, Any]
) -> dict[str, Any]:
    """Write the shards and the manifest into a temporary folder, then rename it into
    place; a partial build never looks complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        shards = []
        for split, examples in (("train", data.train), ("eval", data.eval)):
            for i in range(0, len(examples), SHARD_ROWS):
                name = f"{split}-{i // SHARD_ROWS:05d}.parquet"
                part = examples[i : i + SHARD_ROWS]
                pq.write_table(pa.Table.from_pylist(part), tmp / name)
                f = tmp / name
                shards.append(
                    {
                        "split": split,
                        "file": name,
                        "rows": len(part),
                        "bytes": f.stat().st_size,
                        "xxh3": hash_file(f),
                    }
                )
        manifest = {
            "format": ENTRY_FORMAT,
            "key": key,
            "components": comps,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "labels": data.labels,
            "datasets_stats": data.stats,  # load_datasets' own stats, given back as they were
            "stats": stats,
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        try:  # an entry already there (--force, or another machine built it too) is replaced
            atomic.publish(tmp, entry)
        except OSError:
            if not (entry / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_entry(entry: Path, manifest: dict[str, Any] | None = None) -> Datasets:
    """The `Datasets` of a cache entry; every shard's size and checksum checked first."""
    import pyarrow.parquet as pq

    manifest = manifest or _read_manifest(entry)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for s in manifest["shards"]:
        f = entry / s["file"]
        problem = None
        if not f.is_file():
            problem = f"cache shard {f.name} is missing"
        elif f.stat().st_size != s["bytes"] or hash_file(f) != s["xxh3"]:
            problem = f"cache shard {f.name} changed since {MANIFEST} was written (checksum)"
        else:
            try:
                rows = pq.read_table(f).to_pylist()
            except Exception as e:  # pyarrow raises its own error types for a bad file
                problem = f"cache shard {f.name} is not readable Parquet: {e}"
            else:
                if len(rows) != s["rows"]:
                    problem = f"cache shard {f.name} holds {len(rows)} rows, not {s['rows']}"
        if problem:
            raise UserError(
                Problem(
                    problem,
                    file=str(f),
                    key="data.cache_dir",
                    hint=f"delete {entry} and rerun `ftl preprocess RECIPE` (or `ftl train`, "
                    "which rebuilds a missing entry)",
                )
            )
        splits[s["split"]] += rows
    return Datasets(
        train=splits["train"],
        eval=splits["eval"],
        labels=manifest["labels"],
        stats=dict(manifest["datasets_stats"]),
    )


def _failure_marker(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.failed.json"


def _write_failure(entry: Path, error: BaseException | None) -> None:
    """Leave the main process's error where waiting processes look for the manifest
    (None: the examples are not cacheable, every process builds its own)."""
    if error is None:
        info: dict[str, Any] = {"uncacheable": True}
    elif isinstance(error, UserError):
        problems = [vars(p) for p in error.problems]
        info = {"title": error.title, "problems": problems}
    else:
        message = (
            f"the main process failed building the data cache: {type(error).__name__}: {error}"
        )
        info = {"title": None, "problems": [{"message": message, "key": "data.cache_dir"}]}
    marker = _failure_marker(entry)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + f".{os.getpid()}")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, marker)


def wait_for_entry(entry: Path, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any] | None:
    """Block until the main process has written `entry` (its manifest), or raise its error;
    None when the main process found the examples not cacheable.

    Only the filesystem is polled: no collective runs, so building may take as long as
    `timeout_s` without tripping the process group's timeout."""
    start, wall_start = time.monotonic(), time.time()
    marker = _failure_marker(entry)
    while True:
        if (entry / MANIFEST).is_file():
            return _read_manifest(entry)
        with contextlib.suppress(OSError, ValueError):
            if marker.stat().st_mtime >= wall_start - FAILED_FRESH_S:
                info = json.loads(marker.read_text())
                if info.get("uncacheable"):
                    return None
                raise UserError([Problem(**p) for p in info["problems"]], title=info["title"])
        if time.monotonic() - start > timeout_s:
            raise UserError(
                Problem(
                    f"waited {timeout_s:.0f} s for the main process to build the data cache "
                    f"{entry}",
                    key="data.cache_dir",
                    hint="run `ftl preprocess RECIPE` before training (every process then "
                    "loads the cache), or raise distributed.timeout_minutes",
                )
            )
        time.sleep(poll_s)


def _last_entry_for(root: Path, comps: dict[str, Any]) -> dict[str, Any] | None:
    """The newest entry built from the same data.train path (to say why this is a miss)."""
    found = []
    for m in root.glob(f"*/{MANIFEST}"):
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads(m.read_text(encoding="utf-8"))
            c = manifest.get("components") or {}
            if (c.get("data.train") or {}).get("path") == comps["data.train"]["path"]:
                found.append((m.stat().st_mtime, c))
    return max(found, key=lambda x: x[0])[1] if found else None


def prepare(
    cfg: DataCfg,
    tokenizer: Any,
    *,
    label_kind: str = "tokens",
    images: bool = False,
    cache_dir: str | None = None,
    is_main: bool = True,
    timeout_s: float = 1800.0,
    force: bool = False,
    log: Callable[[str], Any] | None = None,
    part: tuple[int, int] | None = None,
) -> Prepared:
    """Load the examples from the cache, or build and store them (see `load_or_build`)."""
    say = log or (lambda _msg: None)
    if not cfg.cache or not cacheable(cfg, images):
        return Prepared(
            load_datasets(cfg, tokenizer, label_kind=label_kind, images=images, part=part), None
        )
    root = cache_root(cfg, cache_dir)
    explicit = (root / MANIFEST).is_file()  # pointed at one entry, not at a cache folder
    t0 = time.perf_counter()
    comps = components(cfg, tokenizer, label_kind=label_kind, part=part)
    if part is not None:  # this rank's shards only: an entry of its own
        comps["part"] = list(part)
    key = digest(comps)
    entry = root if explicit else root / key
    if is_main:  # an old failure for this key is not this run's
        with contextlib.suppress(OSError):
            _failure_marker(entry).unlink()
    say(
        f"data cache: key {key[:16]} from the data files and tokenizer ({time.perf_counter() - t0:.1f} s)"
    )
    if explicit:
        manifest = _read_manifest(entry)
        if manifest.get("key") != key and not force:
            raise UserError(
                Problem(
                    f"this data cache entry was built for other inputs: "
                    f"{'; '.join(explain(manifest.get('components') or {}, comps))}",
                    file=str(entry / MANIFEST),
                    key="data.cache_dir",
                    hint=f"rebuild it with `ftl preprocess RECIPE --cache-dir {entry} --force`, "
                    "remove the folder, or point data.cache_dir at a cache folder instead",
                )
            )
    if not force and (entry / MANIFEST).is_file():
        manifest = _read_manifest(entry)
        say(f"data cache: hit {entry}")
        return Prepared(load_entry(entry, manifest), entry, hit=True, manifest=manifest)
    if not is_main:
        say(f"data cache: waiting for the main process to build {entry}")
        manifest = wait_for_entry(entry, timeout_s)
        if manifest is None:
            data = load_datasets(cfg, tokenizer, label_kind=label_kind, images=images, part=part)
            return Prepared(data, None)
        return Prepared(load_entry(entry, manifest), entry, manifest=manifest)
    previous = None if explicit or force else _last_entry_for(root, comps)
    why = explain(previous, comps) if previous else []
    say(f"data cache: miss, building {entry}" + (f" ({'; '.join(why)})" if why else ""))
    try:
        t1 = time.perf_counter()
        data = load_datasets(cfg, tokenizer, label_kind=label_kind, images=images, part=part)
        if not cacheable(cfg, images, data.train + data.eval):
            say("data cache: examples hold more than token ids and labels; not cached")
            _write_failure(entry, None)  # the waiting processes build their own
            return Prepared(data, None)
        stats = build_stats(cfg, data, label_kind=label_kind)
        stats["build_s"] = round(time.perf_counter() - t1, 3)
        manifest = _write_entry(entry, comps, key, data, stats)
    except BaseException as e:
        _write_failure(entry, e)
        raise
    say(f"data cache: wrote {entry} ({stats['build_s']:.1f} s)")
    return Prepared(data, entry, manifest=manifest, rebuilt_because=why)


def load_or_build(
    cfg: DataCfg,
    tokenizer: Any,
    *,
    label_kind: str = "tokens",
    images: bool = False,
    is_main: bool = True,
    timeout_s: float = 1800.0,
    cache_dir: str | None = None,
    log: Callable[[str], Any] | None = None,
    part: tuple[int, int] | None = None,
) -> Datasets:
    """Drop-in for `load_datasets`: the same `Datasets`, from the cache when its key matches.

    A miss on the main process builds with `load_datasets` and writes the entry; a miss on
    any other process waits (up to `timeout_s`, polling the filesystem) for the main
    process's manifest, and raises the main process's error if it failed. With
    `data.cache: false` or an image task it is `load_datasets`, on every process.
    Pass `is_main` True on one process per machine when the cache folder is not shared
    between machines (e.g. `accelerator.is_local_main_process`). `part` (rank, world):
    only this rank's shards of a shard folder (see `launcher.data.read.own_shards`), in an
    entry of its own that this rank builds.
    """
    return prepare(
        cfg,
        tokenizer,
        label_kind=label_kind,
        images=images,
        cache_dir=cache_dir,
        is_main=is_main,
        timeout_s=timeout_s,
        log=log,
        part=part,
    ).datasets
