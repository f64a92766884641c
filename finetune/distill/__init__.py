"""Knowledge distillation: a frozen teacher's logits (and features) added to a finetune task's loss.

``Distillation`` is the callback (recipe: ``trainer.callbacks``); the losses and loss terms are in
``finetune.distill.losses``, the teacher's loading and checks in ``finetune.distill.teacher``.
"""

from finetune.distill.callback import Distillation
from finetune.distill.losses import FeatureMatch, kd_per_item

__all__ = ["Distillation", "FeatureMatch", "kd_per_item"]
