"""The key of a data-cache entry: what cached examples depend on, hashed part by part.

A sha256 over the content of every data file, the tokenizer's saved files, the chat
template, `FORMAT_VERSION`, the data section (less the settings that cannot change an
example), the task's label kind and the transformers/tokenizers versions. Each part is
hashed on its own so that `explain` can say, by name, why an entry does not match.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from launcher.assets import resolve_path
from launcher.data.read import existing, is_shard_folder, own_shards
from launcher.data.shards import hash_file
from launcher.recipe.schema import DataCfg

FORMAT_VERSION = 1  # bump when launcher/data/{formats,build,read}.py change their output
# settings that cannot change an example
NOT_IN_KEY = ("cache", "cache_dir", "packing", "num_workers")
# tokenizer_config.json keys that say where the tokenizer was loaded from, not what it does
_TOKENIZER_CONFIG_NOISE = ("name_or_path", "is_local", "local_files_only", "chat_template")
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def digest(obj: Any) -> str:
    """sha256 of a JSON value, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_files(value: str, key: str, part: tuple[int, int] | None = None) -> dict[str, Any]:
    """The content hash of a data file, or of every file under a data folder (of a shard
    folder read by rank `part`: its manifest and that rank's shards)."""
    path = existing(resolve_path(value, base=Path.cwd()), key)
    if part is not None and is_shard_folder(path):
        manifest = json.loads((path / "manifest.json").read_text())
        mine = ["manifest.json"] + [x["file"] for x in own_shards(manifest["shards"], part, key)]
        files = {f: hash_file(path / f) for f in mine if (path / f).is_file()}
    elif path.is_dir():
        files = {
            str(f.relative_to(path)): hash_file(f)
            for f in sorted(path.rglob("*"))
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
        }
    else:
        files = {path.name: hash_file(path)}
    return {"path": str(path), "files": files, "hash": digest(files)}


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's saved files, without its chat template (hashed on its own)
    and without the keys that only say where it was loaded from."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="ftl-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).rglob("*")):
            if not f.is_file() or f.name in _CHAT_TEMPLATE_FILES:
                continue
            data = f.read_bytes()
            if f.name == "tokenizer_config.json":
                config = json.loads(data)
                for k in _TOKENIZER_CONFIG_NOISE:
                    config.pop(k, None)
                data = json.dumps(config, sort_keys=True).encode()
            h.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def components(
    cfg: DataCfg, tokenizer: Any, *, label_kind: str, part: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Everything the cached examples depend on, each part hashed on its own so that a
    mismatch can be explained by name."""
    from importlib.metadata import version

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = json.dumps(template, sort_keys=True)
    return {
        "format_version": FORMAT_VERSION,
        "data.train": _data_files(cfg.train, "data.train", part),
        "data.eval": _data_files(cfg.eval, "data.eval") if cfg.eval is not None else None,
        "data.mix": [_data_files(m.path, f"data.mix[{i}].path") for i, m in enumerate(cfg.mix)]
        or None,
        "tokenizer": tokenizer_hash(tokenizer),
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "data": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IN_KEY},
        "label_kind": label_kind,
        "libraries": {p: version(p) for p in ("transformers", "tokenizers")},
    }


def cache_key(cfg: DataCfg, tokenizer: Any, *, label_kind: str) -> str:
    """The entry name: sha256 over every component (see the module docstring)."""
    return digest(components(cfg, tokenizer, label_kind=label_kind))


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the components of two keys, in words."""
    out: list[str] = []
    if old.get("format_version") != new.get("format_version"):
        out.append(
            f"ftl's formatting code changed (format version {old.get('format_version')} "
            f"vs {new.get('format_version')})"
        )
    for name in ("data.train", "data.eval"):
        a, b = old.get(name) or {}, new.get(name) or {}
        if a.get("hash") == b.get("hash") and a.get("path") == b.get("path"):
            continue
        if a.get("path") != b.get("path"):
            out.append(f"{name} is {a.get('path')} in the cache, {b.get('path')} in the recipe")
            continue
        fa, fb = a.get("files", {}), b.get("files", {})
        changed = sorted(f for f in fa.keys() & fb.keys() if fa[f] != fb[f])
        for f in changed[:3]:
            out.append(f"data file {Path(b['path']) / f if len(fb) > 1 else b['path']} changed")
        added, removed = sorted(fb.keys() - fa.keys()), sorted(fa.keys() - fb.keys())
        if added:
            out.append(f"{name} has new files: {', '.join(added[:3])}")
        if removed:
            out.append(f"{name} lost files: {', '.join(removed[:3])}")
        if len(changed) > 3:
            out.append(f"... and {len(changed) - 3} more changed files")
    mix_a = [m.get("hash") for m in old.get("data.mix") or []]
    mix_b = [m.get("hash") for m in new.get("data.mix") or []]
    for i, (ha, hb) in enumerate(zip(mix_a, mix_b, strict=False)):
        if ha != hb:
            out.append(f"data file of data.mix[{i}] changed")
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("the tokenizer differs (vocabulary, added tokens or settings)")
    if old.get("chat_template") != new.get("chat_template"):
        out.append("the chat template differs")
    a, b = old.get("data") or {}, new.get("data") or {}
    for k in sorted(a.keys() | b.keys()):
        if k not in ("train", "eval") and a.get(k) != b.get(k):
            out.append(f"data.{k}: {a.get(k)!r} in the cache, {b.get(k)!r} in the recipe")
    if old.get("label_kind") != new.get("label_kind"):
        out.append(
            f"the task's labels: {old.get('label_kind')} in the cache, {new.get('label_kind')} in the recipe"
        )
    la, lb = old.get("libraries") or {}, new.get("libraries") or {}
    for p in sorted(la.keys() | lb.keys()):
        if la.get(p) != lb.get(p):
            out.append(f"{p} {la.get(p)} built the cache, {lb.get(p)} is installed")
    return out or ["the key differs"]
