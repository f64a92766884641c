"""The teacher: loaded from a run folder, an export folder or a backbone spec; frozen, in eval mode,
optionally in lower precision; its inputs adapted to its own image preprocessing."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune import runs
from finetune.backbones import Backbone, BackboneLoader
from finetune.backbones.base import PixelStatistics
from finetune.backbones.hf import hidden_features
from finetune.batch import model_inputs
from finetune.distill.losses import KEY, TeacherOutputs
from finetune.dtypes import DTYPES
from finetune.errors import RecipeError
from finetune.paths import is_local_path, resolve_path
from finetune.tasks.loss_terms import TeacherKind

log = logging.getLogger(__name__)

TEACHER_KEY = f"{KEY}.teacher"


@dataclass
class Teacher:
    """A frozen model and what is needed to feed it the student's batches.

    ``labels`` are the class names its head was trained on (None when unknown: a backbone spec);
    ``causal_lm`` says whether it is a language model (token logits) or a classifier.
    """

    model: nn.Module
    loader: BackboneLoader
    backbone: Backbone
    labels: list[str] | None
    causal_lm: bool
    dtype: torch.dtype | None = None
    pixels: PixelAdapter | None = field(default=None, repr=False)

    def freeze(self) -> None:
        """No gradients, eval mode (dropout off), in ``dtype`` when given."""
        self.model.requires_grad_(False)
        if self.dtype is not None:
            self.model.to(self.dtype)
        self.model.eval()

    @torch.no_grad()
    def outputs(self, batch: Mapping[str, Any], names: tuple[str, ...]) -> TeacherOutputs:
        """Logits and the named features for ``batch`` (a batch of the student's data)."""
        if self.causal_lm:
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
            output = self.model(**inputs, use_cache=False, output_hidden_states=bool(names))
            features = hidden_features(output.hidden_states, inputs.get("attention_mask"), names)
            return TeacherOutputs(output.logits, features)
        inputs = model_inputs(batch)
        if "pixel_values" in inputs and self.pixels is not None:
            inputs["pixel_values"] = self.pixels(inputs["pixel_values"])
        inputs = {key: self._cast(value) for key, value in inputs.items()}
        logits, features = self.loader.features(self.model, inputs, names)
        return TeacherOutputs(logits, features)

    def _cast(self, value: Any) -> Any:
        if self.dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        return value


class PixelAdapter:
    """Re-preprocess the student's pixel tensors for the teacher: undo the student's normalisation,
    resize to the teacher's input size, apply the teacher's normalisation."""

    def __init__(self, student: PixelStatistics, teacher: PixelStatistics) -> None:
        self.student = student
        self.teacher = teacher

    @property
    def identity(self) -> bool:
        return self.student == self.teacher

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return pixels

        def column(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)

        image = pixels * column(self.student.std) + column(self.student.mean)
        if tuple(image.shape[-2:]) != tuple(self.teacher.size):
            image = F.interpolate(image, size=self.teacher.size, mode="bilinear", antialias=True)
        return (image - column(self.teacher.mean)) / column(self.teacher.std)


def load_teacher(
    source: str | Backbone | Mapping[str, Any],
    kind: TeacherKind,
    student_labels: list[str] | None,
    dtype: str | None = None,
    student: type | None = None,
) -> Teacher:
    """The teacher named by ``source``, frozen, as a model of ``kind``: a run folder
    (``runs/<recipe>/version_N``: its best checkpoint, any strategy; it must have trained a ``student`` task
    when given), an export folder (a plain timm/Hugging Face folder, with ``labels.json`` for a classifier),
    or a backbone spec (``timm:NAME``, ``hf:ID``, a folder), loaded with a head for ``student_labels``."""
    try:
        if isinstance(source, str) and is_local_path(source):
            path = resolve_path(source, TEACHER_KEY)
            if (path / runs.CONFIG).is_file():
                teacher = _from_run(path, kind, student)
            else:
                teacher = _from_folder(path, kind, student_labels)
        else:
            teacher = _from_spec(Backbone.of(source), kind, student_labels)
    except RecipeError as error:
        if error.key.startswith(TEACHER_KEY):
            raise
        # The teacher's loading goes through the backbone loaders, whose errors name model.backbone.
        raise RecipeError(TEACHER_KEY, f"{source}: {error.message}") from error
    teacher.dtype = DTYPES[dtype] if dtype is not None else None
    teacher.freeze()
    return teacher


def has_own_labels(source: str | Backbone | Mapping[str, Any]) -> bool:
    """Whether the teacher ``source`` knows its classes: a run folder, or an export folder with
    ``labels.json`` (a backbone spec does not: its head is sized to the student's labels)."""
    if not (isinstance(source, str) and is_local_path(source)):
        return False
    path = resolve_path(source, TEACHER_KEY)
    return (path / runs.CONFIG).is_file() or (path / "labels.json").is_file()


def _from_run(path: Path, kind: TeacherKind, student: type | None) -> Teacher:
    try:
        task = runs.load_run(path)
    except RecipeError as error:
        raise RecipeError(TEACHER_KEY, error.message) from error
    trained = type(task)
    if trained.teacher_kind != kind or (student is not None and trained.__name__ != student.__name__):
        wanted = student.__name__ if student is not None else f"a {kind}"
        raise RecipeError(
            TEACHER_KEY, f"the run {path} trained a {trained.__name__}, not {wanted} as the student is"
        )
    labels = getattr(task, "labels", None)
    return Teacher(task.model, task.loader, task.backbone, labels, kind == "causal_lm")


def _from_folder(path: Path, kind: TeacherKind, student_labels: list[str] | None) -> Teacher:
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise RecipeError(
            TEACHER_KEY,
            f"{path} holds adapters only; give the run folder, or export it with --merge first",
        )
    if (path / "targets.json").is_file():
        # A regression export outputs the targets' units; the student learns standardised targets.
        raise RecipeError(
            TEACHER_KEY, f"{path} is a regression export, in the targets' units; give its run folder instead"
        )
    backbone = Backbone(name=str(path))
    loader, _ = backbone.resolve()
    if kind == "causal_lm":
        return Teacher(backbone.load_causal_lm(), loader, backbone, None, True)
    labels_file = path / "labels.json"
    if not labels_file.is_file():
        return _from_spec(backbone, kind, student_labels)
    labels = [str(label) for label in json.loads(labels_file.read_text(encoding="utf-8"))]
    model = backbone.load_classifier(labels, per_token=kind == "token_classifier").model
    return Teacher(model, loader, backbone, labels, False)


def _from_spec(backbone: Backbone, kind: TeacherKind, student_labels: list[str] | None) -> Teacher:
    loader, _ = backbone.resolve()
    if kind == "causal_lm":
        return Teacher(backbone.load_causal_lm(), loader, backbone, None, True)
    log.warning(
        "Distillation: teacher %s has no labels of its own; its head is the checkpoint's only where that "
        "head was trained for these %d classes (else it is new and random). Distil from a fine-tuned run "
        "or export folder.",
        backbone.name,
        len(student_labels or ()),
    )
    model = backbone.load_classifier(student_labels or [], per_token=kind == "token_classifier").model
    return Teacher(model, loader, backbone, None, False)


def check_labels(teacher: Teacher, student_labels: list[str]) -> None:
    """RecipeError unless the teacher's classes are the student's, in the same order."""
    if teacher.labels is None or teacher.labels == student_labels:
        return
    if len(teacher.labels) != len(student_labels):
        raise RecipeError(
            TEACHER_KEY,
            f"the teacher has {len(teacher.labels)} classes {teacher.labels} but the student (model.labels / "
            f"data.labels) has {len(student_labels)} {student_labels}; distil from a teacher trained on the "
            "same classes",
        )
    raise RecipeError(
        TEACHER_KEY,
        f"the teacher's classes {teacher.labels} differ from the student's (model.labels / data.labels) "
        f"{student_labels}; set data.labels to the teacher's order, or use a teacher trained on these classes",
    )


def check_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """RecipeError unless both tokenizers map the same tokens to the same ids."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])
    example = ", ".join(repr(token) for token, _ in differing[:3])
    raise RecipeError(
        TEACHER_KEY,
        f"the teacher's tokenizer ({len(teacher_vocab)} tokens) differs from the student's model.backbone "
        f"tokenizer ({len(student_vocab)} tokens), e.g. at {example}; distillation on token ids needs one "
        "tokenizer: pick a teacher and student of one model family",
    )
