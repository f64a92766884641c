"""Many devices and nodes through Lightning's own strategies: FSDP2 sharding of finetune tasks
(``trainer.strategy: fsdp2``), and the checks of what combines with what.

Importing ``finetune.parallel.fsdp2`` registers the ``fsdp2`` name with Lightning's strategy registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune._lazy import lazy_attributes

if TYPE_CHECKING:
    from finetune.parallel.fsdp2 import FSDP2Strategy

_HOMES = {"FSDP2Strategy": "finetune.parallel.fsdp2"}

__all__ = ["FSDP2Strategy"]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
