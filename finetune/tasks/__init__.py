"""LightningModules, one per task, on a shared base (backbone + strategy + optimizer)."""

from finetune.tasks.base import FinetuneTask
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.multilabel import MultiLabelClassificationTask
from finetune.tasks.preference import PreferenceTask
from finetune.tasks.regression import RegressionTask
from finetune.tasks.seq2seq import Seq2SeqTask
from finetune.tasks.sft import SFTTask
from finetune.tasks.token_classification import TokenClassificationTask

__all__ = [
    "ClassificationTask",
    "FinetuneTask",
    "MultiLabelClassificationTask",
    "PreferenceTask",
    "RegressionTask",
    "Seq2SeqTask",
    "SFTTask",
    "TokenClassificationTask",
]
