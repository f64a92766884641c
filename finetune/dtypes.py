"""Floating-point dtypes by the names recipes use (``compute_dtype``, ``teacher_dtype``)."""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
