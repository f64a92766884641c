"""What ``val/acc`` and ``val/f1`` of a classification run mean, on an imbalanced batch."""

from __future__ import annotations

import torch

from finetune.tasks import ClassificationTask


def test_acc_is_the_share_of_rows_predicted_right_and_f1_the_macro_mean(tiny_bert_dir):
    # 8 rows of class 0, 2 of class 1; every row predicted 0: accuracy 0.8, mean per-class recall 0.5.
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.tensor([[1.0, 0.0]]).repeat(10, 1)
    metrics = ClassificationTask(str(tiny_bert_dir), labels=["a", "b"]).make_metrics(["a", "b"])
    metrics.update(logits, labels)
    found = metrics.compute()
    assert abs(found["acc"].item() - 0.8) < 1e-6  # the mean per-class recall would be 0.5
    f1_of_class_0 = 2 * 8 / (2 * 8 + 2)  # precision 0.8, recall 1
    assert abs(found["f1"].item() - f1_of_class_0 / 2) < 1e-6
