"""dpokit.atomic: every write lands whole or not at all, with each fsync where durability needs it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dpokit import atomic
from dpokit.atomic import fsync_tree, publish_dir, replace_dir, write_atomic


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` on the way can swallow it."""


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, ...]]:
    """Records fsyncs (by path) and renames in call order, still doing them."""
    recorded: list[tuple[str, ...]] = []
    real_fsync, real_replace = atomic.fsync_path, os.replace

    def fsync(path: Path) -> None:
        recorded.append(("fsync", Path(path).name))
        real_fsync(path)

    def replace(source, target) -> None:
        recorded.append(("replace", Path(source).name, Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(atomic, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return recorded


def test_write_atomic_fsyncs_the_data_then_renames_then_fsyncs_the_directory(tmp_path, calls):
    target = tmp_path / "out" / "metrics.json"
    target.parent.mkdir()
    write_atomic(target, "naïve ✓")
    temporary = f".partial-metrics.json.{os.getpid()}"
    assert calls == [("fsync", temporary), ("replace", temporary, "metrics.json"), ("fsync", "out")]
    assert target.read_bytes() == "naïve ✓".encode()  # str is written as UTF-8, whatever the locale
    write_atomic(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert os.listdir(target.parent) == ["metrics.json"]


def test_write_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    write_atomic(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left behind


def test_fsync_tree_syncs_every_file_before_its_directory_and_the_root_last(tmp_path, calls):
    (tmp_path / "model" / "sub").mkdir(parents=True)
    for name in ("model/a.bin", "model/sub/b.bin"):
        (tmp_path / name).write_text(name)
    fsync_tree(tmp_path / "model")
    assert calls == [("fsync", "b.bin"), ("fsync", "sub"), ("fsync", "a.bin"), ("fsync", "model")]


def test_publish_dir_never_overwrites_an_existing_directory(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "weights").write_text("first")
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "weights").write_text("second")
    with pytest.raises(OSError):
        publish_dir(tmp_path / ".partial", tmp_path / "final")
    assert (tmp_path / "final" / "weights").read_text() == "first"


def make_dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def killed_at_kth_call(real: Callable, calls: dict[str, int]) -> Callable:
    """`real`, counting its calls in `calls["count"]` and raising Killed at call number `calls["k"]`."""

    def call(*args):
        calls["count"] += 1
        if calls["count"] == calls["k"]:
            raise Killed
        return real(*args)

    return call


def test_replace_dir_keeps_a_complete_copy_whichever_call_is_killed(tmp_path, monkeypatch):
    """Kill replace_dir at its k-th fsync or rename, for every k: a complete copy (old or new) is always
    under `final` or `.previous-final`, and the next call finishes the job and leaves nothing behind."""
    calls = {"k": 0, "count": 0}
    for name in ("fsync", "replace"):
        monkeypatch.setattr(os, name, killed_at_kth_call(getattr(os, name), calls))
    k = 0
    while True:
        k += 1
        root = tmp_path / f"k{k}"
        root.mkdir()
        make_dir(root / "final", "old")
        calls.update(k=k, count=0)
        try:
            replace_dir(make_dir(root / ".partial-final", "new"), root / "final")
        except Killed:
            survivors = [p for p in (root / "final", root / ".previous-final") if p.exists()]
            assert survivors, f"k={k}: no complete copy left"
            assert {(p / "weights").read_text() for p in survivors} <= {"old", "new"}
        else:
            assert calls["count"] < k  # the whole call ran without reaching the k-th: all points covered
            break
        finally:
            calls["k"] = 0
        shutil.rmtree(root / ".partial-final", ignore_errors=True)  # as save_final does before writing
        replace_dir(make_dir(root / ".partial-final", "new"), root / "final")
        assert (root / "final" / "weights").read_text() == "new"
        assert [p.name for p in root.iterdir()] == ["final"]
    # Five calls, each killed once: fsync the partial's file and directory, rename `final` aside,
    # rename the partial in, fsync the parent.
    assert k == 6
