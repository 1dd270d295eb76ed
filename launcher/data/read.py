"""Reading raw rows from JSONL, JSON, CSV/TSV, CoNLL files or a folder of label folders.

Every row carries where it came from (`file:line`), so a bad row is reported exactly.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".conll", ".iob", ".bio")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CONLL = (".conll", ".iob", ".bio")


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file:line" or a file path


@dataclass
class BadRows:
    """Rows skipped under `on_bad_row: skip`, with a few examples for the summary."""

    count: int = 0
    examples: list[str] | None = None

    def add(self, message: str) -> None:
        self.count += 1
        self.examples = self.examples or []
        if len(self.examples) < 5:
            self.examples.append(message)


def existing(path: Path, key: str) -> Path:
    """`path`, or the one "data file not found" error every data reader gives."""
    if not path.exists():
        raise UserError(
            Problem(
                f"data file not found: {path}",
                key=key,
                hint="check the path; relative paths start at the current folder",
            )
        )
    return path


def read_rows(
    path: Path,
    *,
    key: str,
    on_bad_row: str,
    bad: BadRows,
    text_field: str = "text",
    label_field: str = "label",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    image_field: str | None = None,
    chat_images: tuple[str, str] | None = None,
    part: tuple[int, int] | None = None,
) -> list[Row]:
    """All rows of `path`; malformed ones raise (`on_bad_row: error`) or are counted.

    `image_field` (image classification) and `chat_images` (vision chat: the images and
    messages fields) make image paths relative to the data file's folder."""
    existing(path, key)
    if path.is_dir() and (path / "manifest.json").is_file():
        return _read_shards(path, key, on_bad_row, bad, part)
    if path.is_dir():
        if image_field is not None:
            return _read_image_folders(path, key, image_field, label_field)
        return _read_label_folders(path, key, text_field, label_field)
    suffix = path.suffix.lower()
    if chat_images is not None:
        rows = read_rows(path, key=key, on_bad_row=on_bad_row, bad=bad)
        for row in rows:
            _resolve_chat_images(row.data, path.parent, *chat_images)
        return rows
    if image_field is not None and suffix in (".jsonl", ".json", ".csv", ".tsv"):
        rows = read_rows(path, key=key, on_bad_row=on_bad_row, bad=bad, label_field=label_field)
        for row in rows:  # image paths are relative to the data file's folder
            value = row.data.get(image_field)
            if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
                row.data[image_field] = str(path.parent / value)
        return rows
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, key, on_bad_row, bad)
        if suffix == ".json":
            return _read_json(path, key, on_bad_row, bad)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
        if suffix in CONLL:
            return _read_conll(path, key, on_bad_row, bad, tokens_field, tags_field)
    except UnicodeDecodeError as e:
        raise UserError(
            Problem(
                f"not UTF-8 text (byte {e.start}: {e.reason})",
                file=str(path),
                key=key,
                hint="re-save the file as UTF-8",
            )
        ) from None
    except csv.Error as e:
        raise UserError(Problem(f"malformed CSV: {e}", file=str(path), key=key)) from None
    raise UserError(
        Problem(
            f"unsupported data file type '{suffix}': {path}",
            key=key,
            hint=f"use one of {', '.join(SUFFIXES)}, or a folder of label folders",
        )
    )


def _bad(message: str, where: str, key: str, on_bad_row: str, bad: BadRows) -> None:
    if on_bad_row == "skip":
        bad.add(f"{where}: {message}")
        return
    raise UserError(
        Problem(
            message,
            file=where,
            key=key,
            hint="fix the row, or set data.on_bad_row: skip to drop bad rows",
        )
    )


def _read_jsonl(path: Path, key: str, on_bad_row: str, bad: BadRows) -> list[Row]:
    return list(iter_jsonl(path, key, on_bad_row, bad))


def iter_jsonl(
    path: Path, key: str, on_bad_row: str, bad: BadRows, keep: Any = None
) -> Iterator[Row]:
    """The rows of a JSONL file one at a time (memory: one line). `keep(n)`: only lines
    whose number n it accepts are parsed (a rank's share of a file)."""
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or (keep is not None and not keep(n)):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(
                    f"malformed JSON: {e.msg} (column {e.colno})",
                    f"{path}:{n}",
                    key,
                    on_bad_row,
                    bad,
                )
                continue
            if not isinstance(obj, dict):
                _bad("a JSONL row must be an object", f"{path}:{n}", key, on_bad_row, bad)
                continue
            yield Row(obj, f"{path}:{n}")


def _read_json(path: Path, key: str, on_bad_row: str, bad: BadRows) -> list[Row]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(
            Problem(f"malformed JSON: {e.msg}", file=f"{path}:{e.lineno}", key=key)
        ) from None
    if not isinstance(obj, list):
        raise UserError(
            Problem(
                "a .json data file must hold a list of objects",
                file=str(path),
                key=key,
                hint="or use JSONL: one object per line",
            )
        )
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            _bad(f"item {i} is not an object", f"{path}[{i}]", key, on_bad_row, bad)
            continue
        rows.append(Row(item, f"{path}[{i}]"))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        # line_num after reading a record is that record's last line; a short row has
        # None for its missing columns, which the format reports as a missing field
        return [
            Row(
                {k: v for k, v in r.items() if v is not None and k is not None},
                f"{path}:{reader.line_num}",
            )
            for r in reader
        ]


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def reads_own_shards(cfg: Any, world: int, uses_labels: bool) -> bool:
    """Whether each of `world` processes reads only its own shards of data.train (a
    `DataCfg`); settings that cannot work that way are a UserError, raised before any
    process reads (by `ftl launch`) and again by every rank (any other launcher)."""
    from launcher.assets import resolve_path

    if world == 1 or not cfg.shards_per_rank or cfg.mix:
        return False
    if not is_shard_folder(resolve_path(cfg.train, base=Path.cwd())):
        return False
    if cfg.eval_split:
        raise UserError(
            Problem(
                "data.eval_split would hold out different rows on every rank when each rank "
                "reads its own shards",
                key="data.eval_split",
                hint="give an eval file (data.eval), or set data.shards_per_rank: false",
            )
        )
    if uses_labels and cfg.labels is None:
        raise UserError(
            Problem(
                "each rank reads its own shards, so no rank sees every label",
                key="data.labels",
                hint="list the labels in data.labels, or set data.shards_per_rank: false",
            )
        )
    return True


def own_shards(shards: list[Any], part: tuple[int, int] | None, key: str) -> list[Any]:
    """The shards rank `part[0]` of `part[1]` reads: shard i goes to rank i mod world."""
    if part is None:
        return shards
    rank, world = part
    if len(shards) < world:
        raise UserError(
            Problem(
                f"{len(shards)} shards for {world} processes: every process reads its own "
                "shards, so some would get none",
                key=key,
                hint=f"reshard with `ftl shard ... --num-shards {world}` (or a multiple), or "
                "set data.shards_per_rank: false",
            )
        )
    return shards[rank::world]


def _read_shards(
    path: Path, key: str, on_bad_row: str, bad: BadRows, part: tuple[int, int] | None = None
) -> list[Row]:
    """A folder written by `ftl shard`: its checksums are checked, then the shards are read
    in order: all of them, or with `part` (rank, world) only this rank's."""
    from launcher.data.shards import verify

    manifest = verify(path, key, select=lambda shards: own_shards(shards, part, key))
    rows: list[Row] = []
    for s in own_shards(manifest["shards"], part, key):
        rows += _read_jsonl(path / s["file"], key, on_bad_row, bad)
    return rows


def _read_conll(
    path: Path, key: str, on_bad_row: str, bad: BadRows, tokens_field: str, tags_field: str
) -> list[Row]:
    """CoNLL columns: one word per line, its first column the word and its last the tag;
    a blank line ends a sentence; -DOCSTART- lines are skipped."""
    rows: list[Row] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0

    def flush() -> None:
        if words:
            rows.append(Row({tokens_field: list(words), tags_field: list(tags)}, f"{path}:{start}"))
        words.clear()
        tags.clear()

    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                flush()
                continue
            if cols[0] == "-DOCSTART-":
                continue
            if len(cols) < 2:
                _bad(
                    f"a CoNLL line needs a word and a tag, got {line.strip()!r}",
                    f"{path}:{n}",
                    key,
                    on_bad_row,
                    bad,
                )
                continue
            if not words:
                start = n
            words.append(cols[0])
            tags.append(cols[-1])
    flush()
    return rows


def _resolve_chat_images(data: dict, base: Path, images_field: str, messages_field: str) -> None:
    def at(p: object) -> object:
        return str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p

    if isinstance(data.get(images_field), list):
        data[images_field] = [at(p) for p in data[images_field]]
    for m in data.get(messages_field) or []:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image" and "image" in part:
                part["image"] = at(part["image"])


def _read_image_folders(path: Path, key: str, image_field: str, label_field: str) -> list[Row]:
    """`path/<label>/*.png|jpg|...`: one image per file, the folder name is its label."""
    rows, others = [], []
    for label_dir in sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    ):
        for f in sorted(label_dir.iterdir()):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append(Row({image_field: str(f), label_field: label_dir.name}, str(f)))
            else:
                others.append(f)
    if not rows:
        found = f" (found other files, e.g. {others[0]})" if others else ""
        raise UserError(
            Problem(
                f"no images in label folders under {path}{found}",
                key=key,
                hint="an image dataset is a folder with one sub-folder per label, holding "
                f"{', '.join(IMAGE_SUFFIXES)} files; or a JSONL file with image and label fields",
            )
        )
    return rows


def _read_label_folders(path: Path, key: str, text_field: str, label_field: str) -> list[Row]:
    """`path/<label>/*.txt`: one example per file, the folder name is its label."""
    rows = []
    for label_dir in sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    ):
        for f in sorted(label_dir.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                text = f.read_bytes().decode("utf-8", errors="replace")
                rows.append(Row({text_field: text, label_field: label_dir.name}, str(f)))
    if not rows:
        raise UserError(
            Problem(
                f"no label folders with files in {path}",
                key=key,
                hint="a folder dataset holds one sub-folder per label, one file per example",
            )
        )
    return rows
