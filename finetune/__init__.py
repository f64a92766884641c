"""finetune: recipe-driven fine-tuning of timm and Hugging Face models on PyTorch Lightning.

Everything is importable from here for use in your own ``Trainer``; heavy libraries load on first use,
so ``import finetune`` stays fast.
"""

from __future__ import annotations

from finetune._lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "finetune.backbones",
    "RecipeError": "finetune.errors",
    "ClassificationTask": "finetune.tasks",
    "SFTTask": "finetune.tasks",
    "TokenClassificationTask": "finetune.tasks",
    "MultiLabelClassificationTask": "finetune.tasks",
    "RegressionTask": "finetune.tasks",
    "PreferenceTask": "finetune.tasks",
    "Seq2SeqTask": "finetune.tasks",
    "PreferenceData": "finetune.data",
    "Seq2SeqData": "finetune.data",
    "TokenTaggingData": "finetune.data",
    "InstructionData": "finetune.data",
    "TextClassificationData": "finetune.data",
    "ImageClassificationData": "finetune.data",
    "Strategy": "finetune.strategies",
    "Full": "finetune.strategies",
    "Freeze": "finetune.strategies",
    "Partial": "finetune.strategies",
    "LoRA": "finetune.strategies",
    "QLoRA": "finetune.strategies",
    "ExportModel": "finetune.callbacks",
    "MetricsReport": "finetune.callbacks",
    "ParameterReport": "finetune.callbacks",
    "PredictionWriter": "finetune.callbacks",
    "RunReport": "finetune.callbacks",
    "EMA": "finetune.callbacks",
    "RestoreRNG": "finetune.callbacks",
    "GradualUnfreezing": "finetune.callbacks",
    "Distillation": "finetune.callbacks",
    "FeatureMatch": "finetune.distill",
    "ScheduledAccumulation": "finetune.callbacks",
    "OptimizerConfig": "finetune.optim",
    "ParamGroup": "finetune.optim",
    "ScheduleConfig": "finetune.optim",
    "TokenNormalizedLoss": "finetune.optim.token_loss",
    "LossTermsMixin": "finetune.tasks.loss_terms",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
