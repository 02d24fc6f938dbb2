"""Preference-tuning and reward-model rows of benchmarks/QUALITY.md (issue 24), on HH-RLHF.

    .venv/bin/python benchmarks/quality/prep_hh_rlhf.py                 # split the pairs (once)
    .venv/bin/python benchmarks/quality/run_preference.py               # every row, one at a time
    .venv/bin/python benchmarks/quality/run_preference.py --only hh_dpo_lora
    .venv/bin/python benchmarks/quality/run_preference.py --report      # rebuild the section only

Each row is ``petune run benchmarks/quality/<row>.toml --overwrite`` with one compute thread, as
``run_all.py`` runs its rows but at normal priority (under ``nice -n 10`` on the shared 2-core
machine, with a load average of 8, a row got under 10% of a core); its run folder goes to
``runs/quality/<row>/``. What it scored (``metrics.json``: held-out accuracy and margin before
and after), trained and cost (wall and CPU time of the whole process) is kept in
``benchmarks/quality/preference_results.json``, from which the section between the preference
markers of ``benchmarks/QUALITY.md`` is written (nothing typed in by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from sections import replace_section  # benchmarks/quality/sections.py, beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "preference_results.json"
READING = HERE / "preference_reading.md"
QUALITY_MD = REPO / "benchmarks" / "QUALITY.md"
BEGIN, END = "<!-- preference:begin (written by benchmarks/quality/run_preference.py) -->", "<!-- preference:end -->"
ROWS = {  # id → what the row is
    "hh_reward_minilm": "reward model, full",
    "hh_dpo_lora": "DPO (sigmoid), lora",
    "hh_simpo_lora": "SimPO, lora",
    "hh_dpo_qlora": "DPO (sigmoid), qlora",
}


def run_one(row: str) -> dict:
    recipe = HERE / f"{row}.toml"
    out = f"runs/quality/{row}"
    cmd = [str(REPO / ".venv/bin/petune"), "run", str(recipe.relative_to(REPO)), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log = REPO / "runs" / "quality" / "logs" / f"{row}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {row}: {shlex.join(cmd[1:])} (log {log})", flush=True)
    start = time.time()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall, cpu = time.time() - start, usage.ru_utime + usage.ru_stime
    code = os.waitstatus_to_exitcode(status)
    print(f"    exit {code}, wall {wall / 60:.1f} min, cpu {cpu / 60:.1f} min", flush=True)
    return {"exit": code, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "run_dir": out,
            "command": f"petune run {recipe.relative_to(REPO)}", **collect(REPO / out)}


def collect(run_dir: Path) -> dict:
    def read(name):
        try:
            return json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            return None

    manifest = read("manifest.json") or {}
    history = read("log_history.json") or []
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    recipe = tomllib.loads((run_dir / "recipe.toml").read_text()) if (run_dir / "recipe.toml").exists() else {}
    return {"status": manifest.get("status"), "trainable_parameters": manifest.get("trainable_parameters"),
            "total_parameters": manifest.get("total_parameters"), "device": manifest.get("device"),
            "metrics": read("metrics.json") or {}, "train_runtime_s": summary.get("train_runtime"),
            "steps": summary.get("step"), "losses": [h["loss"] for h in history if "loss" in h],
            "recipe": recipe}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated row ids: " + ", ".join(ROWS))
    parser.add_argument("--report", action="store_true", help="only rebuild the QUALITY.md section")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.only.split(",")] if args.only else list(ROWS)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report:
        for row in rows:
            results[row] = run_one(row)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            publish(results)
    publish(results)
    return 0


# -- the QUALITY.md section ------------------------------------------------------------------
def _count(n) -> str:
    if n is None:
        return "—"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.{2 if unit == 'k' else 1}f}{unit}"
    return str(n)


def _minutes(seconds) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def _settings(entry: dict) -> str:
    recipe = entry.get("recipe") or {}
    task, strategy, train = recipe.get("task", {}), recipe.get("strategy", {}), recipe.get("train", {})
    parts = []
    if task.get("name") == "preference":
        parts.append(f"β {task.get('beta')}" + (f", γ {task['simpo_gamma']}" if task.get("method") == "simpo" else ""))
    if strategy.get("r"):
        parts.append(f"r={strategy['r']}, alpha={strategy.get('alpha')}")
    if strategy.get("name") == "qlora":
        parts.append(f"{strategy.get('quant_type', 'nf4')}, compute {strategy.get('compute_dtype', 'bfloat16')}")
    parts.append(f"lr {train.get('learning_rate'):g}")
    prompt = task.get("max_prompt_length")
    parts.append(f"max_length {task.get('max_length')}" + (f" (prompt ≤ {prompt})" if prompt else ""))
    return ", ".join(parts)


def _budget(entry: dict) -> str:
    recipe = entry.get("recipe") or {}
    train, task = recipe.get("train", {}), recipe.get("task", {})
    steps, batch = entry.get("steps") or train.get("max_steps"), train.get("batch_size")
    held = task.get("max_rows")
    pairs = f"first {held} of 2,000 training pairs" if held else "of 2,000 training pairs"
    return f"{steps} steps × {batch} = {steps * batch:,} pairs ({pairs})" if steps and batch else "—"


def _cell(before: dict, after: dict, key: str, digits: int = 3) -> str:
    if key not in after:
        return "—"
    start = f"{before[key]:.{digits}f} → " if key in before else ""
    return f"{start}**{after[key]:.{digits}f}**"


def section(results: dict) -> list[str]:
    lines = [BEGIN, "", "## Preference tuning and reward models on HH-RLHF (issue 24)", "",
             ("Data: `../shared/data/preference/hh_rlhf_harmless_base_test.jsonl.gz` (Anthropic HH-RLHF, harmless-base "
             "test split, 2,312 pairs; see its `SOURCES.md` entry), split in file order by "
             "`benchmarks/quality/prep_hh_rlhf.py`: the first 2,000 pairs to train, the other 312 held out "
             "(files under the git-ignored `benchmarks/out/`). Whole dialogues are split by the task into the "
             "shared prompt and the two answers. Rows run one after the other by "
             "`benchmarks/quality/run_preference.py` (one compute thread, normal priority) on the project's 2-core "
             "CPU machine shared with other engineers' jobs (load average 6–8 while these ran: each row got "
             "well under one core, so wall time is inflated; CPU time is the steadier figure). One seed (42)."),
             "",
             ("**Budget.** CPU time was the limit (about an hour of wall time for all rows, on a shared core). "
              "The Gemma 3 270M rows train on the first 48 training pairs (`max_rows = 48`: one epoch of 12 steps "
              "× 4 pairs) and are scored on the first 48 of the 312 held-out pairs, prompts cut to their last 48 "
              "tokens and answers to their first 48 (`max_length = 96`); one DPO step on Gemma (4 pairs, chosen + "
              "rejected, policy and reference) took about 55 s of wall time at most of a core. "
              "The MiniLM reward model trains on 640 of the "
              "2,000 pairs (80 steps × 8) and is scored on all 312. With 48 scored pairs one pair is 2.1 points "
              "of accuracy and the 95% interval of an accuracy near 0.5 is about ±0.14, so the Gemma rows show "
              "whether the methods move the margin, not a converged accuracy."),
             "",
             ("Accuracy: share of held-out pairs whose chosen answer gets the higher reward (ties count half); "
             "margin: mean reward of chosen minus rejected. For DPO the reward is β·(log π − log π_ref) summed over "
             "the answer, so before training the model is its own reference and accuracy is 0.5, margin 0, by "
             "definition; `logp accuracy` is the model's own preference by summed log-probability (the base "
             "model's \"before\" figure is the informative one there). For SimPO the reward is β × the mean token "
             "log-probability (no reference). For the reward model it is the head's score (a random new head before "
             "training). Training time is the Trainer's loop, which includes scoring the held-out pairs before "
             "the first step; CPU time is the whole `petune run` process."),
             "",
             ("| row | model | held-out pairs | accuracy (before → after) | margin (before → after) | logp accuracy "
             "(before → after) | trainable params | training time (wall) | CPU time | budget | settings | device "
             "| command |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for row, label in ROWS.items():
        entry = results.get(row)
        if not entry or entry.get("status") != "completed":
            state = "not run (CPU time)" if not entry else f"did not finish ({entry.get('status') or 'exit ' + str(entry.get('exit'))})"
            lines.append(f"| {label} | — | — | {state} | — | — | — | — | — | — | — | — | "
                         f"`petune run benchmarks/quality/{row}.toml` |")
            continue
        metrics = entry["metrics"]
        before, after = metrics.get("validation_before", {}), metrics.get("validation", {})
        model = (entry.get("recipe") or {}).get("model", {}).get("name", "—")
        trainable, total = entry.get("trainable_parameters"), entry.get("total_parameters")
        share = f" ({100 * trainable / total:.2f}%)" if trainable and total else ""
        lines.append(" | ".join([
            f"| {label}", f"`{model}`", str(after.get("pairs", "—")), _cell(before, after, "accuracy"),
            _cell(before, after, "margin"), _cell(before, after, "logp_accuracy"), _count(trainable) + share,
            _minutes(entry.get("train_runtime_s")), _minutes(entry.get("cpu_s")), _budget(entry), _settings(entry),
            "cpu: x86_64, 2 cores, shared, 1 thread", f"`{entry['command']}` |"]))
    total_cpu = sum((e or {}).get("cpu_s") or 0 for e in results.values())
    lines += ["", f"CPU time of these rows together: {total_cpu / 60:.0f} min."]
    if READING.exists():  # what the figures say, written by hand after the runs
        lines += ["", *READING.read_text().rstrip().split("\n")]
    lines += ["", END]
    return lines


def publish(results: dict) -> None:
    replace_section(QUALITY_MD, BEGIN, END, "\n".join(section(results)))


if __name__ == "__main__":
    sys.exit(main())
