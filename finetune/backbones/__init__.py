"""Pretrained backbones: where a model comes from, and the loader (timm or Hugging Face) that reads it.

A backbone is named by prefix: ``timm:resnet18``, ``hf:bert-base-uncased``, or a local folder
(``pkg://package/dir`` too) whose ``config.json`` says which loader owns it. Loaders live in a registry,
so a new family plugs in without touching the others. Loader modules import their libraries lazily.
"""

from finetune.backbones import hf, timm  # noqa: F401  (registers the loaders)
from finetune.backbones.base import LOADERS, Backbone, BackboneLoader, Classifier

__all__ = ["LOADERS", "Backbone", "BackboneLoader", "Classifier"]
