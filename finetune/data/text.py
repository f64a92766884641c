"""Text classification data: table files or a Hugging Face ``datasets`` dataset, tokenised for the backbone."""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

import pandas as pd
import torch

from finetune.data.classification import ClassificationData, NamedTable, RowDataset
from finetune.errors import RecipeError, first_line, require
from finetune.paths import is_local_path, resolve_path

logger = logging.getLogger(__name__)

# Our split names -> the split names Hugging Face datasets use.
DATASET_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class TokenizedDataset(RowDataset):
    """Rows tokenised up front; batches are padded to their longest row (dynamic padding)."""

    def __init__(self, encodings: dict[str, list[Any]], tokenizer: Any, label_ids: list[int] | None) -> None:
        from transformers import DataCollatorWithPadding

        super().__init__(len(next(iter(encodings.values()))), label_ids)
        self.encodings = encodings
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def inputs(self, row: int) -> dict[str, Any]:
        return {name: values[row] for name, values in self.encodings.items()}

    def collate_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.pad(items))


class TextClassificationData(ClassificationData):
    """Classify texts (or text pairs) from table columns."""

    def __init__(
        self,
        text_column: str = "text",
        text_pair_column: str | None = None,
        max_length: int = 128,
        dataset: str | None = None,
        dataset_config: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            text_column: column holding the text.
            text_pair_column: column holding a second text, for sentence-pair tasks (e.g. entailment).
            max_length: truncate tokenised texts to this many tokens.
            dataset: a Hugging Face ``datasets`` name or local dataset folder; its train/validation/test
                splits are used for the splits not given as files.
            dataset_config: the dataset's configuration (subset) name, if it has several.
        """
        super().__init__(**kwargs)
        require(max_length > 0, "data.max_length", f"must be 1 or more, got {max_length}")
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.max_length = max_length
        self.dataset = dataset
        self.dataset_config = dataset_config

    def input_columns(self) -> dict[str, str]:
        columns = {"data.text_column": self.text_column}
        if self.text_pair_column is not None:
            columns["data.text_pair_column"] = self.text_pair_column
        return columns

    def read_split(self, split: str) -> NamedTable | None:
        if self.sources[split] is not None or self.dataset is None or split not in DATASET_SPLITS:
            return super().read_split(split)
        name = DATASET_SPLITS[split]
        if name not in self._hf_dataset:
            return None
        return NamedTable(_to_frame(self._hf_dataset[name], self.label_column), f"{self.dataset}[{name}]")

    @cached_property
    def _hf_dataset(self) -> Any:
        """The ``datasets.DatasetDict`` named by ``dataset``, loaded once."""
        import datasets

        name = self.dataset
        source = str(resolve_path(name, "data.dataset")) if is_local_path(name) else name
        try:
            loaded = datasets.load_dataset(source, self.dataset_config)
        except (datasets.exceptions.DatasetsError, OSError, ConnectionError, ValueError) as error:
            raise RecipeError(
                "data.dataset",
                f"cannot load {name!r} ({first_line(error)}); give a local dataset folder or a cached dataset name",
            ) from error
        logger.info("loaded dataset %s with splits %s", name, ", ".join(loaded))
        return loaded

    @cached_property
    def tokenizer(self) -> Any:
        return self.backbone_spec().tokenizer()

    def make_dataset(self, rows: pd.DataFrame, split: str, label_ids: list[int] | None) -> TokenizedDataset:
        texts = _strings(rows[self.text_column])
        pairs = None if self.text_pair_column is None else _strings(rows[self.text_pair_column])
        # Never truncate beyond what the model accepts; tokenizers without a limit report a huge number.
        length = min(self.max_length, self.tokenizer.model_max_length)
        encodings = self.tokenizer(texts, pairs, truncation=True, max_length=length)
        return TokenizedDataset(dict(encodings), self.tokenizer, label_ids)


def _strings(column: pd.Series) -> list[str]:
    # Empty cells read as NaN; they are empty texts, not missing rows.
    return column.fillna("").astype(str).tolist()


def _to_frame(split: Any, label_column: str) -> pd.DataFrame:
    """A ``datasets.Dataset`` as a DataFrame, with ClassLabel ids turned into their names."""
    from datasets import ClassLabel

    frame = split.to_pandas()
    feature = split.features.get(label_column)
    if isinstance(feature, ClassLabel):
        # -1 marks an unlabelled row (e.g. GLUE test splits).
        frame[label_column] = [feature.names[i] if i >= 0 else None for i in frame[label_column]]
    return frame
