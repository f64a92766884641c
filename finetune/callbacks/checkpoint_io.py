"""``AtomicCheckpointIO``: Lightning writes checkpoints through ``finetune.checkpoints.atomic_save``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from finetune.checkpoints import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """A ``CheckpointIO`` plugin (``Trainer(plugins=[AtomicCheckpointIO()])``; the CLI adds it) whose writes
    leave either the previous whole checkpoint or the new whole one, whatever kills the process, and end with
    one line naming the space needed when the disk is full. Reading is Lightning's own."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, Path(path))
