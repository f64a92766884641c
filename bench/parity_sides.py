"""What ``bench.parity`` runs in a child process: preparing a case, the plan's memory estimate, or one side
of one run (finetune through its command line, or the hand loop) with its figures.

A side's clock starts at ``origin``, the parent's wall-clock time just before it started the process
(``PARITY_ORIGIN`` in the environment), so the time to the first optimizer step counts the imports, the
model loading and the data preparation. Peak RSS is the process's high-water mark (``VmHWM``), read at the
end of the run and at the first step.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORIGIN = "PARITY_ORIGIN"
# The first optimizer steps are slower (allocations, lazy initialisation): left out of the step time.
WARMUP_STEPS = 3
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def status_bytes(name: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux ``clear_refs``; sides sharing one process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@dataclass
class StepClock:
    """Marks each optimizer step (``step``, called right before ``optimizer.step()``) from ``origin``."""

    origin: float
    marks: list[tuple[int, float]] = field(default_factory=list)
    trainable: int | None = None
    peak_at_start: int | None = None
    peak_at_first_step: int | None = None

    def start(self, model: Any) -> None:
        self.peak_at_start = status_bytes("VmHWM")
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(self, epoch: int) -> None:
        if not self.marks:
            self.peak_at_first_step = status_bytes("VmHWM")
        self.marks.append((epoch, time.time()))

    def figures(self) -> dict[str, Any]:
        """Steps, seconds to the first, the median seconds per step within epochs (the first
        ``WARMUP_STEPS`` left out, as long as one is left), trainable parameters, the RSS peak when training
        starts (model, data and optimizer ready) and at the first step."""
        within = [
            b - a for (epoch, a), (next_epoch, b) in zip(self.marks, self.marks[1:]) if epoch == next_epoch
        ]
        steady = within[min(WARMUP_STEPS, max(len(within) - 1, 0)) :]
        return {
            "steps": len(self.marks),
            "first_step_s": self.marks[0][1] - self.origin if self.marks else None,
            "step_s": statistics.median(steady) if steady else None,
            "trainable": self.trainable,
            "peak_rss_train_start": self.peak_at_start,
            "peak_rss_first_step": self.peak_at_first_step,
        }


def run_side(spec: dict[str, Any], origin: float) -> dict[str, Any]:
    """One side of one run; its figure (``spec["metric"]``) and its measurements."""
    clock = StepClock(origin)
    figure = finetune_side(spec, clock) if spec["side"] == "finetune" else hand_side(spec, clock)
    result = {"figure": figure, **clock.figures(), "peak_rss": status_bytes("VmHWM")}
    if spec["settings"]["device"] == "cuda":
        import torch

        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    return result


def hand_side(spec: dict[str, Any], clock: StepClock) -> float:
    from bench import hand_loops

    loop = getattr(hand_loops, spec["loop"])
    return loop(hand_loops.Settings(**spec["settings"]), Path(spec["rows"]), Path(spec["out"]), clock)


def finetune_side(spec: dict[str, Any], clock: StepClock) -> float:
    """``python -m finetune fit --config RECIPE`` with the probe callback (and ``spec["arguments"]``, more
    command-line arguments); the run's figure: the test metric, or the best of the validation metric over
    the epochs."""
    from bench.parity_probe import Probe
    from finetune.cli import main

    Probe.clock, Probe.metrics = clock, {}
    out = Path(spec["out"])
    argv = ["fit", "--config", spec["recipe"], f"--trainer.default_root_dir={out}"]
    argv += ["--trainer.callbacks+=bench.parity_probe.Probe", *spec.get("arguments", [])]
    if spec["cold_cache"]:
        argv.append(f"--data.init_args.cache_dir={out / 'cache'}")
    if main(argv) != 0:
        raise RuntimeError(f"finetune fit failed on {spec['recipe']}")
    values = Probe.metrics[spec["metric"]]
    if spec["metric"].startswith("test/"):
        return values[-1]
    return max(values) if spec["higher_is_better"] else min(values)


def plan_estimate(recipe: str) -> dict[str, Any]:
    """What ``python -m finetune plan RECIPE`` estimates for training memory: the total in bytes (as
    printed, to 3 digits) and the table."""
    from finetune.cli import main

    captured: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record.getMessage())

    logger = logging.getLogger("finetune.cli.plan")
    handler = Keep()
    logger.addHandler(handler)
    try:
        if main(["plan", recipe]) != 0:
            raise RuntimeError(f"finetune plan failed on {recipe}")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(captured)
    section = text.partition("Training memory per device (estimate)")[2].strip().split("\n\n")[0]
    total = next(line for line in section.splitlines() if line.startswith("total"))
    number, unit = total.split()[-2:]
    return {"estimate": round(float(number) * UNITS[unit]), "table": section}


def run_child(spec_file: str) -> None:
    """The child's work as ``spec_file`` says (``task``: prepare, plan or side); the result to
    ``spec["result"]`` as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    result = child_task(spec, float(os.environ.get(ORIGIN, time.time())))
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


def child_task(spec: dict[str, Any], origin: float) -> Any:
    if spec["task"] == "prepare":
        from bench.parity_cases import CASES, prepare

        case = CASES[spec["case"]]
        return prepare(
            case, spec["seeds"], Path(spec["work"]), spec["smoke"], spec["device"], spec["changes"]
        )
    if spec["task"] == "plan":
        return plan_estimate(spec["recipe"])
    return run_side(spec, origin)
