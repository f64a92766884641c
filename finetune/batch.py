"""The batch contract between data modules and tasks.

A batch is a dict of model inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...) plus two keys that
are not model inputs: ``labels`` (targets; absent for unlabelled data) and ``index`` (each row's position
in its split, so predictions join back to their rows and a teacher cache can key on rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LABELS = "labels"
INDEX = "index"
NOT_MODEL_INPUTS = (INDEX, LABELS)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without what is not a model input (``labels``, ``index``)."""
    return {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}
