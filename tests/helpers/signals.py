"""A callback that sends its own process a signal at a given optimizer step: preemption, deterministically."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step = step
        self.signal = getattr(signal, signal_name)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
