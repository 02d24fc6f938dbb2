"""Reinforcement-learning rows of benchmarks/QUALITY.md (issue 36): GRPO on the packaged Gemma 3 270M.

    .venv/bin/python benchmarks/quality/run_grpo.py                     # every row, one at a time
    .venv/bin/python benchmarks/quality/run_grpo.py --only grpo_arithmetic
    .venv/bin/python benchmarks/quality/run_grpo.py --report            # rebuild the section only

Rows (each a ``petune run`` whose command is in the table, so it reproduces the row):

* ``grpo_arithmetic`` — the bundled ``recipes/grpo_arithmetic.toml`` (generated arithmetic word
  problems, rewarded for the right number and the answer format) with a larger step budget;
* ``grpo_reward_model`` — ``benchmarks/quality/grpo_reward_model.toml``: a reward model trained by
  ``recipes/reward_lora.toml`` (first, into ``runs/quality/grpo_rm_reward_model``) is the reward;
  a weight-0 ``math_answer`` reward logs whether its preference is for right sums. Its prompts are
  written by ``make_rm_grpo_prompts.py``.

Run folders go to ``runs/quality/<row>/``, logs to ``runs/quality/logs/``. What each row scored
(``metrics.json``: every reward's held-out mean with its 95% interval, before and after), trained and
cost is kept in ``benchmarks/quality/grpo_results.json``; the section between the grpo markers of
``benchmarks/QUALITY.md`` and the reward curves ``benchmarks/quality/<row>_rewards.png`` are
written from it (nothing typed in by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sections import replace_section  # benchmarks/quality/sections.py, beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "grpo_results.json"
QUALITY_MD = REPO / "benchmarks" / "QUALITY.md"
BEGIN, END = "<!-- grpo:begin (written by benchmarks/quality/run_grpo.py) -->", "<!-- grpo:end -->"
PETUNE = str(REPO / ".venv" / "bin" / "petune")
ROWS = {  # id → (what the row is, the petune run arguments)
    "grpo_arithmetic": ("GRPO (DAPO loss), lora — math_answer + format regex",
                        ["recipes/grpo_arithmetic.toml", "--set", "train.max_steps=80",
                         "--set", 'output.dir="runs/quality/grpo_arithmetic"']),
    "grpo_reward_model": ("GRPO (DAPO loss), lora — reward model (+ math_answer at weight 0)",
                          ["benchmarks/quality/grpo_reward_model.toml"]),
}


def _run(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``petune run ARGS --overwrite``; (wall seconds, CPU seconds of the process)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # one compute thread, as run_all.py's rows: on the shared 2-core machine a second thread waits at every
    # parallel region for a core another job holds (generating a batch took 50 s with two threads, 8 s with one)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(["nice", "-n", "10", PETUNE, "run", *args, "--overwrite"], stdout=out,
                                 stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"petune run {' '.join(args)} failed: see {log}")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def prepare(row: str) -> None:
    if row == "grpo_reward_model":
        subprocess.run([sys.executable, str(HERE / "make_rm_grpo_prompts.py")], check=True, cwd=REPO)
        _run(["recipes/reward_lora.toml", "--set", 'output.dir="runs/quality/grpo_rm_reward_model"'],
             REPO / "runs" / "quality" / "logs" / "grpo_rm_reward_model.log")


def collect(row: str, wall: float | None, cpu: float | None) -> dict:
    run = REPO / "runs" / "quality" / row
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    history = json.loads((run / "log_history.json").read_text())
    recipe = (run / "recipe.toml").read_text()
    train_time = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
    steps = [h for h in history if "reward" in h]
    shutil.copyfile(run / "plots" / "rewards.png", HERE / f"{row}_rewards.png")
    return {"row": row, "what": ROWS[row][0], "command": "petune run " + shlex.join(ROWS[row][1]),
            "before": metrics.get("validation_before"), "after": metrics.get("validation"),
            "trainable": manifest.get("trainable_parameters") or manifest.get("parameters"),
            "train_time_s": train_time, "wall_s": wall, "cpu_s": cpu, "steps": len(steps),
            "train_reward_first": [h["reward"] for h in steps[:5]], "train_reward_last": [h["reward"] for h in steps[-5:]],
            "recipe": recipe}


def _fmt(m: dict | None, key: str) -> str:
    if not m or key not in m:
        return "—"
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def section(results: dict) -> str:
    lines = [BEGIN, "", "## Reinforcement learning with rewards (issue 36)", "",
             (HERE / "grpo_reading.md").read_text().strip() if (HERE / "grpo_reading.md").exists() else "", "",
             "| row | held-out prompts | reward | before | after | completion tokens (before → after) | "
             "cut at max length (before → after) | training steps | training time (wall) | CPU time | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        before, after = r["before"] or {}, r["after"] or {}
        rewards = [k for k in after if not k.endswith("_ci95") and k not in ("completion_length", "clipped", "prompts")]
        for i, reward in enumerate(rewards):
            first = i == 0
            lines.append("| " + " | ".join([
                f"{r['what']}" if first else "", str(after.get("prompts", "")) if first else "",
                f"`{reward}`" if reward != "reward" else "**weighted total**",
                _fmt(before, reward), f"**{_fmt(after, reward)}**",
                f"{before.get('completion_length', float('nan')):.1f} → {after.get('completion_length', float('nan')):.1f}"
                if first else "",
                f"{before.get('clipped', float('nan')):.2f} → {after.get('clipped', float('nan')):.2f}" if first else "",
                str(r["steps"]) if first else "",
                f"{r['train_time_s'] / 60:.1f} min" if first and r.get("train_time_s") else "",
                f"{r['cpu_s'] / 60:.1f} min" if first and r.get("cpu_s") else "",
                f"`{r['command']}`" if first else ""]) + " |")
    lines += ["", *[f"![{row} reward curves]({row}_rewards.png)" for row in results], "", END]
    return "\n".join(lines)


def write_report(results: dict) -> None:
    replace_section(QUALITY_MD, BEGIN, END, section(results))
    print(f"wrote the GRPO section of {QUALITY_MD}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated row ids")
    parser.add_argument("--report", action="store_true", help="rebuild the section from the results file only")
    parser.add_argument("--collect", action="store_true", help="read finished run folders without running them")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report:
        for row in (args.only.split(",") if args.only else ROWS):
            if args.collect:
                results[row] = {**results.get(row, {}), **collect(row, results.get(row, {}).get("wall_s"),
                                                                   results.get(row, {}).get("cpu_s"))}
            else:
                prepare(row)
                wall, cpu = _run(ROWS[row][1], REPO / "runs" / "quality" / "logs" / f"{row}.log")
                results[row] = collect(row, wall, cpu)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_report({row: results[row] for row in ROWS if row in results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
