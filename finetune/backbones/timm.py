"""timm backbones: any ``timm.create_model`` name, a local weights file, or a timm export folder."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.backbones.base import KEY, LOADERS, Backbone, Classifier, ImageConfig, check_feature
from finetune.errors import RecipeError, first_line, require
from finetune.paths import resolve_path

if TYPE_CHECKING:
    from finetune.backbones.heads import Head


def _check_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise RecipeError(KEY, f"timm has no model named {name!r}{hint}")


class TimmLoader:
    """Loads a timm model with its classifier reset to the labels; preprocessing from timm's data config."""

    family = "timm"

    def claims(self, path: Path) -> bool:
        config = path / "config.json"
        return config.is_file() and "architecture" in json.loads(config.read_text())

    def _create(self, source: str, checkpoint: str | None, **kwargs: Any) -> Any:
        import timm

        is_folder = Path(source).is_dir()
        if not is_folder:
            _check_name(source)
        name = f"local-dir:{source}" if is_folder else source
        if checkpoint:
            weights = resolve_path(checkpoint, "model.backbone.checkpoint")
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        try:
            return timm.create_model(name, **kwargs)
        except (OSError, RuntimeError) as error:
            raise RecipeError(
                KEY,
                f"could not load timm weights for {source!r} ({first_line(error)}); give `checkpoint:` a local file",
            ) from error

    def load_classifier(
        self,
        source: str,
        backbone: Backbone,
        labels: list[str],
        options: Mapping[str, Any],
        per_token: bool = False,
        head: Head | None = None,
    ) -> Classifier:
        if per_token:
            raise RecipeError(
                KEY,
                f"timm:{source} classifies whole images; token classification needs a Hugging Face encoder",
            )
        if options:
            raise RecipeError(
                "model.strategy",
                f"this strategy loads the backbone with {', '.join(sorted(options))}, which needs a Hugging "
                "Face model; timm models load unquantised (use lora)",
            )
        pretrained = backbone.pretrained or bool(backbone.checkpoint)
        model = self._create(
            source, backbone.checkpoint, pretrained=pretrained, num_classes=len(labels), **_head_args(head)
        )
        head = model.get_classifier()
        names = tuple(name for name, module in model.named_modules() if module is head)
        return Classifier(model=model, head=names)

    def logits(self, model: Any, batch: Mapping[str, Any]) -> Any:
        return model(batch["pixel_values"])

    def features(
        self, model: Any, batch: Mapping[str, Any], names: tuple[str, ...]
    ) -> tuple[Any, dict[str, Any]]:
        for name in names:
            check_feature(name, self.family)
        if not names:
            return self.logits(model, batch), {}
        # timm's contract: forward = forward_head(forward_features(x)), and the classifier reads pre-logits.
        pooled = model.forward_head(model.forward_features(batch["pixel_values"]), pre_logits=True)
        return model.get_classifier()(pooled), {"pooled": pooled}

    def feature_width(self, model: Any, name: str) -> int:
        check_feature(name, self.family)
        return getattr(model, "head_hidden_size", None) or model.num_features

    def image_config(self, source: str, backbone: Backbone) -> ImageConfig:
        import torch
        from timm.data import resolve_data_config

        # Only the model's pretrained_cfg is read: build on the meta device, so no weights are read or allocated.
        with torch.device("meta"):
            model = self._create(source, None, pretrained=False)
        config = resolve_data_config({}, model=model)
        return ImageConfig(
            size=tuple(config["input_size"][1:]),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=config["interpolation"],
            crop_pct=config["crop_pct"],
            crop_mode=config.get("crop_mode", "center"),
            # A ViT built with dynamic_img_size takes any size its pretrained_cfg may call fixed.
            fixed_size=bool(
                model.pretrained_cfg.get("fixed_input_size", False)
                and not getattr(model, "dynamic_img_size", False)
            ),
        )

    def load_causal_lm(self, source: str, backbone: Backbone, options: Mapping[str, Any]) -> Any:
        raise RecipeError(KEY, f"timm model {source!r} is not a language model; give an hf: causal LM")

    def tokenizer(self, source: str, backbone: Backbone) -> Any:
        if not Path(source).is_dir():
            _check_name(source)
        raise RecipeError(
            KEY, f"timm model {source!r} takes images, not text; use finetune.data.ImageClassificationData"
        )

    def export(
        self, model: Any, path: Path, labels: list[str], backbone: Backbone, image: ImageConfig | None = None
    ) -> None:
        from timm.models import save_for_hf

        # data_config lands in config.json's pretrained_cfg, which timm.data.resolve_data_config reads back
        # from a `local-dir:` model: the export preprocesses as validation did.
        save_for_hf(
            model,
            str(path),
            model_config={"num_classes": len(labels), "label_names": list(labels)},
            model_args=_pooling_args(model),
            safe_serialization=True,
            data_config=image.timm_args() if image is not None else None,
        )


LOADERS.register("timm")(TimmLoader())


def _head_args(head: Head | None) -> dict[str, Any]:
    """``timm.create_model`` keywords for the recipe's head: ``global_pool`` and ``drop_rate``."""
    if head is None:
        return {}
    require(
        head.hidden is None,
        "model.head.hidden",
        "timm heads have no hidden layer; leave it unset (or use a Hugging Face image model)",
    )
    args: dict[str, Any] = {"drop_rate": head.dropout}
    if head.pooling is not None:
        args["global_pool"] = head.pooling
    return args


def _pooling_args(model: Any) -> dict[str, Any]:
    """The model's ``global_pool`` (a recipe may have changed it), so that the export rebuilds with it."""
    pooling = getattr(model, "global_pool", None)
    pooling = getattr(pooling, "pool_type", pooling)  # CNNs hold a SelectAdaptivePool2d, ViTs a string
    return {"global_pool": pooling} if isinstance(pooling, str) else {}
