"""Hugging Face transformers backbones: text and image classification, causal and encoder-decoder LMs through the
Auto classes."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.backbones.base import KEY, LOADERS, Backbone, Classifier, ImageConfig, check_feature
from finetune.backbones.heads import (
    Head,
    PooledClassifier,
    load_head_weights,
    saved_head,
    sentence_transformers_pooling,
)
from finetune.errors import RecipeError, first_line

HUB_HINT = "pass a local folder, or download it once and set HF_HUB_OFFLINE=1"


def _hub_kwargs(backbone: Backbone) -> dict[str, Any]:
    return {"revision": backbone.revision, "trust_remote_code": backbone.trust_remote_code}


def _reading(source: str, what: str, load: Callable[[], Any]) -> Any:
    """Run ``load``; turn the hub's long network/file errors into one recipe error."""
    try:
        return load()
    except (OSError, ValueError) as error:
        raise RecipeError(
            KEY, f"could not load the {what} of {source!r} ({first_line(error)}); {HUB_HINT}"
        ) from error


@dataclass(frozen=True)
class LanguageModel:
    """A kind of language model: its transformers Auto class, the name of the mapping of the model types
    that class loads (``transformers.models.auto.modeling_auto``), and how errors name the kind."""

    auto: str
    model_types: str
    what: str


LANGUAGE_MODELS = {
    "causal": LanguageModel(
        "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal language model"
    ),
    "seq2seq": LanguageModel(
        "AutoModelForSeq2SeqLM",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "encoder-decoder language model (such as T5 or BART)",
    ),
}


class HFLoader:
    """Loads ``AutoModelFor{Sequence,Image,Token}Classification`` with a new head sized to the labels."""

    family = "hf"

    def claims(self, path: Path) -> bool:
        config = path / "config.json"
        return config.is_file() and "model_type" in json.loads(config.read_text())

    def load_classifier(
        self,
        source: str,
        backbone: Backbone,
        labels: list[str],
        options: Mapping[str, Any],
        per_token: bool = False,
        head: Head | None = None,
    ) -> Classifier:
        """The model's own ``*ForSequence/Image/TokenClassification`` head, or a ``PooledClassifier`` when
        the recipe gives a ``head`` or the folder carries one (a sentence-transformers pooling, or the
        ``head.json`` of an export, whose trained head is loaded when its labels are these)."""
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
        saved = saved_head(Path(source)) if Path(source).is_dir() else None
        pooling = None if per_token else self._pooling(source, backbone, head, saved)
        if pooling is None:
            auto = self._auto_class(config, per_token)
            options = self._heads_unquantised(auto, config, backbone, options)
            model = self._load(auto, source, config, backbone, options, ignore_mismatched_sizes=True)
            return Classifier(model=model, head=self._head(model))
        from transformers import AutoModel

        spec = head or Head(hidden=saved.get("hidden") if saved else None)
        encoder = self._load(AutoModel, source, config, backbone, options, **_without_pooler(config, pooling))
        model = PooledClassifier(encoder, len(labels), spec, pooling)
        if saved is not None and saved.get("labels") == labels and backbone.pretrained:
            load_head_weights(model, Path(source))
        return Classifier(model=model, head=("head",))

    def _pooling(
        self, source: str, backbone: Backbone, head: Head | None, saved: dict[str, Any] | None
    ) -> str | None:
        """The pooling of a ``PooledClassifier``: the recipe's, else an export's or a sentence-transformers
        model's own; None keeps the model's own classification head."""
        if head is not None:
            head.check_pooling("Hugging Face")
        if head is not None and head.pooling is not None:
            return head.pooling
        found = saved.get("pooling") if saved else self._sentence_transformers_pooling(source, backbone)
        if found is None and head is not None:
            return "cls"  # dropout or a hidden layer asked for, on the first token as BERT's head reads it
        return found

    @staticmethod
    def _sentence_transformers_pooling(source: str, backbone: Backbone) -> str | None:
        from transformers.utils import cached_file

        def read(name: str) -> Any:
            path = cached_file(
                source, name, _raise_exceptions_for_missing_entries=False, **_hub_kwargs(backbone)
            )
            return json.loads(Path(path).read_text(encoding="utf-8")) if path else {}

        try:
            modules = read("modules.json")
        except (OSError, ValueError):
            return None  # no hub access: the model's own head
        return sentence_transformers_pooling(modules or [], read)

    def load_causal_lm(self, source: str, backbone: Backbone, options: Mapping[str, Any]) -> Any:
        return self._load_lm(LANGUAGE_MODELS["causal"], source, backbone, options)

    def load_seq2seq_lm(self, source: str, backbone: Backbone, options: Mapping[str, Any]) -> Any:
        return self._load_lm(LANGUAGE_MODELS["seq2seq"], source, backbone, options)

    def _load_lm(
        self, kind: LanguageModel, source: str, backbone: Backbone, options: Mapping[str, Any]
    ) -> Any:
        """A language model with its pretrained LM head; RecipeError when transformers has no model of
        ``kind`` for the config's model type (and the model ships no code of its own for one)."""
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto import modeling_auto

        config = _reading(
            source, "config", lambda: AutoConfig.from_pretrained(source, **_hub_kwargs(backbone))
        )
        own_code = kind.auto in (getattr(config, "auto_map", None) or {})
        if config.model_type not in getattr(modeling_auto, kind.model_types) and not own_code:
            raise RecipeError(
                KEY,
                f"{source!r} is a {config.model_type} model; transformers has no {kind.what} of that type",
            )
        return self._load(getattr(transformers, kind.auto), source, config, backbone, options)

    @staticmethod
    def _load(
        auto: Any, source: str, config: Any, backbone: Backbone, options: Mapping[str, Any], **kwargs: Any
    ) -> Any:
        """``auto.from_pretrained`` with the strategy's ``options``, or random init from ``config``."""
        if backbone.pretrained:
            return _reading(
                source,
                "weights",
                lambda: auto.from_pretrained(
                    source, config=config, **_hub_kwargs(backbone), **kwargs, **options
                ),
            )
        if options:
            raise RecipeError(
                "model.backbone.pretrained",
                f"the strategy loads pretrained weights with {', '.join(sorted(options))}; set pretrained: true",
            )
        return auto.from_config(config, trust_remote_code=backbone.trust_remote_code)

    def _heads_unquantised(
        self, auto: Any, config: Any, backbone: Backbone, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Keep the new head out of quantisation: a 4-bit head could not train (transformers only skips
        the last module and the output embeddings by itself)."""
        options = dict(options)
        quantization = options.get("quantization_config")
        if quantization is None:
            return options
        import torch
        from transformers.quantizers.base import get_keys_to_not_convert

        with torch.device("meta"):  # the module names only: no weights read or allocated
            skeleton = auto.from_config(config, trust_remote_code=backbone.trust_remote_code)
        quantization = copy.copy(quantization)
        quantization.llm_int8_skip_modules = sorted(
            {
                *(quantization.llm_int8_skip_modules or ()),
                *get_keys_to_not_convert(skeleton),
                *self._head(skeleton),
            }
        )
        options["quantization_config"] = quantization
        return options

    @staticmethod
    def _auto_class(config: Any, per_token: bool) -> Any:
        from transformers import (
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        )

        if per_token:
            if config.model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
                raise RecipeError(
                    KEY,
                    f"transformers has no token classification model for {config.model_type!r}; "
                    "use an encoder such as BERT, RoBERTa or DeBERTa",
                )
            return AutoModelForTokenClassification
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

    def features(
        self, model: Any, batch: Mapping[str, Any], names: tuple[str, ...]
    ) -> tuple[Any, dict[str, Any]]:
        output = model(**batch, output_hidden_states=bool(names))
        return output.logits, hidden_features(output.hidden_states, batch.get("attention_mask"), names)

    def feature_width(self, model: Any, name: str) -> int:
        check_feature(name, self.family)
        config = model.config
        return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size

    def image_config(self, source: str, backbone: Backbone) -> ImageConfig:
        return processor_image_config(self._image_processor(source, backbone), source)

    def _image_processor(self, source: str, backbone: Backbone) -> Any:
        from transformers import AutoImageProcessor

        return _reading(
            source,
            "image processor",
            lambda: AutoImageProcessor.from_pretrained(source, **_hub_kwargs(backbone)),
        )

    def tokenizer(self, source: str, backbone: Backbone) -> Any:
        from transformers import AutoTokenizer

        return _reading(
            source, "tokenizer", lambda: AutoTokenizer.from_pretrained(source, **_hub_kwargs(backbone))
        )

    def export(
        self, model: Any, path: Path, labels: list[str], backbone: Backbone, image: ImageConfig | None = None
    ) -> None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        if isinstance(model, PooledClassifier):
            model.encoder.save_pretrained(path)
            model.save_head(path, labels)
        else:
            model.save_pretrained(path)
        _, source = backbone.resolve()
        if image is not None:
            processor_for(self._image_processor(source, backbone), image).save_pretrained(path)
            return
        preprocessor = self._preprocessor(source, backbone)
        if preprocessor is not None:
            preprocessor.save_pretrained(path)

    def _preprocessor(self, source: str, backbone: Backbone) -> Any:
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source, **_hub_kwargs(backbone))
        except (OSError, ValueError):
            return None


LOADERS.register("hf")(HFLoader())


def _without_pooler(config: Any, pooling: str) -> dict[str, Any]:
    """``add_pooling_layer=False`` for base models that take it, unless the head reads the pooler: an unused
    pooler would sit in the model, in the optimizer of partial and LoRA fine-tunes, and in the export."""
    import inspect

    from transformers import MODEL_MAPPING

    if pooling == "pooler" or type(config) not in MODEL_MAPPING:
        return {}
    parameters = inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in parameters else {}


def hidden_features(hidden_states: Any, attention_mask: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The named features (``pooled``, ``hidden.N``; see ``finetune.backbones.base.FEATURES``) out of a
    Hugging Face model's ``hidden_states``; ``pooled`` averages the last one over ``attention_mask``."""
    features = {}
    for name in names:
        check_feature(name, "hf")
        if name == "pooled":
            last = hidden_states[-1]
            if attention_mask is None:
                features[name] = last.mean(dim=1)
            else:
                weights = attention_mask.unsqueeze(-1).to(last.dtype)
                features[name] = (last * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        else:
            features[name] = hidden_states[int(name.partition(".")[2])]
    return features


# PIL resampling filters by their code, as Hugging Face image processors store them (``resample``).
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# ConvNeXt-style processors resize the shorter side to size / crop_pct and crop, below this size only.
CROP_PCT_BELOW = 384


def processor_image_config(processor: Any, source: str) -> ImageConfig:
    """What a Hugging Face image processor does, as an ``ImageConfig``: ``size`` as height/width (resized
    to it, aspect ratio not kept: ``squash``) or as the shorter side (``center``), then an optional centre
    crop to ``crop_size`` (or ConvNeXt's ``crop_pct``), rescaling to [0, 1] and normalising."""
    size, crop = processor.size, processor.crop_size if getattr(processor, "do_center_crop", False) else None
    height, width, side = size.get("height"), size.get("width"), size.get("shortest_edge")
    if height and width:
        resized, mode = (height, width), "squash"
    elif side:
        resized, mode = (side, side), "center"
    else:
        raise RecipeError(KEY, f"the image processor of {source!r} gives no input size (size: {size})")
    out, crop_pct = resized, 1.0
    if crop is not None:
        out = (crop["height"], crop["width"])
        crop_pct = out[0] / resized[0]
    elif getattr(processor, "crop_pct", None) and side and side < CROP_PCT_BELOW:
        crop_pct = processor.crop_pct
    if not getattr(processor, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    return ImageConfig(
        size=tuple(out),
        mean=mean,
        std=std,
        interpolation=_filter_name(processor.resample),
        crop_pct=crop_pct,
        crop_mode=mode,
    )


def _filter_name(resample: Any) -> str:
    """A processor's ``resample`` (a PIL code, or a torchvision interpolation mode) as a filter name."""
    value = getattr(resample, "value", resample)
    return value if isinstance(value, str) else RESAMPLE.get(int(value), "bilinear")


def processor_for(processor: Any, image: ImageConfig) -> Any:
    """An image processor of ``processor``'s kind that prepares images as ``image`` says (what the export
    saves); a ConvNeXt-style processor that cannot say it becomes a ``BitImageProcessor`` (shorter side,
    centre crop)."""
    from transformers import BitImageProcessor

    height, width = image.size
    resized = (math.floor(height / image.crop_pct), math.floor(width / image.crop_pct))
    settings: dict[str, Any] = {
        "do_resize": True,
        "resample": next(code for code, name in RESAMPLE.items() if name == image.interpolation),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
    }
    kind = type(processor)
    if getattr(processor, "crop_pct", None) is not None:
        if image.crop_mode == "center" and height == width and height < CROP_PCT_BELOW:
            return kind.from_dict(
                processor.to_dict()
                | settings
                | {"size": {"shortest_edge": height}, "crop_pct": image.crop_pct}
            )
        kind = BitImageProcessor
    if image.crop_mode == "squash":
        settings["size"] = {"height": resized[0], "width": resized[1]}
    else:
        settings["size"] = {"shortest_edge": min(resized)}
    settings["do_center_crop"] = resized != (height, width) or image.crop_mode != "squash"
    settings["crop_size"] = {"height": height, "width": width}
    base = processor.to_dict() if kind is type(processor) else {}
    return kind.from_dict(base | settings)
