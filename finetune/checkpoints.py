"""Checkpoints that survive crashes, full disks and preemption, and checks that a checkpoint is whole.

``atomic_save`` (what ``finetune.callbacks.AtomicCheckpointIO``, a Lightning ``CheckpointIO`` plugin, calls)
writes ``X.ckpt`` as ``.X.ckpt.<id>.tmp`` in the same folder, fsyncs it, then renames it over ``X.ckpt`` (``os.replace``, atomic on one filesystem): a kill at
any moment leaves either the previous complete file or the new complete one, never a truncated file. Before
writing it checks that the folder's filesystem has room for the new file (plus 5%), so a full disk ends in
one line that says how much space is needed where, with the previous checkpoint intact. Temporary files that
a killed writer left behind are removed before the next write into the folder (one writer per run folder).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from finetune.display import human
from finetune.errors import RecipeError

log = logging.getLogger(__name__)

TEMPORARY = ".*.tmp"
HEADROOM = 1.05
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index inside a sharded checkpoint folder


def atomic_save(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save(checkpoint, path)`` through a temporary file beside ``path`` that is fsynced and renamed
    into place, after checking the folder has room; temporaries a killed writer left there are removed first."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)
    needed = int(tensor_bytes(checkpoint) * HEADROOM) + 1_000_000
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise _disk_full(path, needed, free)
    temporary = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with temporary.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_folder(folder)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _disk_full(path, needed, shutil.disk_usage(folder).free) from None
        raise
    finally:
        temporary.unlink(missing_ok=True)


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) checkpoint: what its file will at least hold."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left in ``folder``; return them."""
    found = sorted(folder.glob(TEMPORARY))
    for path in found:
        path.unlink(missing_ok=True)
    if found:
        log.warning(
            "Removed %d unfinished checkpoint file(s) left in %s by an interrupted run", len(found), folder
        )
    return found


def check_loadable(path: Path, key: str = "ckpt_path") -> None:
    """RecipeError naming ``key`` unless ``path`` is a whole checkpoint: a file torch can open (read lazily,
    with ``weights_only=True``), or a sharded checkpoint folder with its index."""
    if not path.exists():
        raise RecipeError(key, f"{path} does not exist; give a checkpoint file (or `last`)")
    if path.is_dir():
        if not (path / SHARDED_INDEX).is_file():
            raise RecipeError(
                key, f"{path} is a folder but not a sharded checkpoint (no {SHARDED_INDEX}); give a .ckpt"
            )
        return
    if not zipfile.is_zipfile(path):
        what = "empty" if path.stat().st_size == 0 else "damaged (truncated?) or not a checkpoint"
        raise RecipeError(
            key, f"checkpoint {path} is {what}; resume from another (`last` picks the newest whole one)"
        )
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise RecipeError(
            key,
            f"checkpoint {path} is damaged (truncated?): {str(error).splitlines()[0] if str(error) else error!r}",
        ) from None


def newest_loadable(paths: Iterable[Path], key: str = "ckpt_path") -> Path | None:
    """The most recently written whole checkpoint among ``paths`` (damaged ones are skipped, with a warning)."""
    for candidate in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        if candidate.name.startswith("."):
            continue  # an unfinished temporary file
        try:
            check_loadable(candidate, key)
        except RecipeError as error:
            log.warning("Skipping %s: %s", candidate, error.message)
            continue
        return candidate
    return None


def _disk_full(path: Path, needed: int, free: int) -> RecipeError:
    return RecipeError(
        "trainer.default_root_dir",
        f"no room for checkpoint {path.name}: it needs about {human(needed)} in {path.parent}, {human(free)} "
        "are free; free space or move the run (the previous checkpoint is kept)",
    )


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the folder's entry); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
