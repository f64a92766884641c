"""Write a fine-tuned model in its family's native format (or its adapters in peft's), loadable without
``finetune``; push an export folder to the Hugging Face Hub."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import RecipeError, first_line, require

if TYPE_CHECKING:
    from finetune.tasks import FinetuneTask

PUSH_KEY = "--push-to-hub"


def write_atomically(directory: Path, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then move the result to ``directory``: readers never see a half-written folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def merged_model(task: FinetuneTask) -> Any:
    """A copy of ``task.model`` with its adapters merged into plain weights, in the dtype the strategy
    loads weights in (a quantised base is dequantised first); ``task.model`` is left as it is."""
    import torch

    from finetune.strategies import AdapterStrategy
    from finetune.strategies.adapters import merged_copy

    strategy = task.strategy
    if not isinstance(strategy, AdapterStrategy):
        raise TypeError(f"{type(strategy).__name__} adds no adapters; there is nothing to merge")
    dtype = strategy.load_options().get("dtype", torch.float32)

    def unquantised_twin() -> Any:
        model = task.load_backbone({"dtype": dtype})
        strategy.inject(model, task.layout)
        return model

    return merged_copy(task.model, unquantised_twin, dtype)


def write_model(
    task: FinetuneTask, target: Path, merge: bool, save_plain: Callable[[Any, Path], None]
) -> None:
    """Adapters alone in peft's format (``merge`` false), or ``save_plain(model, target)`` of a plain model."""
    from finetune.strategies.adapters import has_adapters, save_adapter

    if not has_adapters(task.model):
        save_plain(task.model, target)
    elif merge:
        save_plain(merged_model(task), target)
    else:
        save_adapter(task.model, target, base_model=task.backbone.name)


def export_language_model(task: FinetuneTask, directory: Path, merge: bool = False) -> Path:
    """Export a language model (causal or encoder-decoder) as a Hugging Face folder (safetensors) with its
    tokenizer, or the adapters alone in peft's format; it loads with the matching ``AutoModelFor*LM``."""

    def save_plain(model: Any, target: Path) -> None:
        model.save_pretrained(target)

    def write(target: Path) -> None:
        write_model(task, target, merge, save_plain)
        task.backbone.tokenizer().save_pretrained(target)

    return write_atomically(directory, write)


def hub_client() -> Any:
    """A ``huggingface_hub.HfApi`` that can push; RecipeError (``--push-to-hub``) when the Hub is switched
    off (``HF_HUB_OFFLINE``) or no token is found (``hf auth login``, or ``HF_TOKEN``)."""
    import huggingface_hub

    require(
        not huggingface_hub.is_offline_mode(),
        PUSH_KEY,
        "the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); unset it to push",
    )
    token = huggingface_hub.get_token()
    require(
        bool(token), PUSH_KEY, "not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN"
    )
    return huggingface_hub.HfApi(token=token)


def push_folder(api: Any, folder: Path, repo_id: str) -> str:
    """Create the model repository ``repo_id`` unless it exists and upload ``folder`` (model, card, plots)
    to it with ``api`` (``hub_client()``); return the commit's URL."""
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload {Path(folder).name} with finetune",
        )
    except Exception as error:  # whatever the Hub or the network raises (a bad id, 401, no route): one line
        raise RecipeError(PUSH_KEY, f"pushing to {repo_id} failed: {first_line(error)}") from error
    return str(getattr(commit, "commit_url", repo_id))
