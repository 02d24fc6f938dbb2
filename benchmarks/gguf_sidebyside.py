"""QLoRA on the GGUF file's own blocks against NF4 QLoRA and 16-bit LoRA, on the packaged Gemma
(issue 35, item 4), in one command::

    .venv/bin/python benchmarks/gguf_sidebyside.py --llama-python /work/llama/venv/bin/python

1. **Training**, the same budget for each: the Quickstart recipe (``recipes/qlora_sft.toml``:
   the packaged Q4_K_M file, LoRA r 16 on all linear layers, batch 4, ``--steps`` steps) with
   its base kept as
   * the file's own blocks (``quant_type = "gguf"``, the Quickstart's default),
   * NF4 by bitsandbytes (the file's tensors dequantised, then quantised again), and
   * 16-bit weights (strategy ``lora``: the file's tensors dequantised to the model dtype).
   Each is a ``petune run`` in its own process with ``--threads`` compute threads; reported:
   the median time of a step after the first logged ones (``train_runtime`` between log
   lines), the process's peak RSS (load, training and the held-out evaluation), and the
   held-out loss after training (the run's validation split, loss on the answers).
2. **The base model's held-out loss, petune vs llama.cpp**: the same validation rows (token
   ids and loss positions from petune's data preparation) scored by petune's GGUF backend
   (blocks dequantised per forward, float32 compute) and by llama.cpp (llama-cpp-python in its
   own venv, a child process: ``--llama-python``) on the same file. They must agree: it is the
   same model.

Writes ``WORK/results.json`` and prints the table as Markdown (benchmarks/RESULTS.md). Runs
under both venvs, so only the standard library is imported at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qlora_sft.toml"
DEFAULT_WORK = REPO / "benchmarks" / "out" / "gguf_sidebyside"  # git-ignored
#: label -> how the Quickstart's [strategy] table changes
VARIANTS = {
    "GGUF-native QLoRA (the file's blocks)": lambda s: s,
    "NF4 QLoRA (bitsandbytes)": lambda s: {**s, "quant_type": "nf4", "double_quant": True},
    "16-bit LoRA": lambda s: {k: v for k, v in s.items() if k != "quant_type"} | {"name": "lora"},
}


def recipe_for(strategy: dict, steps: int, out: Path) -> dict:
    recipe = tomllib.loads(RECIPE.read_text())
    recipe["strategy"] = strategy(recipe["strategy"])
    recipe["task"]["train"] = str((RECIPE.parent / recipe["task"]["train"]).resolve())
    recipe["task"]["num_sample_generations"] = 0
    recipe["train"].update(max_steps=steps, logging_steps=1)
    recipe["output"] = {"dir": str(out)}
    return recipe


def train(label: str, recipe: dict, work: Path, threads: int) -> dict:
    import tomli_w

    slug = label.split(" (")[0].lower().replace(" ", "-")
    path = work / f"{slug}.toml"
    path.write_text(tomli_w.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "petune", "run", str(path), "--overwrite"], env=env)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS (KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label}: petune run failed (exit {os.waitstatus_to_exitcode(status)})")
    run_dir = Path(recipe["output"]["dir"])
    history = json.loads((run_dir / "log_history.json").read_text())
    times = [(h["step"], h["train_runtime"]) for h in history if "loss" in h and "train_runtime" in h]
    steps = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(times, times[1:]) if s2 > s1]
    warm = sorted(steps[2:] or steps)  # the first steps pay one-off costs (allocations, caches)
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    return {"label": label, "run": str(run_dir), "step_s": warm[len(warm) // 2], "peak_rss_bytes": usage.ru_maxrss * 1024,
            "validation_loss": metrics["loss"], "wall_s": time.perf_counter() - started}


# -- the base model's held-out loss ------------------------------------------------------------
def petune_base_loss(job: dict) -> dict:
    """The validation rows as petune prepares them, scored by the GGUF backend (float32)."""
    import torch

    torch.set_num_threads(job["threads"])
    from transformers import AutoModelForCausalLM

    from petune import runner
    from petune.api import load_pretrained
    from petune.plugins import get_host
    from petune.recipe import load_recipe
    from petune_plugins.strategies.gguf_backend import KEEP_BLOCKS

    host = get_host()
    recipe = load_recipe(Path(job["recipe"]), host)
    task, strategy = host.task(recipe.task_name), host.strategy(recipe.strategy_name)
    info = runner.check_model(recipe, host, task, strategy)
    rows = runner.prepare_data(recipe, host, task, info).data.validation
    model = load_pretrained(AutoModelForCausalLM, info.path, dtype=torch.float32, **{KEEP_BLOCKS: "float32"}).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float().numpy()
            out.append({"ids": row["input_ids"], "labels": row["labels"], **_nll(logits, row["labels"][1:])})
    return {"rows": out}


def llama_base_loss(job: dict) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=job["model_path"], n_ctx=1024, n_threads=job["threads"], logits_all=True,
                          verbose=False)
    out = []
    for row in job["rows"]:
        llm.reset()
        llm.eval(row["ids"])
        out.append(_nll(np.asarray(llm.scores[: len(row["ids"]) - 1], dtype=np.float32), row["labels"][1:]))
    return {"rows": out}


def _nll(logits, targets: list[int]) -> dict:
    """Summed negative log-likelihood (float64) of the targets that are not -100 under ``logits``
    (a numpy array, one row per position), and their count."""
    import numpy as np

    rows = [i for i, t in enumerate(targets) if t != -100]
    chosen = logits[rows].astype(np.float64)
    top = chosen.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(chosen - top).sum(axis=1))
    return {"nll": float((log_z - chosen[np.arange(len(rows)), [targets[i] for i in rows]]).sum()), "tokens": len(rows)}


def _child(python: str, role: str, job: dict, work: Path) -> dict:
    job_file, result_file = work / f"{role}-job.json", work / f"{role}-result.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([python, __file__, "--child", role, str(job_file), str(result_file)], check=True, env=env)
    return json.loads(result_file.read_text())


def _gguf_path() -> str:
    out = subprocess.run([sys.executable, "-c", (
        "from petune.models import resolve_model; from petune.plugins import get_host\n"
        "from petune_plugins.sources.gguf_file import gguf_for_folder\n"
        "print(gguf_for_folder(resolve_model('gemma-3-270m', get_host().model_sources()).path))")],
        check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def markdown(trained: list[dict], base: dict) -> str:
    lines = ["| base kept as | step (median) | peak RSS | held-out loss after training |", "|---|---:|---:|---:|"]
    for r in trained:
        lines.append(f"| {r['label']} | {r['step_s']:.2f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{r['validation_loss']:.4f} |")
    lines += ["", "| the base model (no adapter), held-out loss | petune's GGUF backend | llama.cpp | difference |",
              "|---|---:|---:|---:|",
              f"| {base['rows']} rows, {base['tokens']} answer tokens | {base['petune']:.4f} | {base['llama']:.4f} | "
              f"{base['petune'] - base['llama']:+.4f} |"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default="/work/llama/venv/bin/python")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("ROLE", "JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, job_file, result_file = args.child
        job = json.loads(Path(job_file).read_text())
        result = petune_base_loss(job) if role == "petune" else llama_base_loss(job)
        Path(result_file).write_text(json.dumps(result))
        return 0

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    trained = []
    for label, strategy in VARIANTS.items():
        recipe = recipe_for(strategy, args.steps, work / label.split(" (")[0].lower().replace(" ", "-"))
        trained.append(train(label, recipe, work, args.threads))
        print(json.dumps(trained[-1]), flush=True)

    ours = _child(sys.executable, "petune", {"recipe": str(work / "gguf-native-qlora.toml"), "threads": args.threads},
                  work)
    theirs = _child(args.llama_python, "llama", {"model_path": _gguf_path(), "threads": args.threads,
                                                 "rows": [{"ids": r["ids"], "labels": r["labels"]} for r in ours["rows"]]},
                    work)
    tokens = sum(r["tokens"] for r in ours["rows"])
    base = {"rows": len(ours["rows"]), "tokens": tokens, "petune": sum(r["nll"] for r in ours["rows"]) / tokens,
            "llama": sum(r["nll"] for r in theirs["rows"]) / tokens}
    (work / "results.json").write_text(json.dumps({"steps": args.steps, "threads": args.threads, "trained": trained,
                                                   "base_loss": base}, indent=2))
    print(markdown(trained, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
