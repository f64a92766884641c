"""Nothing lost: checkpoints are written atomically (a kill at any moment leaves a whole one), a full disk
ends in one line with the previous checkpoint kept, damaged files are named, ``--ckpt_path last`` finds the
newest whole checkpoint, and a resumed run goes where the user says."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.callbacks import AtomicCheckpointIO
from finetune.checkpoints import check_loadable, newest_loadable, remove_temporaries
from finetune.cli import main
from finetune.errors import RecipeError
from tests.helpers.recipes import text_recipe, write

WRITER = """
import sys, torch
from pathlib import Path
from finetune.checkpoints import atomic_save
path = Path(sys.argv[1])
state = {"state_dict": {"w": torch.randn(4_000_000)}, "step": 0}  # 16 MB: each write takes a while
step = 0
while True:
    step += 1
    state["step"] = step
    atomic_save(state, path)
    print(step, flush=True)
"""


def folders() -> list[Path]:
    """Where the kill test writes: the test's own tmp folder, and /dev/shm (tmpfs) where the machine has it."""
    shm = Path("/dev/shm")
    return [shm] if shm.is_dir() and os.access(shm, os.W_OK) else []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["tmp_path", "tmpfs"])
def test_kill_9_during_writes_never_leaves_the_run_without_a_whole_checkpoint(tmp_path, where):
    """Ten kills at random moments on each of two filesystems (the test's folder, and tmpfs): twenty writes."""
    if where == "tmpfs" and not folders():
        pytest.skip("no writable tmpfs (/dev/shm) here")
    root = tmp_path if where == "tmp_path" else Path(folders()[0]) / f"finetune-test-{os.getpid()}"
    root.mkdir(exist_ok=True)
    path = root / "last.ckpt"
    rng = random.Random(0)
    try:
        for attempt in range(10):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(path)],
                stdout=subprocess.PIPE,
                text=True,
                env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
            )
            assert writer.stdout.readline()  # one write has completed
            time.sleep(rng.uniform(0.0, 0.3))  # then kill it somewhere in a later write
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            check_loadable(path)  # the previous whole checkpoint, or the new whole one
            assert torch.load(path, weights_only=True)["state_dict"]["w"].numel() == 4_000_000, attempt
        assert len(remove_temporaries(root)) <= 1  # each new writer removed what the previous kill left
        assert not list(root.glob(".*.tmp"))
    finally:
        if where == "tmpfs":
            for leftover in root.iterdir():
                leftover.unlink()
            root.rmdir()


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000)}, path)
    before = path.read_bytes()
    monkeypatch.setattr("shutil.disk_usage", lambda folder: _Usage(free=10))
    with pytest.raises(
        RecipeError, match=r"no room for checkpoint last.ckpt: it needs about .* in .*, 10 B are free"
    ):
        io.save_checkpoint({"w": torch.ones(100_000)}, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_damaged_and_foreign_checkpoints_are_named(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, whole)
    check_loadable(whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "table.csv").write_text("text,label\na,b\n")
    for name, message in [
        ("truncated.ckpt", "is damaged"),
        ("empty.ckpt", "is empty"),
        ("table.csv", "not a checkpoint"),
        ("missing.ckpt", "does not exist"),
        (".", "is a folder but not a sharded checkpoint"),
    ]:
        with pytest.raises(RecipeError, match=message):
            check_loadable(tmp_path / name)
    os.utime(truncated, (time.time() + 10, time.time() + 10))  # the newest, but damaged: skipped
    assert newest_loadable(tmp_path.glob("*.ckpt")) == whole


def last_checkpoint_recipe(tiny_bert_dir, text_csv, tmp_path) -> Path:
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["max_epochs"] = 1
    return write(recipe, tmp_path / "resumable.yaml")


def test_ckpt_path_last_resumes_the_newest_whole_checkpoint_of_the_recipes_runs(
    tiny_bert_dir, text_csv, tmp_path, capsys
):
    recipe = last_checkpoint_recipe(tiny_bert_dir, text_csv, tmp_path)
    assert main([str(recipe), "--ckpt_path=last"]) == 2
    assert "ckpt_path: no whole checkpoint to resume from" in capsys.readouterr().err
    assert main([str(recipe)]) == 0
    runs = tmp_path / "runs" / "resumable"
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a crash mid-copy (what the atomic writer prevents)
    assert main([str(recipe), "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    # Resumed from epoch 0's best checkpoint (the damaged last one skipped), trained epoch 1, in version_1.
    assert torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    saved = runs / "version_1" / "config.yaml"  # a run's saved recipe resumes its recipe's newest
    assert main(["fit", "--config", str(saved), "--trainer.max_epochs=3", "--ckpt_path=last"]) == 0
    assert torch.load(runs / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_a_resumed_run_goes_where_the_user_says(tiny_bert_dir, text_csv, tmp_path):
    recipe = last_checkpoint_recipe(tiny_bert_dir, text_csv, tmp_path)
    assert main([str(recipe)]) == 0
    run = tmp_path / "runs" / "resumable" / "version_0"
    elsewhere = tmp_path / "elsewhere"
    argv = ["fit", "--config", str(run / "config.yaml"), f"--trainer.default_root_dir={elsewhere}"]
    assert main([*argv, "--trainer.max_epochs=2", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert (elsewhere / "resumable" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert [p.name for p in (tmp_path / "runs" / "resumable").iterdir()] == ["version_0"]  # nothing new there


def test_bad_ckpt_paths_through_the_cli_are_one_line(tiny_bert_dir, text_csv, tmp_path, capsys):
    recipe = last_checkpoint_recipe(tiny_bert_dir, text_csv, tmp_path)
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 not really")
    for value in ("missing.ckpt", "cut.ckpt", str(recipe)):
        assert main([str(recipe), f"--ckpt_path={tmp_path / value}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("finetune: error: ckpt_path: "), lines[-1]
        assert not any("Traceback" in line for line in lines)
