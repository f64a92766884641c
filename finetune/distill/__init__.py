"""Knowledge distillation: a frozen teacher's logits (and features) added to the loss of a finetune task, or
of your own module through ``finetune.LossTermsMixin``.

``Distillation`` is the callback (recipe: ``trainer.callbacks``); the losses and loss terms are in
``finetune.distill.losses``, the teacher's loading and checks in ``finetune.distill.teacher``, what it
reads of the student in ``finetune.distill.student``.
"""

from finetune.distill.callback import Distillation
from finetune.distill.losses import FeatureMatch, kd_per_item

__all__ = ["Distillation", "FeatureMatch", "kd_per_item"]
