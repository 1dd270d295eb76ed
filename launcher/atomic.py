"""Output folders written whole or not at all.

Every folder ftl produces (checkpoints, the best and the final model, merged, converted
and exported models, data-cache entries, shards) is written under a temporary name beside
its destination and then published: the new folder and the old one are swapped in one
atomic step, and only then is the old one deleted. At every moment there is one complete
folder at the destination, the old one or the new one; an interrupted write leaves a
temporary folder (`.tmp-NAME` for checkpoints, `.NAME.tmp-*` for the tools) that the next
write clears, never a half-written output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import Problem, UserError


def temp_for(final: Path) -> Path:
    """The temporary folder a write of `final` goes to (beside it: same file system)."""
    return final.parent / f".tmp-{final.name}"


def publish(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing what was there without a
    moment in which `final` is missing or partial.

    On Linux the two folders are swapped in one atomic step (renameat2 with
    RENAME_EXCHANGE) and the old one, now at `tmp`, is deleted. Elsewhere the old folder is
    renamed aside first and put back should the second rename fail."""
    _fsync(tmp)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        _fsync(final.parent)
        return
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    had = final.exists()
    if had:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if had:
            os.replace(old, final)
        raise
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def folder(final: Path, *, what: str = "output", key: str | None = None) -> Iterator[Path]:
    """Write a folder: yields a fresh temporary folder beside `final` to fill, publishes
    it on success. On any error the temporary folder is removed and `final` is as it was;
    a full disk becomes a UserError naming `what` (and `key`). Leftovers of an earlier,
    killed write of the same output (`.NAME.tmp-*`) are cleared first."""
    parent = final.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        yield tmp
        publish(tmp, final)  # the old output stays until the new one is in
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(
                Problem(
                    f"the disk under {parent} is full while writing the {what} {final}; "
                    "the partial output was removed",
                    key=key,
                    hint=f"free space on {parent}, or write elsewhere",
                )
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
