"""Loading a recipe: safe YAML with line numbers, `extends:`, `-o key=value` overrides.

Every problem is collected and raised at once as a `UserError`, each naming the file,
line, dotted key and a hint. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.errors import Problem, UserError
from launcher.recipe import checks
from launcher.recipe.schema import Recipe

Key = tuple[str, ...]
Origin = tuple[str, int | None]  # (file or "-o override", line)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Key, Origin]]:
    """Safe-load one YAML mapping and remember the line of every key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            Problem(
                "file not found",
                file=str(path),
                hint="check the path (relative paths start at the current folder)",
            )
        ) from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(Problem(f"cannot read as text: {e}", file=str(path))) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise UserError(
            Problem(
                f"unsafe or unknown YAML tag: {e.problem}",
                file=str(path),
                line=line,
                hint="recipes are plain data: remove the '!!' tag",
            )
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(
            Problem(
                f"YAML syntax error: {getattr(e, 'problem', None) or e}",
                file=str(path),
                line=mark.line + 1 if mark else None,
                hint="check indentation and quoting around this line",
            )
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            Problem("a recipe must be a mapping of keys to values", file=str(path), line=1)
        )
    lines: dict[Key, Origin] = {}

    def walk(n: yaml.Node, prefix: Key) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (str(k.value),)
                lines[key] = (str(path), k.start_mark.line + 1)
                walk(v, key)

    walk(node, ())
    return data, lines


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else from `top` replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_tree(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[Key, Origin]]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise UserError(
            Problem(
                f"extends: cycle: {chain}",
                file=str(stack[-1]),
                key="extends",
                hint="remove one of the extends: entries in this chain",
            )
        )
    data, lines = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data, lines
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise UserError(
            Problem(
                "extends: must be a path or a list of paths",
                file=str(path),
                line=lines.get(("extends",), (None, None))[1],
                key="extends",
            )
        )
    merged: dict[str, Any] = {}
    origins: dict[Key, Origin] = {}
    for parent in parents:  # later parents win, the file itself wins over all
        pdata, plines = _load_tree(path.parent / parent, (*stack, path))
        merged = _merge(merged, pdata)
        origins.update(plines)
    origins.update(lines)
    return _merge(merged, data), origins


def parse_override(text: str) -> tuple[Key, Any]:
    """`train.lr=3e-4` -> (("train", "lr"), 3e-4); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(
            Problem(
                f"override '{text}' is not key.path=value",
                key=text,
                hint="for example: -o train.lr=1e-4",
            )
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return tuple(key.strip().split(".")), value


def _set(data: dict[str, Any], key: Key, value: Any) -> None:
    node = data
    for part in key[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key[-1]] = value


def _schema_at(key: Key) -> type[BaseModel] | None:
    """The pydantic section model that owns `key` (for did-you-mean)."""
    model: Any = Recipe
    for part in key:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return None
    return model


def _hint(err: dict[str, Any], key: Key) -> str | None:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _schema_at(key[:-1])
        fields = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key[-1], fields, n=1, cutoff=0.6)
        if close:
            return f"did you mean '{close[0]}'? ({'.'.join((*key[:-1], close[0]))})"
        return f"allowed keys here: {', '.join(fields)}" if fields else "remove this key"
    if kind == "literal_error":
        return f"allowed values: {err['ctx']['expected']}"
    if kind == "missing":
        return "add this key"
    if kind.endswith(("_type", "_parsing")):
        return f"expected {kind.split('_')[0]}, got {err.get('input')!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        return "use a value in the allowed range"
    return None


def _origin(origins: dict[Key, Origin], key: Key, default_file: str) -> Origin:
    for n in range(len(key), 0, -1):
        if key[:n] in origins:
            return origins[key[:n]]
    return (default_file, None)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge, override and validate a recipe; raise `UserError` listing every problem."""
    path = Path(path)
    data, origins = _load_tree(path, ())
    problems: list[Problem] = []
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except UserError as e:
            problems.extend(e.problems)
            continue
        _set(data, key, value)
        origins[key] = (f"override -o {text}", None)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            key = tuple(str(x) for x in err["loc"])
            file, line = _origin(origins, key, str(path))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error":
                msg = f"unknown choice {err['input']!r}"
            problems.append(
                Problem(msg, file=file, line=line, key=".".join(key) or None, hint=_hint(err, key))
            )
        raise UserError(
            problems, title=f"{path}: {len(problems)} problem(s) in the recipe"
        ) from None
    if problems:
        raise UserError(problems, title=f"{path}: {len(problems)} problem(s) in the recipe")
    for key_text, msg, hint in checks.check(recipe):
        key = tuple(key_text.split("."))
        file, line = _origin(origins, key, str(path))
        problems.append(Problem(msg, file=file, line=line, key=key_text, hint=hint))
    if problems:
        raise UserError(problems, title=f"{path}: {len(problems)} problem(s) in the recipe")
    return recipe
