"""A run folder and its files. Every write is atomic: temp name, then rename, so a crash
never leaves a half-written file that looks whole.

runs/<name>/
  recipe.toml        the resolved recipe (defaults filled in)
  manifest.json      versions, seed, device, command line, git commit, times, status
  task_state.json    what the task needs to rebuild its model (e.g. labels)
  adapter/ | model/  the trained weights (peft / transformers format)
  tokenizer/         the tokenizer as trained
  metrics.json       final metrics per split
  log_history.json   every logged training/eval step
  plots/loss.png     train and eval loss over steps
  checkpoints/       resumable trainer checkpoints
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import tomli_w

from petune.errors import UserError


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; run files are for everyone who may read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_toml(path: Path, data: dict) -> None:
    write_text(path, tomli_w.dumps(data))


def write_dir(path: Path, fill) -> None:
    """Fill a folder through ``fill(tmp_path)`` and move it into place whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write into an existing run folder unless asked to, and check that the
    folder can be created — without leaving anything behind if the run fails early."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError("output path exists and is not a folder", where=str(path))
    if path.exists() and any(path.iterdir()) and not (resume or overwrite):
        raise UserError("output folder already exists", where=str(path),
                        hint="pass --resume to continue it, --overwrite to replace it, or set output.dir elsewhere")
    if resume and not (path / "recipe.toml").exists():
        raise UserError("nothing to resume: the output folder holds no run", where=str(path))
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise UserError(f"cannot write to the output folder: {exc.strerror or exc}", where=str(path),
                        hint="choose a writable output.dir (e.g. --set output.dir=runs/NAME)") from None


def start_run_dir(path: Path, *, overwrite: bool, resume: bool) -> None:
    if overwrite and not resume and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("petune", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "pluggy", "rich", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def new_manifest(recipe, plugins: list[dict]) -> dict:
    project = Path(__file__).resolve().parents[1]
    return {
        "status": "running",
        "started": now(),
        "ended": None,
        "command": sys.argv,
        "pid": os.getpid(),
        "hostname": platform.node(),
        "recipe": str(recipe.path) if recipe.path else None,
        "seed": recipe.train.seed,
        "model": recipe.model.name,
        "task": recipe.task_name,
        "strategy": recipe.strategy_name,
        "device": device_description(),
        "versions": package_versions(),
        "plugins": plugins,
        "git_commit": git_commit(project),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plot_loss(log_history: list[dict], path: Path) -> None:
    """Train and eval loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)
    plt.close(fig)
