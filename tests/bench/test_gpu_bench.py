"""``python -m bench.gpu --dry-run`` runs end to end on the CPU (tiny model), so the GPU check cannot rot
between the sessions that have a GPU; its figures are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_dry_run_measures_every_case_on_both_sides(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run", "--json", str(out)],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["strategy"], r["checkpointing"], r["side"]) for r in rows}
    assert cases == {
        (s, c, side)
        for s in ("full", "lora", "qlora")
        for c in (False, True)
        for side in ("finetune", "plain")
    }
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "| tiny-llama | qlora | on | finetune |" in done.stdout
