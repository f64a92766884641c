"""One optimizer step on a task, and the assertions every strategy test makes: exactly the expected
parameters changed, every frozen one is bitwise unchanged."""

from __future__ import annotations

import torch

from finetune.strategies import adapter_parameter_names
from finetune.tasks import ClassificationTask, SFTTask


def one_step(task: ClassificationTask, batch) -> tuple[set[str], set[str], dict[str, torch.Tensor]]:
    """Run one SGD step; return (changed, trainable) parameter names and the buffers before the step."""
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in task.named_buffers()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    loss = torch.nn.functional.cross_entropy(task(batch), batch["labels"])
    loss.backward()
    optimizer.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    return changed, trainable, buffers


def assert_exactly(task, batch, expected_prefixes: tuple[str, ...]):
    changed, trainable, _ = one_step(task, batch)
    names = {n for n, _ in task.named_parameters()}
    expected = {n for n in names if n.startswith(expected_prefixes)}
    assert trainable == expected
    assert changed == expected, (
        f"unchanged trainable: {expected - changed}; changed frozen: {changed - expected}"
    )


def step(task, batch) -> tuple[set[str], set[str]]:
    """One SGD step on the task's loss; (changed, trainable) parameter names."""
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    if isinstance(task, SFTTask):
        loss = task.token_losses(batch)[0]
    else:
        loss = torch.nn.functional.cross_entropy(task(batch), batch["labels"])
    loss.backward()
    optimizer.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    return changed, {n for n, p in task.named_parameters() if p.requires_grad}


def assert_adapters_and(task, batch, head: tuple[str, ...]) -> None:
    changed, trainable = step(task, batch)
    adapters = set(adapter_parameter_names(task))
    assert adapters, "no adapter parameters"
    expected = adapters | {n for n, _ in task.named_parameters() if n.startswith(head)} if head else adapters
    assert trainable == expected
    # LoRA's B starts at zero, so A gets no gradient in the first step: every B must change, and
    # nothing outside the expected set may.
    assert not changed - expected, f"frozen parameters changed: {changed - expected}"
    assert {n for n in expected if "lora_A" not in n} <= changed
