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
from datetime import UTC, datetime
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
        _set_run_permissions(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _set_run_permissions(folder: Path) -> None:
    """Files written by libraries (peft, safetensors, tokenizers) get the same permissions
    as petune's own run files: what the umask allows, not a library's private 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def save_figure(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def is_run_folder(path: Path) -> bool:
    """A folder petune made: its manifest parses and has petune's fields."""
    try:
        manifest = read_json(Path(path) / "manifest.json")
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"status", "started", "versions"} <= manifest.keys()


def not_a_run_folder(path: Path) -> str | None:
    """Why ``path`` is not a run folder petune made; None when it is."""
    return None if is_run_folder(path) else "it is not a petune run folder (it has no petune manifest.json)"


def why_not_replaceable(path: Path, protected: list[Path], ours=not_a_run_folder, reader: str = "this run") -> str | None:
    """Why a command must not delete ``path`` to write its output there; None when it may.
    Every command that replaces output (``run``/``merge``/``export --overwrite``, ``cache
    clear``) asks here, so they refuse alike: never home or the current folder, nor a folder
    holding either; never a link (deleting through it reaches somewhere else); never what the
    command reads (``protected``; ``reader`` names the command), a folder holding it or a
    place inside a folder of it; and only what petune wrote: ``ours(path)`` says why ``path`` is not (None: it is)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_symlink():
        return f"it is a symbolic link (to {os.readlink(path)}), not something petune wrote"
    path = path.resolve()
    for name, place in (("your home folder", Path.home()), ("the current folder", Path.cwd())):
        place = place.resolve()
        if path == place:
            return f"it is {name}"
        if path in place.parents:
            return f"it holds {name} ({place})"
    for keep in protected:
        keep = Path(keep).expanduser().resolve()
        if path == keep or path in keep.parents:
            return f"it holds {keep}, which {reader} reads"
        if keep in path.parents and keep.is_dir():
            return f"it is inside {keep}, which {reader} reads"
    return ours(path)


def refuse_to_replace(path: Path, protected: list[Path], ours=not_a_run_folder, *, reader: str = "this run",
                      option: str = "--overwrite",
                      hint: str = "pick a new output path, or delete it yourself if it is no longer needed") -> None:
    """A UserError (exit 2) when :func:`why_not_replaceable` finds a reason; nothing is deleted."""
    reason = why_not_replaceable(path, protected, ours, reader)
    if reason:
        raise UserError(f"{option} refused: {reason}; nothing was deleted", where=str(path), hint=hint)


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output ``path`` whose folder cannot be written (the nearest
    existing folder above it must take a new file)."""
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is a file, not a folder", where=str(path), hint="pick another output path")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise UserError(f"cannot write in {parent}: {exc.strerror or exc}", where=str(path),
                        hint="pick a writable output path") from None


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse to write into an existing folder unless asked to, refuse to replace anything
    but a petune run, refuse a folder another petune process holds, and check that the
    folder can be created — without leaving anything behind if the run fails early."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError("output path exists and is not a folder", where=str(path))
    in_use = RunLock.holder(path)
    if in_use:
        raise UserError(f"the run folder is in use by another petune process ({in_use})", where=str(path),
                        hint="wait for it to finish, stop it, or set output.dir elsewhere")
    if path.exists() and any(path.iterdir()):
        if not (resume or overwrite):
            raise UserError("output folder already exists", where=str(path),
                            hint="pass --resume to continue it, --overwrite to replace it, or set output.dir elsewhere")
        if overwrite and not resume:
            refuse_to_replace(path, list(protected),
                              hint="--overwrite only replaces a previous petune run; set output.dir to a new folder")
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


def start_run_dir(path: Path, *, overwrite: bool, resume: bool, protected: list[Path] = ()) -> RunLock:
    """Lock the run folder (created if needed) and, for ``--overwrite``, empty it. The
    lock is held until ``release()`` or the process ends."""
    path = Path(path)
    lock = RunLock(path)
    if overwrite and not resume and is_run_folder(path):
        try:  # checked again: the folder may have changed
            refuse_to_replace(path, list(protected))
        except UserError:
            lock.release()
            raise
        for child in path.iterdir():
            if child.name == RunLock.FILE:
                continue  # keep our own lock: deleting its file would let a second process lock a new one
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return lock


class RunLock:
    """An advisory lock (``flock``) on a run folder, naming its holder, so two petune
    processes never train into the same folder. The kernel drops it when the process
    dies, so a crash never leaves a stale lock."""

    FILE = ".petune.lock"

    def __init__(self, folder: Path):
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / self.FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(self.fd)
            os.close(self.fd)
            raise UserError(f"the run folder is in use by another petune process ({holder})", where=str(folder),
                            hint="wait for it to finish, stop it, or set output.dir elsewhere") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {platform.node()}, since {now()}\n".encode(), 0)

    @staticmethod
    def _read(fd: int) -> str:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"

    @classmethod
    def holder(cls, folder: Path) -> str | None:
        """Who holds the folder's lock, or None when nobody does (nothing is created)."""
        import fcntl

        try:
            fd = os.open(Path(folder) / cls.FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError:
            return cls._read(fd)
        finally:
            os.close(fd)  # closing drops our shared lock, if we got it

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


# -- whose folder is it: scratch folders of processes that may be gone ------------------------
OWNER_FILE = "owner.json"
#: a folder whose owner cannot be told dead (another machine or PID namespace, no owner file)
#: is removed only when nothing in it changed for this long
ORPHAN_AGE = 7 * 24 * 3600


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): a pid
    reused by a new process has another."""
    line = _read_first_line(f"/proc/{pid}/stat")
    return line.rpartition(")")[2].split()[19] if line else None


def process_identity() -> dict:
    """Who this process is, precisely enough for another process to tell, later, that it is
    certainly gone: host, boot, PID namespace (containers), pid and start time."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {"host": platform.node(), "boot": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace, "pid": os.getpid(), "start": _process_start(os.getpid())}


def process_gone(identity: dict) -> bool:
    """True only when the process ``identity`` describes is certainly dead: it ran on this
    machine since its last boot, in this PID namespace, and its pid is now free or another
    process's. A process elsewhere (another host, container or boot) is never called dead."""
    me = process_identity()
    if not isinstance(identity, dict) or not isinstance(identity.get("pid"), int) or me["boot"] is None:
        return False
    if any(identity.get(k) != me[k] for k in ("host", "boot", "pid_namespace")):
        return False
    start = _process_start(identity["pid"])
    return start is None or start != identity.get("start")


def mark_owner(folder: Path) -> None:
    """Record in ``folder`` which process works in it (see :func:`left_by_dead_process`)."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps(process_identity()), encoding="utf-8")


def left_by_dead_process(folder: Path, now: float | None = None) -> bool:
    """A folder :func:`mark_owner` marked whose process is certainly gone, or one whose owner
    cannot be told (unmarked, or elsewhere) in which nothing changed for :data:`ORPHAN_AGE`."""
    import time

    folder = Path(folder)
    try:
        identity = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if identity is not None:
        if process_gone(identity):
            return True
        me = process_identity()
        if all(identity.get(k) == me[k] for k in ("host", "boot", "pid_namespace")):
            return False  # on this machine, in this namespace, and alive
    try:
        newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])
    except OSError:
        return False
    return (now or time.time()) - newest > ORPHAN_AGE


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], check=False, cwd=cwd, capture_output=True, text=True, timeout=5)
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
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is not a folder)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
