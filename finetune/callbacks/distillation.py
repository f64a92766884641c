"""``Distillation`` among the callbacks (``finetune.callbacks.Distillation`` in recipes); it lives in
``finetune.distill``."""

from finetune.distill import Distillation, FeatureMatch

__all__ = ["Distillation", "FeatureMatch"]
