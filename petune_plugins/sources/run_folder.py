"""A finished petune run as the starting model: ``[model] name = "runs/my_sft"``.

This is how runs chain (SFT → DPO): the run's trained weights become the next run's base.
A LoRA/QLoRA run's adapter is merged into its base as trained, in 16/32-bit (a QLoRA base
dequantised, never re-quantised, which would round the update away), as ``petune merge`` does; a full fine-tuning run
is its own model. The result is saved once, with the run's tokenizer (its chat template and
pad token, so the next run renders prompts exactly as this one trained on them) and its
generation settings, to ``$PETUNE_CACHE/runs/<key>``, where the key changes whenever the run's
weights (their bytes), tokenizer or recipe do. Relative paths start from the current directory, as for
local model folders.

Runs whose weights cannot be folded into the base (prompt tuning, bottleneck adapters) are
refused with the reason; so are runs that did not complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from petune import hookimpl
from petune.api import ModelSource
from petune.errors import Refusal, UserError
from petune.models import cache_dir

_RUN_FILES = ("recipe.toml", "task_state.json", "manifest.json")
_FORMAT_VERSION = 2  # bump when what is saved changes, to rebuild caches


def _path(name: str) -> Path:
    path = Path(name).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in _RUN_FILES)


def _fingerprint(run_dir: Path) -> str:
    """Changes when the run's weights, tokenizer or recipe change: their names and bytes (sizes
    and times would miss a file replaced by same-size content with its old time)."""
    digest = hashlib.sha256(f"v{_FORMAT_VERSION}:{run_dir}".encode())
    for sub in ("adapter", "model", "tokenizer"):
        folder = run_dir / sub
        for file in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if file.is_file():
                with open(file, "rb") as f:
                    digest.update(f"{file.relative_to(run_dir)}:".encode() + hashlib.file_digest(f, "sha256").digest())
    for name in ("recipe.toml", "task_state.json"):
        digest.update((run_dir / name).read_bytes())
    return digest.hexdigest()[:24]


class RunFolderSource(ModelSource):
    name = "run"
    description = "a finished petune run folder: its adapter merged into the base (cached), with its tokenizer"
    priority = 26  # before `local` (30), which would take the folder as a plain model folder

    def claims(self, name: str) -> bool:
        if not name.strip() or name.lower().endswith(".gguf"):
            return False
        return is_run_folder(_path(name))

    def resolve(self, name: str) -> Path:
        run_dir = _path(name)
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        status = manifest.get("status")
        if status != "completed":
            raise UserError(f"the run {run_dir} is {status or 'of unknown status'}, not completed: its weights may be "
                            f"missing or half-trained", where="model.name",
                            hint="finish it first (petune run RECIPE --resume), or name a completed run")
        target = cache_dir("runs") / _fingerprint(run_dir)
        if (target / "config.json").is_file():
            return target
        self._merge(run_dir, target)
        return target

    @staticmethod
    def _merge(run_dir: Path, target: Path) -> None:
        from petune import artifacts
        from petune.console import err
        from petune.plugins import PluginHost
        from petune.run_folders import load_run

        err.print(f"merging the run {run_dir} into a standalone model (once; cached in {target})")
        run = load_run(run_dir, PluginHost(), dequantized=True)  # merged into the trained base, dequantised
        try:
            model = run.model if run.strategy.artifact == "model" else run.strategy.merge(run.model)
        except Refusal as exc:
            raise Refusal(f"cannot start from the run {run_dir}: {exc.message}", where="model.name",
                          hint="start from a full, lora or qlora run, or from that run's own base model") from None

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            (tmp / "petune_source_run.json").write_text(
                json.dumps({"run": str(run_dir), "task": run.recipe.task_name, "strategy": run.recipe.strategy_name,
                            "model": run.recipe.model.name}, indent=2) + "\n", encoding="utf-8")

        artifacts.write_dir(target, fill)


@hookimpl
def register_model_sources(register):
    register(RunFolderSource)
