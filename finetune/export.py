"""Write a fine-tuned classifier in its family's native format, loadable without ``finetune``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_atomically(directory: Path, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then move the result to ``directory``: readers never see a half-written folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def export_classifier(task: Any, directory: Path) -> Path:
    """Export ``task.model`` (HF ``save_pretrained`` folder or timm ``config.json`` + safetensors) and its labels."""

    def write(target: Path) -> None:
        task.loader.export(task.model, target, task.labels, task.backbone)
        (target / "labels.json").write_text(json.dumps(task.labels, indent=2))

    return write_atomically(directory, write)
