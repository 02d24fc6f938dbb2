"""A model folder on disk, in transformers format: ``/data/models/my-llama``, ``./model``.

The folder must hold ``config.json``, the weights (``*.safetensors`` or
``pytorch_model*.bin``) and the tokenizer files. Relative paths are taken from the
current directory. ``.gguf`` files belong to the ``gguf`` source.
"""

from __future__ import annotations

from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import UserError

#: Prefixes that say "this is a path" even when nothing exists there yet.
PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")


def looks_like_path(name: str) -> bool:
    return name.startswith(PATH_PREFIXES) or Path(name).is_absolute()


def check_model_folder(path: Path, *, name: str | None = None) -> Path:
    """Return ``path`` if it holds config, weights and tokenizer; else a UserError saying
    what is missing. Shared with the other sources that hand back a folder."""
    label = name or str(path)
    if not path.is_dir():
        raise UserError(f"{label}: {path} is a file, not a model folder", where="model.name",
                        hint="point model.name at the folder that holds config.json, or at a .gguf file")
    if not (path / "config.json").is_file():
        raise UserError(f"no config.json in {path}: not a transformers model folder", where="model.name",
                        hint=_hint_for_folder_without_config(path))
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise UserError(f"no weights in {path} (looked for *.safetensors and pytorch_model*.bin)", where="model.name",
                        hint="save the model there with model.save_pretrained(folder)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {path} (looked for {', '.join(_TOKENIZER_FILES[:4])} ...)",
                        where="model.name", hint="save the tokenizer beside the model: tokenizer.save_pretrained(folder)")
    return path


def _hint_for_folder_without_config(path: Path) -> str:
    """Point at what the user probably meant: a .gguf inside, or a sub-folder that is a model."""
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return f"it holds a GGUF file; use model.name = {str(ggufs[0])!r}"
    models = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
    if models:
        return f"did you mean the sub-folder {str(models[0])!r}?"
    return "point model.name at the folder that holds config.json and the weights, or at a .gguf file"


class LocalFolderSource(ModelSource):
    name = "local"
    description = "a model folder on disk in transformers format (config.json, weights, tokenizer)"
    priority = 30

    def claims(self, name: str) -> bool:
        if not name.strip() or name.lower().endswith(".gguf"):
            return False
        return looks_like_path(name) or Path(name).expanduser().exists()

    def resolve(self, name: str) -> Path:
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        path = path.resolve()
        if not path.exists():
            raise UserError(f"model folder not found: {path}", where="model.name",
                            hint=f"check the path (relative paths start from the current directory, {Path.cwd()}); "
                                 "for a Hub id write org/name without ./ or /")
        return check_model_folder(path, name=name)


@hookimpl
def register_model_sources(register):
    register(LocalFolderSource)
