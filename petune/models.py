"""From a recipe's [model] name to a local model folder, through the model-source plugins."""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

from petune.api import ModelInfo
from petune.errors import UserError


def cache_dir(*parts: str) -> Path:
    """petune's user cache (``$PETUNE_CACHE`` or ``~/.cache/petune``), created on demand."""
    root = Path(os.environ.get("PETUNE_CACHE") or Path.home() / ".cache" / "petune").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_source(name: str, sources: dict):
    """The first model source, by priority, that claims ``name``."""
    for source in sorted(sources.values(), key=lambda s: (s.priority, s.name)):
        if source.claims(name):
            return source
    known = sorted(n for s in sources.values() for n in s.names())
    raise UserError(
        f"no model source knows {name!r}",
        where="model.name",
        hint=f"use a packaged model ({', '.join(known)}), a local folder, a .gguf file or a cached Hub id",
    )


def resolve_model(name: str, sources: dict) -> ModelInfo:
    """Resolve a model name to its folder and read its config (no weights load)."""
    path = find_source(name, sources).resolve(name)
    refuse_remote_code(path)
    try:
        return ModelInfo.from_path(name, path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config in {path}: {exc}", where="model.name") from exc


# -- no code from model folders -------------------------------------------------------------
# A model folder is data, like a recipe. transformers can run Python files that a folder's
# config names in ``auto_map`` and, when unsure, *asks on stdin* — so piped input could say
# yes. petune passes trust_remote_code=False everywhere and refuses such folders up front.
def refuse_remote_code(path: Path) -> None:
    """Refuse a model folder whose config needs its own Python code to load."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no readable config: the config loader reports that with its own message
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"the model in {path} needs its own Python code to load (config.json has auto_map and "
                        f"model_type {model_type!r}, which transformers does not know); petune never runs code "
                        "from a model folder", where="model.name",
                        hint="use a model whose architecture transformers supports natively")


def load_tokenizer(path: Path, **kwargs):
    """``AutoTokenizer.from_pretrained`` that never runs a folder's own code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(f"the tokenizer in {path} needs its own Python code to load; petune never runs code "
                        "from a model folder", where=str(path),
                        hint="save a tokenizer transformers supports natively (e.g. tokenizer.json)") from None


@contextmanager
def loading_weights(path: Path):
    """Pickled weights (``.bin``, ``.pt``) load with ``weights_only``; one that holds more
    than tensors is refused with a message instead of a traceback."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing the pickled weights in {path}: they hold objects other than tensors, and "
                        f"loading them could run code ({str(exc).splitlines()[0][:200]})", where="model.name",
                        hint="use weights saved as .safetensors (model.save_pretrained(folder) writes them)") from None
