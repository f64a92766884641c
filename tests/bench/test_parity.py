"""``python -m bench.parity --smoke`` runs every case on both sides (tiny models, a few steps), so the parity
suite cannot rot; what it measures is never asserted, only that every figure is there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.parity import CASES, FIGURES, SIDES, main
from tests.helpers.recipes import REPOSITORY

# Figures every run has; cuda_peak only on CUDA.
RUN_FIGURES = (
    "figure",
    "steps",
    "first_step_s",
    "step_s",
    "trainable",
    "peak_rss",
    "peak_rss_first_step",
    "wall_s",
)


def check_report(report: dict, cases: list[str]) -> None:
    assert [case["case"] for case in report["cases"]] == cases
    for case in report["cases"]:
        assert {run["side"] for run in case["runs"]} == set(SIDES)
        for run in case["runs"]:
            assert all(run[name] is not None for name in RUN_FIGURES), run
            assert run["steps"] > 0
        summary = case["summary"]
        for side in SIDES:
            assert summary[side]["figure"] is not None
            assert all(summary[side][key] is not None for key in FIGURES if key != "cuda_peak")
        assert set(summary["ratios"]) == set(FIGURES) - {"cuda_peak"}
        assert set(summary["checks"]) == {"figure", "step_s", "peak_rss", "first_step_s", "estimate"}
        assert case["plan"]["estimate"] > 0


def test_smoke_runs_every_case_on_both_sides(tmp_path, capsys):
    out = tmp_path / "parity.json"
    main(["--smoke", "--work", str(tmp_path / "work"), "--json", str(out)])
    report = json.loads(out.read_text())
    check_report(report, list(CASES))
    tables = capsys.readouterr().out
    assert all(f"| {name} |" in tables for name in CASES)


@pytest.mark.slow
def test_smoke_in_child_processes(tmp_path):
    """Each task in its own process, as the real runs: the spec, the result and the clock's origin cross
    the process boundary."""
    out = tmp_path / "parity.json"
    command = [sys.executable, "-m", "bench.parity", "--smoke", "--processes", "--cases", "minilm-lora"]
    subprocess.run(
        [*command, "--work", str(tmp_path / "work"), "--json", str(out)], cwd=REPOSITORY, check=True
    )
    check_report(json.loads(out.read_text()), ["minilm-lora"])
