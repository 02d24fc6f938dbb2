"""Helpers for tests that run petune end to end on tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_CLASSIFICATION = """\
[model]
name = "random:tiny-bert"

[task]
name = "classification"
train = "train.csv"
validation = "validation.csv"
max_length = 32

[strategy]
name = "lora"
r = 4
alpha = 8

[train]
batch_size = 4
learning_rate = 1e-3
seed = 7
logging_steps = 5
save_steps = {save_steps}
max_steps = {max_steps}

[eval]
strategy = "no"

[output]
dir = "{out}"
"""


# [strategy] options (beside the name) that keep each strategy small on the tiny models
TINY_STRATEGY_OPTIONS = {
    "full": "",
    "lora": "r = 4\n",
    "qlora": 'r = 4\ncompute_dtype = "float32"\n',
    "adapters": 'config = "houlsby"\nreduction_factor = 4\n',
    "prompt_tuning": 'num_virtual_tokens = 4\ninit = "random"\n',
}


def write_classification_data(folder: Path, n: int = 40) -> None:
    rows = "".join(f"a good movie number {i},pos\na bad film number {i},neg\n" for i in range(n // 2))
    (folder / "train.csv").write_text("text,label\n" + rows)
    (folder / "validation.csv").write_text("text,label\n" + rows[: 200])


def tiny_classification_recipe(folder: Path, out: Path, *, max_steps: int = 20, save_steps: int = 5) -> Path:
    write_classification_data(folder)
    path = folder / "recipe.toml"
    path.write_text(TINY_CLASSIFICATION.format(out=out, max_steps=max_steps, save_steps=save_steps))
    return path


def petune(*args, cwd=REPO, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "petune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False, **kwargs)


def start_petune(*args, cwd=REPO) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "petune", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
