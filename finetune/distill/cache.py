"""Teacher logits computed once per training sample and reused in later epochs.

Valid only when a sample's inputs are the same every epoch: no train-time augmentation (random crops,
flips, colour jitter ..., MixUp/CutMix of batches), no random token masking. With augmentation the cached
logits are those of another view of the image than the student sees, which silently weakens distillation;
so the callback refuses the cache when the train split's transform has random steps or its batches are
mixed (``augmenting_steps``).
"""

from __future__ import annotations

from typing import Any

import torch

# Transform classes that change a sample each time it is drawn (torchvision and timm names).
AUGMENTING = ("Random", "ColorJitter", "RandAugment", "AutoAugment", "AugMix", "TrivialAugment", "Mixup")


class TeacherCache:
    """Teacher logits by sample index (the batch's ``index``), kept on the CPU in the teacher's dtype."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.logits)

    def lookup(self, index: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The cached logits of every sample of the batch, stacked; None when any is missing."""
        rows = [self.logits.get(i) for i in index.tolist()]
        if any(row is None for row in rows):
            return None
        return torch.stack(rows).to(device)

    def store(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        for i, row in zip(index.tolist(), logits.detach().cpu()):
            self.logits[i] = row


def augmenting_steps(datamodule: Any) -> list[str]:
    """Names of the random steps in the train split's transform and of its batch mixer (image data:
    ``ImageDataset.transform`` and ``.mixer``); empty when there are none or the data has no transform
    (tokenised text)."""
    split_dataset = getattr(datamodule, "split_dataset", None)
    if split_dataset is None:
        return []
    dataset = split_dataset("train")
    transform = getattr(dataset, "transform", None)
    steps = list(getattr(transform, "transforms", [transform] if transform is not None else []))
    mixer = getattr(dataset, "mixer", None)
    names = [type(step).__name__ for step in steps]
    random = [name for name in names if any(marker in name for marker in AUGMENTING)]
    return random + ([repr(mixer)] if mixer is not None else [])
