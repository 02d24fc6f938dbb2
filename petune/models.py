"""From a recipe's [model] name to a local model folder, through the model-source plugins."""

from __future__ import annotations

import os
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
    try:
        return ModelInfo.from_path(name, path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config in {path}: {exc}", where="model.name") from exc
