"""launcher/atomic.py: an output folder is replaced whole, never missing or partial."""

from __future__ import annotations

import os
import threading

import pytest

from launcher import atomic


def test_publish_swaps_in_the_new_folder_and_drops_the_old(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = atomic.temp_for(final)
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    atomic.publish(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_the_destination_is_never_missing_while_it_is_replaced(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("0")
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.add((final / "v").read_text())
            except FileNotFoundError:
                seen.add("missing")

    t = threading.Thread(target=watch)
    t.start()
    for i in range(1, 200):
        with atomic.folder(final) as tmp:
            (tmp / "v").write_text(str(i))
    stop.set()
    t.join()
    assert "missing" not in seen and (final / "v").read_text() == "199"


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("old")
    with pytest.raises(RuntimeError), atomic.folder(final) as tmp:
        (tmp / "v").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "v").read_text() == "old"
    assert not atomic.temp_for(final).exists()


def test_without_the_atomic_swap_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("old")
    tmp = atomic.temp_for(final)
    tmp.mkdir()
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real = os.replace

    def flaky(src, dst):
        if str(src) == str(tmp):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        atomic.publish(tmp, final)
    assert (final / "v").read_text() == "old"
