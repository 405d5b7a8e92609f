"""Crash-safe writes: a reader, or a resumed run, finds the old content or the new, never a mix.

A rename is atomic, but on its own not durable: after a power loss the new name may point at a file
whose data never reached the disk, or the rename itself may be forgotten. So every write goes to a
temporary name in the same directory (a rename cannot cross file systems), the data is fsynced, the
temporary is renamed over the final name, and the parent directory is fsynced to make the rename stick.
Temporaries are named ``.partial-*`` so that a later save can recognise and prune what a kill left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (POSIX: a directory opens read-only too)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Fsync every file under ``root``, then every directory bottom-up, ``root`` last."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) durably; on failure the old file stays.

    The temporary carries the process id, so two processes writing the same path never share one.
    """
    temporary = path.with_name(f".partial-{path.name}.{os.getpid()}")
    try:
        temporary.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        publish_file(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def publish_file(temporary: Path, path: Path) -> None:
    """Rename the fully written file ``temporary`` over ``path`` durably (fsync, rename, fsync the parent)."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(path.parent)


def publish_dir(partial: Path, final: Path) -> None:
    """Rename the fully written directory ``partial`` to ``final``, which must not exist, durably.

    Raises OSError when ``final`` exists and is not empty (POSIX will not rename over it), so a
    concurrent writer that published first is never overwritten.
    """
    fsync_tree(partial)
    os.replace(partial, final)
    fsync_path(final.parent)


def replace_dir(partial: Path, final: Path) -> None:
    """Publish ``partial`` as ``final``, replacing any existing ``final`` directory.

    POSIX has no atomic swap of two directories, so the old one is first renamed aside to
    ``.previous-<name>``: between the two renames ``final`` is missing, but a complete copy always
    exists under one of the two names; a leftover ``.previous-*`` is removed once a new ``final`` is in.
    """
    previous = final.with_name(f".previous-{final.name}")
    fsync_tree(partial)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)  # a kill's leftover; `final` is the complete copy
        os.replace(final, previous)
    os.replace(partial, final)
    fsync_path(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def prune_partial_files(directory: Path) -> None:
    """Delete the ``.partial-*`` files a killed writer left in ``directory``.

    Only for a directory one process writes at a time (a run directory), where no temporary can belong
    to a live writer.
    """
    for stale in directory.glob(".partial-*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
