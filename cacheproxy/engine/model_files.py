"""Where a model's files are: the built-in tiny model, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from cacheproxy.engine.request import EngineError
from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.log import get_logger

log = get_logger(__name__)

TINY_MODEL_NAME = "tiny-llama"
# What the engine reads besides the weights; no *.bin/*.pt/*.gguf (we load safetensors only) nor README/images.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFound(EngineError):
    """The model could not be found locally nor fetched."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="model_not_found", status=404)


def tiny_model_path(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / TINY_MODEL_NAME


def ensure_tiny_model(data_dir: Path) -> Path:
    """The built-in model, written on first use. Written aside and renamed, so that a crash or a
    second process starting at the same time never leaves a half-written folder behind."""
    target = tiny_model_path(data_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=target.parent))
    try:
        make_tiny_model(staging, arch="llama", seed=0)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished first: its copy is byte-identical to ours.
        else:
            log.info("tiny model written", path=str(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str | None, data_dir: Path) -> Path:
    """The folder holding the model's config, weights and tokenizer.

    None: the built-in tiny model (made on first use). An existing folder: itself. Otherwise a
    hub id, downloaded (or found in the hub cache when offline).
    """
    if model is None or model == "":
        return ensure_tiny_model(data_dir)
    local = Path(os.path.expanduser(model))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(
                f"{local} is a folder but holds no config.json: not a Hugging Face model folder"
            )
        return local
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ModelNotFound(f"model folder {model!r} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelNotFound(f"{repo_id!r} is not a local folder and huggingface_hub is not installed") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
        allow, ignore = weight_patterns(Path(path))
        path = snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore)
    except HfHubHTTPError as e:
        raise ModelNotFound(
            f"could not download {repo_id!r} from the Hugging Face hub: {e}. Check the id, and set HF_TOKEN "
            "for gated models."
        ) from e
    except Exception as e:
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local hub cache"
            if offline
            else "the hub could not be reached (no network?) and it is not in the local hub cache"
        )
        detail = str(e).strip().rstrip(".")
        raise ModelNotFound(
            f"model {repo_id!r} is not a local folder and {how} ({type(e).__name__}: {detail}). Pass a "
            "local folder, download it where there is network (`hf download` / huggingface-cli), set "
            "HF_HUB_OFFLINE=1 to read the hub cache only, or leave the model unset to serve the "
            "built-in tiny model."
        ) from e
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{repo_id!r} downloaded to {folder} but it has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFound(f"{repo_id!r} has no .safetensors weights (only safetensors are supported)")
    return folder


def _indexed_weight_files(folder: Path) -> list[str] | None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values())) or None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def weight_patterns(folder: Path) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns of the weight files to fetch, given the folder of the other files: those
    the index names, or else the top folder's *.safetensors. Either way not Mistral's own-format copy
    (`consolidated.safetensors`, as large again as the weights themselves) nor a subfolder's files
    (`original/`)."""
    names = _indexed_weight_files(folder)
    if names:
        return names, []
    return ["*.safetensors"], ["*/*", "consolidated*.safetensors"]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding a model folder's weights: those its index names, or else every one
    at its top but Mistral's own-format copy."""
    names = _indexed_weight_files(path)
    if names:
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    return [f for f in files if not f.name.startswith("consolidated")] or files


def model_fingerprint(path: Path) -> bytes:
    """A digest that names the model for the prefix cache: config.json's bytes and the names and sizes of
    its safetensors files. Equal on every machine holding the same files; reading the weights whole
    would cost seconds per GB at start-up."""
    path = Path(path)
    h = hashlib.sha256()
    h.update(b"config.json\0")
    h.update((path / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(f"\0{f.name}\0{f.stat().st_size}".encode())
    return h.digest()
