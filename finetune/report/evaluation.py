"""A classifier's predictions on the validation split, beside the targets: what the confusion matrix and
the precision-recall curves are drawn from (``<run>/val_predictions.csv``).

Why validation: every fit has a validation split (a test split is optional), and it is the split the
exported checkpoint was chosen on, so the matrix explains the metrics the run reports for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl

KINDS = ("class", "multi_label")  # the ``target_kind`` of tasks whose predictions are drawn


def draws_predictions(module: Any) -> bool:
    """True for finetune's single- and multi-label classification tasks (``target_kind`` and labels)."""
    return getattr(module, "target_kind", None) in KINDS and bool(getattr(module, "labels", None))


def predict_rows(trainer: pl.Trainer, task: Any, batches: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Run ``task`` over ``batches`` (eval mode, no gradients, on the trainer's device and precision); one row
    per example, sorted by ``index``: ``index``; the target, ``target`` (the class name) or for multi-label
    ``target_<label>`` (0/1); then the task's ``prediction_columns`` (``prediction``, ``p_<label>``).

    ``task`` is a ``draws_predictions`` task; its batches carry ``index`` and ``labels``.
    """
    indices, values, targets = [], [], []
    training, device = task.training, task.device
    task.eval()
    # Lightning moves the module to the CPU when fit ends; the pass runs where training ran.
    task.to(trainer.strategy.root_device)
    precision = trainer.precision_plugin
    try:
        with torch.no_grad():
            for batch in batches:
                batch = trainer.strategy.batch_to_device(precision.convert_input(batch))
                with precision.val_step_context():
                    values.append(task.predict_values(task(batch)).float().cpu())
                indices.append(batch["index"].cpu())
                targets.append(batch["labels"].cpu())
    finally:
        task.to(device)
        task.train(training)
    index, value, target = torch.cat(indices), torch.cat(values), torch.cat(targets)
    order = torch.argsort(index)
    index, value, target = index[order], value[order], target[order]
    frame = pd.DataFrame({"index": index.numpy()})
    if target.ndim == 1:
        frame["target"] = [task.labels[i] for i in target.tolist()]
    else:
        for i, label in enumerate(task.labels):
            frame[f"target_{label}"] = target[:, i].round().int().numpy()
    for name, column in task.prediction_columns(value, frame).items():
        frame[name] = column
    return frame
