"""Where finetune's extra peak RSS and time to the first optimizer step go, on the MiniLM full fine-tune of
``bench.parity`` (the quickstart with ``strategy: full``), against the hand loop (issue 13).

    python -m bench.parity_profile [--limit 1000] [--epochs 1] [--work DIR] [--json FILE]

One process at a time, each new:

1. imports: the hand loop's (torch, transformers, peft) and what ``python -m finetune fit`` imports before
   it reads the recipe (``finetune.cli.lightning``, the tasks and data modules): seconds and RSS after
   them, and ``-X importtime`` self-time by top-level package;
2. memory by stage: the finetune side with ``bench.parity_probe.Stages`` reading ``VmRSS`` and ``VmHWM``
   at each stage of the run (what each stage adds to the high-water mark), the same run without
   checkpoints (``--trainer.enable_checkpointing=false``), and the hand side's peaks;
3. start-up: cProfile of each side from process start to its first optimizer step (stopped there), the
   cumulative seconds of the steps that matter.

``--limit`` and ``--epochs`` shorten the run: memory does not grow with the number of steps.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.parity import ENVIRONMENT, Tasks
from bench.parity_cases import CASES, REPOSITORY
from bench.parity_sides import ORIGIN, StepClock, child_task, finetune_side, hand_side, run_side, status_bytes

log = logging.getLogger("bench.parity_profile")
MIB = 2**20
IMPORTS = {
    "hand": "import torch, transformers, peft; from transformers import AutoModel, AutoTokenizer",
    "finetune": "import finetune.cli.lightning, finetune.tasks, finetune.data",
}
# (part of the file's path, function) -> what it does: the start-up profile reports its cumulative seconds.
STEPS = {
    ("<frozen importlib._bootstrap>", "_find_and_load"): "imports (all)",
    ("lightning/pytorch/cli.py", "instantiate_classes"): "recipe: build trainer, task and data",
    ("finetune/data/", "prepare_data"): "data: read, split, tokenise (warm cache)",
    ("finetune/tasks/base.py", "configure_model"): "model: load it, apply the strategy",
    ("transformers/modeling_utils.py", "from_pretrained"): "transformers from_pretrained",
    ("transformers/tokenization_utils_base.py", "from_pretrained"): "tokenizer from_pretrained",
    ("finetune/tasks/base.py", "configure_optimizers"): "optimizer and schedule",
    ("finetune/callbacks/report.py", "on_fit_start"): "run plan at start (ParameterReport)",
    ("finetune/plan.py", "_probe_activations"): "- of which the activation probe",
    ("lightning/pytorch/trainer/trainer.py", "_run_sanity_check"): "sanity validation (2 batches)",
}


class FirstStep(Exception):
    """Raised by ``StopClock`` at a side's first optimizer step."""


class StopClock(StepClock):
    def step(self, epoch: int) -> None:
        raise FirstStep


# --- the child's tasks --------------------------------------------------------------------------------------


def profile_task(spec: dict[str, Any], origin: float) -> Any:
    """``stages``: a side with ``Stages`` marks; ``startup``: a side under cProfile up to its first step;
    any other task as ``bench.parity`` runs it."""
    if spec["task"] == "stages":
        from bench.parity_probe import Stages

        result = run_side(spec, origin)
        marks = [(stage, t - origin, rss, peak) for stage, t, rss, peak in Stages.marks]
        return result | {"stages": marks, "end": [time.time() - origin, status_bytes("VmRSS")]}
    if spec["task"] == "startup":
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            (finetune_side if spec["side"] == "finetune" else hand_side)(spec, StopClock(origin))
        except FirstStep:
            pass
        profiler.disable()
        profiler.dump_stats(Path(spec["out"]) / "startup.prof")  # for a closer look: python -m pstats
        return {"seconds": time.time() - origin, "steps": startup_steps(pstats.Stats(profiler))}
    return child_task(spec, origin)


def startup_steps(stats: pstats.Stats) -> dict[str, float]:
    """The cumulative seconds of each of ``STEPS`` found in ``stats`` (the largest, for several matches)."""
    found: dict[str, float] = {}
    for (file, _, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, name), label in STEPS.items():
            if function == name and suffix in file:
                found[label] = max(found.get(label, 0.0), cumulative)
    return found


def imports(side: str) -> dict[str, Any]:
    """Seconds to import what the side imports and the RSS after, in a new process; ``-X importtime``
    self-time by top-level package (the 12 largest)."""
    status = "from bench.parity_sides import status_bytes; print(status_bytes('VmRSS'))"
    environment = {**os.environ, **ENVIRONMENT}
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", f"{IMPORTS[side]}; {status}"],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.time() - start
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORTS[side]],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    by_package: Counter[str] = Counter()
    for line in timed.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if found:
            by_package[found.group(2).split(".")[0]] += int(found.group(1)) / 1e6
    return {
        "seconds": seconds,
        "rss": int(done.stdout.split()[-1]),
        "by_package": dict(by_package.most_common(12)),
    }


# --- the runs and the report --------------------------------------------------------------------------------


def profile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    case = CASES["minilm-full"]
    tasks = Tasks(work, in_process=False, module="bench.parity_profile", handler=profile_task)
    changes = {"trainer.max_epochs": args.epochs, "data.init_args.limit": args.limit}
    prepare = {"task": "prepare", "case": case.name, "seeds": [0], "work": str(work), "smoke": False}
    manifest, _ = tasks.run("prepare", prepare | {"device": "cpu", "changes": changes})
    side = {
        "loop": case.loop,
        "metric": case.metric,
        "higher_is_better": True,
        "cold_cache": False,
        **manifest["0"],
    }
    found: dict[str, Any] = {
        "imports": {name: imports(name) for name in IMPORTS},
        "stages": {},
        "startup": {},
    }
    stages = "--trainer.callbacks+=bench.parity_probe.Stages"
    runs = {
        "finetune": ("finetune", [stages]),
        "finetune without checkpoints": ("finetune", [stages, "--trainer.enable_checkpointing=false"]),
        "hand": ("hand", []),
    }
    for label, (name, arguments) in runs.items():
        out = work / re.sub(r"\W+", "-", label)
        out.mkdir(exist_ok=True)
        spec = side | {"task": "stages", "side": name, "out": str(out), "arguments": arguments}
        found["stages"][label], _ = tasks.run(out.name, spec)
        log.info("%s: peak RSS %.0f MiB", label, found["stages"][label]["peak_rss"] / MIB)
    for name in ("hand", "finetune"):
        out = work / f"startup-{name}"
        out.mkdir(exist_ok=True)
        found["startup"][name], _ = tasks.run(
            out.name, side | {"task": "startup", "side": name, "out": str(out)}
        )
        log.info("%s: %.1f s to the first step, profiled", name, found["startup"][name]["seconds"])
    return found


def stage_table(result: dict[str, Any]) -> str:
    lines = [
        "| stage (what happened since the previous one) | s | RSS MiB | peak MiB | peak added MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    before = 0
    ends = ("end of the process", *result["end"], result["peak_rss"])
    for stage, seconds, rss, peak in [*result["stages"], ends]:
        lines.append(
            f"| {stage} | {seconds:.1f} | {rss / MIB:.0f} | {peak / MIB:.0f} | {(peak - before) / MIB:+.0f} |"
        )
        before = peak
    return "\n".join(lines)


def report(found: dict[str, Any]) -> str:
    parts = [
        "Imports (a new process each):\n",
        "| side | s | RSS after MiB | self-time by package, s |",
        "|---|---:|---:|---|",
    ]
    for side, result in found["imports"].items():
        packages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result["by_package"].items())
        parts.append(f"| {side} | {result['seconds']:.1f} | {result['rss'] / MIB:.0f} | {packages} |")
    for name in ("finetune", "finetune without checkpoints"):
        parts += [f"\nMemory by stage, {name}:\n", stage_table(found["stages"][name])]
    hand = found["stages"]["hand"]
    parts.append(
        f"\nHand loop: peak RSS {hand['peak_rss_train_start'] / MIB:.0f} MiB when training starts, "
        f"{hand['peak_rss_first_step'] / MIB:.0f} MiB at the first step, "
        f"{hand['peak_rss'] / MIB:.0f} MiB at the end."
    )
    parts += [
        "\nStart-up to the first optimizer step (cProfile, cumulative s):\n",
        "| step | hand | finetune |",
    ]
    parts.append("|---|---:|---:|")
    hand, ours = found["startup"]["hand"], found["startup"]["finetune"]
    for label in STEPS.values():
        if label in hand["steps"] or label in ours["steps"]:
            parts.append(
                f"| {label} | {hand['steps'].get(label, 0):.2f} | {ours['steps'].get(label, 0):.2f} |"
            )
    parts.append(
        f"| process start to the first step (profiled) | {hand['seconds']:.2f} | {ours['seconds']:.2f} |"
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=int, default=1000, help="corpus rows sampled (the quickstart's: 5000)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--work", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = profile_task(spec, float(os.environ.get(ORIGIN, time.time())))
        Path(spec["result"]).write_text(json.dumps(result, indent=1))
        return
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="parity-profile-") as temporary:
        found = profile(args, Path(args.work or temporary))
    print(report(found))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
