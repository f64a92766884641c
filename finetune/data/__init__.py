"""Data modules: classification of text (tables or Hugging Face datasets) and images (folders or tables),
tagged sentences (token classification), instruction conversations and preference pairs for causal LMs,
and source/target pairs for encoder-decoder models.

Attributes are imported on first access, so ``import finetune.data`` stays cheap (no torch, lightning,
pandas) and ``python -m finetune --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune._lazy import lazy_attributes

if TYPE_CHECKING:
    from finetune.data.classification import ClassificationData
    from finetune.data.image import ImageClassificationData
    from finetune.data.instructions import InstructionData
    from finetune.data.preferences import PreferenceData
    from finetune.data.seq2seq import Seq2SeqData
    from finetune.data.tables import read_table
    from finetune.data.tagging import TokenTaggingData
    from finetune.data.text import TextClassificationData

_HOMES = {
    "ClassificationData": "finetune.data.classification",
    "ImageClassificationData": "finetune.data.image",
    "InstructionData": "finetune.data.instructions",
    "PreferenceData": "finetune.data.preferences",
    "Seq2SeqData": "finetune.data.seq2seq",
    "TextClassificationData": "finetune.data.text",
    "TokenTaggingData": "finetune.data.tagging",
    "read_table": "finetune.data.tables",
}

__all__ = [
    "ClassificationData",
    "ImageClassificationData",
    "InstructionData",
    "PreferenceData",
    "Seq2SeqData",
    "TextClassificationData",
    "TokenTaggingData",
    "read_table",
]


__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
