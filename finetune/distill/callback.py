"""``Distillation``: a Lightning callback that distils a frozen teacher into a finetune task or your own
``LightningModule`` (through ``finetune.LossTermsMixin``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.base import check_feature
from finetune.distill.cache import TeacherCache, augmenting_steps
from finetune.distill.losses import KEY, FeatureKD, FeatureMatch, LogitKD, TeacherOutputs
from finetune.distill.student import ModuleStudent, TaskStudent, student_of
from finetune.distill.teacher import (
    PixelAdapter,
    Teacher,
    check_labels,
    check_vocabulary,
    has_own_labels,
    load_teacher,
)
from finetune.dtypes import DtypeName
from finetune.errors import RecipeError
from finetune.tasks.loss_terms import LossTermsMixin

log = logging.getLogger(__name__)


class Distillation(pl.Callback):
    """Knowledge distillation from a frozen teacher into the module being trained (the student).

    The training loss becomes ``alpha · task_loss + (1 - alpha) · T² · KL(softmax(teacher/T) ‖
    softmax(student/T))`` plus, with ``features``, ``Σ weight · loss(projection(student feature), teacher
    feature)``. Logged as ``train/task_loss``, ``train/kd_loss`` (the added ``(1 - alpha) · T² · KL``),
    ``train/feature_loss`` and ``train/loss`` (the total). For an ``SFTTask`` the KL is per token, over the
    vocabulary, on response tokens only, summed and normalised with the task loss per response token.

    Contract: the module inherits ``finetune.LossTermsMixin`` (every finetune task does; so can your own
    ``LightningModule``: list it first among the bases and return ``self.total_loss(logits=..., batch=...,
    task_loss=...)`` from ``training_step``). From the mixin, overridable: ``teacher_kind`` (the teacher is
    loaded as that kind of model: ``classifier`` by default; ``ClassificationTask``, ``SFTTask`` ... say
    theirs), ``distillation_loss`` (the per-item loss between student and teacher logits, ``T² · KL`` for
    softmax outputs) and ``teacher_inputs(batch)`` (the teacher's inputs: the batch, a dict of model
    inputs, by default). The callback adds its loss terms through ``add_loss_term`` (see
    ``finetune.tasks.loss_terms``) in ``setup``, which builds the student first. Your module's ``labels``
    (class names in index order), when it has them, are checked against the teacher's; without them the
    teacher must bring its own (a run or export folder). Feature matches on your module read its network
    ``module`` (a timm or Hugging Face model) through hooks, with the same feature names.

    The teacher is *not* a submodule of the student: it is never in the optimizer or in a checkpoint,
    ``module.train()`` never reaches it (it stays in eval mode, dropout off), and it runs under ``no_grad``
    once per batch, in ``teacher_dtype`` when given. A feature projection *is* a submodule
    (``loss_modules.feature``): it trains, is checkpointed for resuming, and is not exported.

    Checks in ``setup``: a classifier teacher's classes equal the student's (names and order); on text and
    causal LMs the tokenizers are the same (the teacher reads the student's token ids); feature names
    exist for each model's family. Images are re-normalised and resized for the teacher's preprocessing.

    Args:
        teacher: a run folder (``runs/<recipe>/version_N``: its best checkpoint), an export folder (plain
            timm / Hugging Face folder; ``labels.json`` gives a classifier's classes), or a backbone spec.
        alpha: weight of the task loss; ``1 - alpha`` weighs the distillation loss.
        temperature: softmax temperature ``T`` of both models' logits.
        features: feature matches (``FeatureMatch``); none by default (logit distillation only).
        teacher_dtype: run the teacher in ``bfloat16`` / ``float16`` / ``float32``; default: as loaded.
        cache_teacher: compute the teacher's logits once per training sample (by the batch's ``index``) and
            reuse them in later epochs. Only without train-time augmentation (refused when the train
            transform has random steps), for classification with logit distillation only.
        module: your own module's attribute holding the student network (``"net"``), read for feature
            matches and image statistics; default: the child holding most of the parameters. Not used
            with finetune's tasks.

    Example::

        trainer = Trainer(callbacks=[Distillation(teacher="runs/big/version_0", alpha=0.5, temperature=2)])
        trainer.fit(ClassificationTask("hf:prajjwal1/bert-tiny"), datamodule=data)
    """

    def __init__(
        self,
        teacher: str | Backbone,
        alpha: float = 0.5,
        temperature: float = 2.0,
        features: list[FeatureMatch] | None = None,
        teacher_dtype: DtypeName | None = None,
        cache_teacher: bool = False,
        module: str | None = None,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise RecipeError(f"{KEY}.alpha", f"must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise RecipeError(f"{KEY}.temperature", f"must be > 0, got {temperature}")
        if alpha == 1 and not features:
            raise RecipeError(f"{KEY}.alpha", "alpha 1 leaves nothing to distil; lower it or add features")
        self.source = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.features = list(features or [])
        self.teacher_dtype = teacher_dtype
        self.cache_teacher = cache_teacher
        self.module = module
        self.teacher: Teacher | None = None
        self.student: TaskStudent | ModuleStudent | None = None
        self._read = False  # whether the step's loss terms read the teacher's outputs
        self.cache = TeacherCache() if cache_teacher else None
        self.terms: list[str] = []
        self._step: TeacherOutputs | None = None

    # -- hooks -----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        kind = _teacher_kind(pl_module)
        _build(trainer, pl_module)
        self.student = student = student_of(pl_module, self.module)
        if student.labels is None and kind != "causal_lm" and not has_own_labels(self.source):
            raise RecipeError(
                f"{KEY}.teacher",
                f"{type(pl_module).__name__} has no labels and the teacher {self.source} has none of its own; "
                "set the module's labels (class names in index order) or distil from a run or export folder",
            )
        task = type(pl_module) if isinstance(student, TaskStudent) else None
        self.teacher = load_teacher(self.source, kind, student.labels, self.teacher_dtype, student=task)
        if student.labels is not None:
            check_labels(self.teacher, student.labels)
        student_tokenizer = student.tokenizer(trainer)
        if student_tokenizer is not None:
            check_vocabulary(self.teacher.backbone.tokenizer(), student_tokenizer)
        self._check_cache(trainer, kind)
        if self.alpha < 1:
            kd = LogitKD(self.current, self.alpha, self.temperature, per_item=pl_module.distillation_loss)
            self._register(pl_module, kd)
        if self.features:
            self._register(pl_module, *self._feature_term())
        log.info(
            "Distillation: teacher %s (%s), alpha %s, temperature %s%s",
            self.teacher.backbone.name,
            type(self.teacher.model).__name__,
            self.alpha,
            self.temperature,
            f", features {[(m.student, m.teacher) for m in self.features]}" if self.features else "",
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher.model.to(pl_module.device)
        self.teacher.freeze()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = self.teacher_outputs(batch, pl_module)
        self._read = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step = None
        if not self._read:
            raise RecipeError(
                KEY,
                f"{type(pl_module).__name__}.training_step did not go through the loss terms; return "
                "self.total_loss(logits=..., batch=..., task_loss=...) from it",
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name in self.terms:
            pl_module.remove_loss_term(name)
        self.terms = []
        if self.student is not None:
            self.student.release()
        self.teacher = None  # free its memory; a new fit loads it again

    @override
    def state_dict(self) -> dict[str, Any]:
        # The teacher is not saved (it is loaded from its source); the cache is recomputed after a resume.
        return {"teacher": str(self.source)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("teacher") != str(self.source):
            log.warning(
                "Distillation: the checkpoint was trained with teacher %s, this run uses %s",
                state_dict.get("teacher"),
                self.source,
            )

    # -- teacher outputs -------------------------------------------------------------------------------

    def current(self) -> TeacherOutputs:
        """The teacher's outputs for the batch being trained on (what the loss terms read)."""
        if self._step is None:
            raise RuntimeError("Distillation: no teacher outputs outside a training batch")
        self._read = True
        return self._step

    def teacher_outputs(self, batch: Any, pl_module: pl.LightningModule) -> TeacherOutputs:
        """The teacher's logits (from the cache when every sample is in it) and requested features, for the
        student module's ``teacher_inputs(batch)``."""
        inputs = pl_module.teacher_inputs(batch)
        if not isinstance(inputs, Mapping):
            raise RecipeError(
                KEY,
                f"{type(pl_module).__name__}'s batches are {type(batch).__name__}s, not dicts of model inputs; "
                "override its teacher_inputs(batch) to return the teacher's, e.g. {'pixel_values': batch[0]}",
            )
        if "pixel_values" in inputs and self.teacher.pixels is None:
            wanted = self.teacher.backbone.pixel_statistics()
            self.teacher.pixels = PixelAdapter(self.student.pixel_statistics() or wanted, wanted)
        index = batch.get("index") if isinstance(batch, Mapping) else None
        if self.cache is not None:
            if index is None:
                raise RecipeError(
                    f"{KEY}.cache_teacher", "needs each batch's row numbers as batch['index']; turn it off"
                )
            logits = self.cache.lookup(index, pl_module.device)
            if logits is not None:
                return TeacherOutputs(logits)
        names = tuple(dict.fromkeys(match.teacher for match in self.features))
        outputs = self.teacher.outputs(inputs, names)
        if self.cache is not None:
            self.cache.store(index, outputs.logits)
        return outputs

    # -- setup helpers ---------------------------------------------------------------------------------

    def _register(self, pl_module: Any, term: Any, module: Any = None) -> None:
        pl_module.add_loss_term(term, module)
        self.terms.append(term.name)

    def _feature_term(self) -> tuple[Any, Any]:
        key = f"{KEY}.features"
        widths = []
        for match in self.features:
            check_feature(match.teacher, self.teacher.loader.family, key)
            widths.append(
                (
                    self.student.feature_width(match.student),
                    self.teacher.loader.feature_width(self.teacher.model, match.teacher),
                )
            )
        term = FeatureKD(self.current, self.features, widths)
        return self.student.feature_term(term), term.projections

    def _check_cache(self, trainer: pl.Trainer, kind: str) -> None:
        if self.cache is None:
            return
        key = f"{KEY}.cache_teacher"
        if kind != "classifier" or self.features:
            raise RecipeError(
                key,
                "caches per-input logits only; turn it off for token tasks, causal LMs or feature matches",
            )
        steps = augmenting_steps(getattr(trainer, "datamodule", None))
        if steps:
            raise RecipeError(
                key,
                f"the train transform augments ({', '.join(steps)}), so cached teacher logits would be those of "
                "another view of each image; turn cache_teacher off",
            )


def _teacher_kind(pl_module: pl.LightningModule) -> str:
    """The kind of teacher the student takes (its ``teacher_kind``); RecipeError naming what is missing
    when it is no ``LossTermsMixin`` or takes no teacher."""
    name = type(pl_module).__name__
    if not isinstance(pl_module, LossTermsMixin):
        raise RecipeError(
            KEY,
            f"{name} has no total_loss: inherit finetune.LossTermsMixin and return "
            "self.total_loss(logits=..., batch=..., task_loss=...) from training_step",
        )
    if not hasattr(pl_module, "loss_terms"):
        raise RecipeError(
            KEY,
            f"LossTermsMixin.__init__ did not run: list LossTermsMixin before LightningModule in {name}'s bases",
        )
    kind = getattr(type(pl_module), "teacher_kind", None)
    if kind is None:
        raise RecipeError(KEY, f"{name} takes no teacher (its teacher_kind is None)")
    return kind


def _build(trainer: pl.Trainer, pl_module: Any) -> None:
    """Build the student now (labels and feature widths are needed before the optimizer), in the contexts
    Lightning's own ``configure_model`` call uses; that call then finds it built."""
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()
