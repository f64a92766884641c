"""The model card of an export: ``README.md`` in the Hugging Face format, written beside the model.

YAML front matter (``base_model``, ``library_name``, ``pipeline_tag``, ``datasets``, ``tags``, and the
exported model's metrics as ``model-index``), serialised by ``huggingface_hub`` so the Hub reads it; then the
recipe, what trained, the metrics table and the run's plots (copied into ``<export>/plots/``, linked
relatively so they show on the Hub and in a local viewer alike).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune import runs
from finetune.paths import is_local_path
from finetune.report import CARD, PLOTS
from finetune.report.metrics import exported_metrics, read_metrics

if TYPE_CHECKING:
    from finetune.backbones import Backbone
    from finetune.tasks import FinetuneTask

TAGS = ["finetune"]
ADAPTER_CONFIG = "adapter_config.json"  # what peft writes: the export holds adapters alone
SPLITS = {"val": "validation", "test": "test"}  # metric prefix -> the split it was measured on


def write_card(task: FinetuneTask, run: Path, export: Path) -> Path:
    """Write ``<export>/README.md`` for ``task``'s export of ``run`` and copy the run's plots beside it;
    return the card's path. Every part read from the run folder is optional (a run without metrics gets a
    card without them)."""
    run, export = Path(run), Path(export)
    plots = _copy_plots(run / PLOTS, export / PLOTS)
    frame = read_metrics(run)
    metrics = exported_metrics(frame, task.monitor) if frame is not None else {}
    recipe_text = (run / runs.CONFIG).read_text() if (run / runs.CONFIG).is_file() else ""
    recipe = yaml.safe_load(recipe_text) or {}
    name = run.parent.name if run.name.startswith("version_") else run.name
    front = front_matter(task, export, recipe, metrics, name)
    sections = [
        _title(name, task),
        _recipe_section(recipe_text),
        _training_section(task, export),
        _metrics_section(metrics, task),
        _plots_section(plots),
    ]
    path = export / CARD
    path.write_text(f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    return path


def front_matter(
    task: FinetuneTask, export: Path, recipe: dict[str, Any], metrics: dict[str, float], name: str
) -> str:
    """The card's YAML metadata (without the ``---`` lines)."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline = pipeline_tag(task)
    datasets = dataset_ids(recipe)
    data_name = datasets[0] if datasets else _data_file_name(recipe)
    # model-index needs a task type and a dataset name: without them the Hub rejects the card.
    known = pipeline is not None and data_name is not None
    results = [
        EvalResult(
            task_type=pipeline,
            dataset_type=data_name,
            dataset_name=data_name,
            dataset_split=SPLITS[key.partition("/")[0]],
            metric_type=key.partition("/")[2],
            metric_name=key,
            metric_value=round(value, 6),
        )
        for key, value in metrics.items()
        if known and key.partition("/")[0] in SPLITS
    ]
    card = ModelCardData(
        base_model=base_model_id(task.backbone),
        library_name=library_name(task, export),
        pipeline_tag=pipeline,
        datasets=datasets or None,
        tags=TAGS,
        model_name=name if results else None,
        eval_results=results or None,
    )
    return card.to_yaml() + "\n"


def base_model_id(backbone: Backbone) -> str | None:
    """The Hub id of the pretrained weights the run started from, or None when they were not a Hub model's
    (a local folder or weights file, random init): the Hub refuses a ``base_model`` that is no model id."""
    if not backbone.pretrained or backbone.checkpoint:
        return None
    prefix, colon, source = backbone.name.partition(":")
    if not colon or is_local_path(source):
        return None
    if prefix == "hf":
        return source
    if prefix == "timm":
        from timm.models import get_pretrained_cfg

        try:
            config = get_pretrained_cfg(source)
        except RuntimeError:  # a pretrained tag timm does not know
            return None
        return config.hf_hub_id if config is not None and config.hf_hub_id else None
    return None


def library_name(task: FinetuneTask, export: Path) -> str:
    """``peft`` for adapters alone, else the library that loads the export: ``timm`` or ``transformers``."""
    if (export / ADAPTER_CONFIG).is_file():
        return "peft"
    return "timm" if task.loader.family == "timm" else "transformers"


def pipeline_tag(task: FinetuneTask) -> str | None:
    """The Hub's task name for what ``task`` does, or None for a task it has no name for."""
    from finetune.tasks import ClassificationTask, Seq2SeqTask, TokenClassificationTask
    from finetune.tasks.sft import CausalLMTask

    if isinstance(task, ClassificationTask):  # multi-label and regression heads too, as the Hub files them
        return "image-classification" if task.image_config is not None else "text-classification"
    kinds = (
        (TokenClassificationTask, "token-classification"),
        (Seq2SeqTask, "text2text-generation"),
        (CausalLMTask, "text-generation"),
    )
    return next((tag for kind, tag in kinds if isinstance(task, kind)), None)


def dataset_ids(recipe: dict[str, Any]) -> list[str]:
    """The Hub dataset the recipe read (``data.dataset``), when it names one rather than a local folder."""
    dataset = _data_arguments(recipe).get("dataset")
    return [dataset] if isinstance(dataset, str) and not is_local_path(dataset) else []


def _data_file_name(recipe: dict[str, Any]) -> str | None:
    arguments = _data_arguments(recipe)
    source = arguments.get("train") or arguments.get("dataset")  # a file, or a local dataset folder
    return Path(source).name if isinstance(source, str) else None


def _data_arguments(recipe: dict[str, Any]) -> dict[str, Any]:
    return (recipe.get("data") or {}).get("init_args") or {}


def _title(name: str, task: FinetuneTask) -> str:
    described = "\n".join(f"- {line}" for line in task.describe_task().splitlines())
    return f"# {name}\n\nFine-tuned with `finetune` from `{task.backbone.name}`.\n\n{described}"


def _copy_plots(source: Path, target: Path) -> list[Path]:
    if target.exists():
        shutil.rmtree(target)
    if not source.is_dir() or not any(source.glob("*.png")):
        return []
    target.mkdir(parents=True)
    return [Path(shutil.copy2(png, target / png.name)) for png in sorted(source.glob("*.png"))]


def _recipe_section(recipe_text: str) -> str:
    if not recipe_text:
        return ""
    return (
        "## Recipe\n\n<details><summary>config.yaml: the resolved recipe "
        "(<code>python -m finetune fit --config config.yaml</code> reruns it)</summary>\n\n"
        f"```yaml\n{recipe_text.rstrip()}\n```\n\n</details>"
    )


def _training_section(task: FinetuneTask, export: Path) -> str:
    from finetune.strategies import AdapterStrategy, describe_strategy

    described = describe_strategy(task.strategy)
    arguments = ", ".join(f"{key}={value}" for key, value in described.items() if key != "name")
    parameters = list(task.model.parameters()) if task.model is not None else []
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    if (export / ADAPTER_CONFIG).is_file():
        written = (
            "the adapters alone, in peft's format (load the base model, then `PeftModel.from_pretrained`)"
        )
    elif isinstance(task.strategy, AdapterStrategy):
        written = "the adapters merged into plain weights (no peft needed)"
    else:
        written = "the whole model, in its library's own format"
    return (
        "## What trained\n\n"
        f"- strategy: `{described['name']}`" + (f" ({arguments})" if arguments else "") + "\n"
        f"- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)\n"
        f"- this folder holds {written}"
    )


def _metrics_section(metrics: dict[str, float], task: FinetuneTask) -> str:
    if not metrics:
        return ""
    rows = "\n".join(f"| {key} | {value:.4f} |" for key, value in metrics.items())
    return (
        "## Metrics\n\n"
        f"Validation metrics of the epoch with the best `{task.monitor.metric}` (the checkpoint exported "
        "here; the last epoch when that metric was not logged); test metrics of that checkpoint.\n\n"
        f"| metric | value |\n|---|---|\n{rows}"
    )


def _plots_section(plots: list[Path]) -> str:
    if not plots:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{p.stem}]({PLOTS}/{p.name})" for p in plots)
