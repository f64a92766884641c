"""Callbacks anyone can add to their own ``Trainer``."""

from finetune.callbacks.accumulation import ScheduledAccumulation
from finetune.callbacks.distillation import Distillation
from finetune.callbacks.export import ExportModel
from finetune.callbacks.predictions import PredictionWriter
from finetune.callbacks.report import MetricsReport, ParameterReport
from finetune.callbacks.rng import RestoreRNG
from finetune.callbacks.unfreeze import GradualUnfreezing

__all__ = [
    "Distillation",
    "ExportModel",
    "GradualUnfreezing",
    "MetricsReport",
    "ParameterReport",
    "PredictionWriter",
    "RestoreRNG",
    "ScheduledAccumulation",
]
