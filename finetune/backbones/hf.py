"""Hugging Face transformers backbones: text and image classification through the Auto classes."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune.backbones.base import KEY, LOADERS, Backbone, Classifier
from finetune.errors import RecipeError

HUB_HINT = "pass a local folder, or download it once and set HF_HUB_OFFLINE=1"


def _hub_kwargs(backbone: Backbone) -> dict[str, Any]:
    return {"revision": backbone.revision, "trust_remote_code": backbone.trust_remote_code}


def _reading(source: str, what: str, load: Callable[[], Any]) -> Any:
    """Run ``load``; turn the hub's long network/file errors into one recipe error."""
    try:
        return load()
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(KEY, f"could not load the {what} of {source!r} ({first}); {HUB_HINT}") from error


class HFLoader:
    """Loads ``AutoModelFor{Sequence,Image}Classification`` with a new head sized to the labels."""

    family = "hf"

    def claims(self, path: Path) -> bool:
        config = path / "config.json"
        return config.is_file() and "model_type" in json.loads(config.read_text())

    def load_classifier(self, source: str, backbone: Backbone, labels: list[str]) -> Classifier:
        from transformers import AutoConfig

        config = _reading(
            source,
            "config",
            lambda: AutoConfig.from_pretrained(
                source,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                **_hub_kwargs(backbone),
            ),
        )
        auto = self._auto_class(config)
        if backbone.pretrained:
            model = _reading(
                source,
                "weights",
                lambda: auto.from_pretrained(
                    source, config=config, ignore_mismatched_sizes=True, **_hub_kwargs(backbone)
                ),
            )
        else:
            model = auto.from_config(config, trust_remote_code=backbone.trust_remote_code)
        return Classifier(model=model, head=self._head(model))

    @staticmethod
    def _auto_class(config: Any) -> Any:
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            return AutoModelForImageClassification
        return AutoModelForSequenceClassification

    @staticmethod
    def _head(model: Any) -> tuple[str, ...]:
        # Every *For*Classification model is `base_model` plus head modules beside it (classifier, score, ...).
        base = getattr(model, "base_model_prefix", "")
        return tuple(
            name
            for name, child in model.named_children()
            if name != base and any(True for _ in child.parameters())
        )

    def logits(self, model: Any, batch: Mapping[str, Any]) -> Any:
        return model(**batch).logits

    def tokenizer(self, source: str, backbone: Backbone) -> Any:
        from transformers import AutoTokenizer

        return _reading(
            source, "tokenizer", lambda: AutoTokenizer.from_pretrained(source, **_hub_kwargs(backbone))
        )

    def image_transform(self, source: str, backbone: Backbone, train: bool) -> Callable[[Any], Any]:
        from transformers import AutoImageProcessor

        processor = _reading(
            source,
            "image processor",
            lambda: AutoImageProcessor.from_pretrained(source, **_hub_kwargs(backbone)),
        )
        return _ProcessorTransform(processor)

    def export(self, model: Any, directory: Path, labels: list[str], backbone: Backbone) -> None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(directory)
        _, source = backbone.resolve()
        preprocessor = self._preprocessor(source, backbone)
        if preprocessor is not None:
            preprocessor.save_pretrained(directory)

    def _preprocessor(self, source: str, backbone: Backbone) -> Any:
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source, **_hub_kwargs(backbone))
        except (OSError, ValueError):
            return None


LOADERS.register("hf")(HFLoader())


class _ProcessorTransform:
    """PIL image -> pixel tensor through a Hugging Face image processor (picklable for worker processes)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> Any:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
