"""Callbacks anyone can add to their own ``Trainer``.

Attributes are imported on first access (``finetune.callbacks.GradualUnfreezing``), so importing the
package costs nothing until a callback is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune._lazy import lazy_attributes

if TYPE_CHECKING:
    from finetune.callbacks.accumulation import ScheduledAccumulation
    from finetune.callbacks.averaging import EMA
    from finetune.callbacks.checkpoint_io import AtomicCheckpointIO
    from finetune.callbacks.export import ExportModel
    from finetune.callbacks.nonfinite import StopOnNonFinite
    from finetune.callbacks.predictions import PredictionWriter
    from finetune.callbacks.preemption import Preemption
    from finetune.callbacks.report import MetricsReport, ParameterReport
    from finetune.callbacks.rng import RestoreRNG
    from finetune.callbacks.run_report import RunReport
    from finetune.callbacks.trackers import TrackRun
    from finetune.callbacks.unfreeze import GradualUnfreezing
    from finetune.distill import Distillation, FeatureMatch

_HOMES = {
    "AtomicCheckpointIO": "finetune.callbacks.checkpoint_io",
    "Distillation": "finetune.distill",
    "EMA": "finetune.callbacks.averaging",
    "ExportModel": "finetune.callbacks.export",
    "FeatureMatch": "finetune.distill",
    "GradualUnfreezing": "finetune.callbacks.unfreeze",
    "MetricsReport": "finetune.callbacks.report",
    "ParameterReport": "finetune.callbacks.report",
    "PredictionWriter": "finetune.callbacks.predictions",
    "Preemption": "finetune.callbacks.preemption",
    "StopOnNonFinite": "finetune.callbacks.nonfinite",
    "TrackRun": "finetune.callbacks.trackers",
    "RestoreRNG": "finetune.callbacks.rng",
    "RunReport": "finetune.callbacks.run_report",
    "ScheduledAccumulation": "finetune.callbacks.accumulation",
}

__all__ = [
    "AtomicCheckpointIO",
    "Distillation",
    "EMA",
    "ExportModel",
    "FeatureMatch",
    "GradualUnfreezing",
    "MetricsReport",
    "ParameterReport",
    "Preemption",
    "PredictionWriter",
    "RestoreRNG",
    "RunReport",
    "ScheduledAccumulation",
    "StopOnNonFinite",
    "TrackRun",
]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
