"""Model cards: every export (fit's, ``export``'s, adapters alone, merged, timm, Hugging Face) writes a
README.md whose front matter parses as YAML with the Hub's keys, then the recipe, what trained, the metrics
and the plots; ``export --push-to-hub`` uploads the folder, and ends in one line offline or logged out."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune.backbones import Backbone
from finetune.cli import main
from finetune.report.card import base_model_id, dataset_ids
from finetune.report.metrics import read_metrics
from tests.helpers.recipes import image_recipe, text_recipe
from tests.report.fits import fit

pytestmark = pytest.mark.slow

REPO = "someone/tiny-reviews"


def read_card(folder: Path) -> tuple[dict, str]:
    """The card's front matter (parsed) and its body."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    return yaml.safe_load(front), body


def reported(meta: dict) -> dict[tuple[str, str], float]:
    """model-index metrics by (split, name)."""
    return {
        (result["dataset"]["split"], metric["name"]): metric["value"]
        for entry in meta["model-index"]
        for result in entry["results"]
        for metric in result["metrics"]
    }


def assert_plots_linked(folder: Path, body: str, names: set[str]) -> None:
    for name in names:
        assert f"](plots/{name})" in body and (folder / "plots" / name).is_file(), name


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, text_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-run")
    recipe = text_recipe(tiny_bert_dir, text_csv, root / "runs")
    recipe["trainer"]["max_epochs"] = 1
    recipe["model"]["init_args"]["strategy"] = "lora"
    return fit(recipe, root, "lora")


def test_a_text_classification_card(report_run):
    export = report_run / "export"
    meta, body = read_card(export)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["tags"] == ["finetune"]
    assert "base_model" not in meta  # a local folder is no Hub id (the Hub refuses the card otherwise)
    metrics = read_metrics(report_run)
    scores = reported(meta)
    assert scores[("validation", "val/acc")] == pytest.approx(metrics["val/acc"].max(), abs=1e-6)  # the best
    assert scores[("test", "test/acc")] == pytest.approx(metrics["test/acc"].dropna().iloc[-1], abs=1e-6)
    recipe = (report_run / "config.yaml").read_text()
    sections = [body.index(f"## {title}") for title in ("Recipe", "What trained", "Metrics", "Plots")]
    assert sections == sorted(sections)
    assert recipe.rstrip() in body
    assert "- strategy: `full`" in body and "(100.00%)" in body
    assert_plots_linked(export, body, {"loss.png", "acc.png", "f1.png", "confusion_matrix.png"})


def test_adapter_and_merged_exports_carry_cards(lora_run):
    meta, body = read_card(lora_run / "export")
    assert (meta["library_name"], meta["pipeline_tag"]) == ("peft", "text-classification")
    assert "- strategy: `lora`" in body and "the adapters alone" in body
    counted = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", body)
    trainable, total = (int(n.replace(",", "")) for n in counted.groups())
    assert 0 < trainable < total

    assert main(["export", str(lora_run), "--merge"]) == 0
    merged = lora_run / "export-merged"
    meta, body = read_card(merged)
    assert (meta["library_name"], meta["tags"]) == ("transformers", ["finetune"])
    assert "merged into plain weights" in body
    assert ("validation", "val/acc") in reported(meta)
    assert_plots_linked(merged, body, {"loss.png", "confusion_matrix.png"})


def test_a_timm_image_card(tiny_timm_checkpoint, image_folder, tmp_path):
    run = fit(image_recipe(tiny_timm_checkpoint, image_folder, tmp_path / "runs"), tmp_path)
    meta, body = read_card(run / "export")
    assert (meta["library_name"], meta["pipeline_tag"]) == ("timm", "image-classification")
    assert "base_model" not in meta  # its weights came from a local file
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "image-classification"
    assert "- strategy: `freeze`" in body and "timm:test_vit" in body
    assert_plots_linked(run / "export", body, {"loss.png", "confusion_matrix.png"})


def test_base_model_is_a_hub_id_or_absent(tmp_path):
    assert base_model_id(Backbone("hf:bert-base-uncased")) == "bert-base-uncased"
    assert base_model_id(Backbone("timm:resnet18")).startswith("timm/resnet18.")  # timm's default weights
    assert base_model_id(Backbone("timm:resnet18", pretrained=False)) is None  # random init
    assert base_model_id(Backbone("timm:test_vit", checkpoint=str(tmp_path / "w.safetensors"))) is None
    assert base_model_id(Backbone(str(tmp_path))) is None
    assert base_model_id(Backbone(f"hf:{tmp_path}")) is None


def test_datasets_are_named_when_the_recipe_read_a_hub_dataset(tmp_path):
    assert dataset_ids({"data": {"init_args": {"dataset": "stanfordnlp/imdb"}}}) == ["stanfordnlp/imdb"]
    assert dataset_ids({"data": {"init_args": {"dataset": str(tmp_path)}}}) == []  # a local folder
    assert dataset_ids({"data": {"init_args": {"train": "reviews.csv"}}}) == []


def test_push_to_hub_offline_is_one_line(lora_run, capsys):
    before = (lora_run / "export" / "README.md").stat().st_mtime_ns
    assert main(["export", str(lora_run), "--push-to-hub", REPO]) == 2  # the tests run with HF_HUB_OFFLINE=1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "finetune: error: --push-to-hub: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); unset it to push"
    ]
    assert (lora_run / "export" / "README.md").stat().st_mtime_ns == before  # checked before exporting


def online(monkeypatch, token: str | None) -> list[tuple]:
    """The Hub reachable with ``token``; the calls a (fake) HfApi receives."""
    import huggingface_hub

    calls: list[tuple] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("HfApi", token))

        def create_repo(self, repo_id, **options):
            calls.append(("create_repo", repo_id, options))

        def upload_folder(self, **options):
            folder = Path(options["folder_path"])
            calls.append(("upload_folder", options, sorted(p.name for p in folder.iterdir())))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{options['repo_id']}/commit/1")

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


def test_push_to_hub_logged_out_is_one_line(lora_run, monkeypatch, capsys):
    calls = online(monkeypatch, token=None)
    assert main(["export", str(lora_run), "--push-to-hub", REPO]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("finetune: error: --push-to-hub: not logged in to the Hugging Face Hub")
    assert calls == []


def test_push_to_hub_uploads_the_export_folder_with_its_card(lora_run, tmp_path, monkeypatch, capsys):
    calls = online(monkeypatch, token="hf_test")
    out = tmp_path / "pushed"
    assert main(["export", str(lora_run), "--out", str(out), "--push-to-hub", REPO]) == 0
    assert calls[0] == ("HfApi", "hf_test")
    assert calls[1] == ("create_repo", REPO, {"repo_type": "model", "exist_ok": True})
    (name, options, files) = calls[2]
    assert (name, options["repo_id"], options["folder_path"]) == ("upload_folder", REPO, str(out))
    assert {"README.md", "adapter_config.json", "plots"} <= set(files)
    assert f"https://huggingface.co/{REPO}/commit/1" in capsys.readouterr().out


def test_a_failed_push_is_one_line(lora_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    online(monkeypatch, token="hf_test")

    def refuse(self, **options):
        raise OSError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    assert main(["export", str(lora_run), "--out", str(tmp_path / "out"), "--push-to-hub", REPO]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"finetune: error: --push-to-hub: pushing to {REPO} failed: 401 Client Error: Unauthorized"
    )
