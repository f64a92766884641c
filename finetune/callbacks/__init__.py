"""Callbacks anyone can add to their own ``Trainer``."""

from finetune.callbacks.export import ExportModel
from finetune.callbacks.predictions import PredictionWriter
from finetune.callbacks.report import MetricsReport, ParameterReport
from finetune.callbacks.rng import RestoreRNG

__all__ = ["ExportModel", "MetricsReport", "ParameterReport", "PredictionWriter", "RestoreRNG"]
