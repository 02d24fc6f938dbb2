"""Task quality on real data (issue 8): run every row, collect the scores, publish them.

    .venv/bin/python benchmarks/quality/run_all.py                  # every row, one at a time
    .venv/bin/python benchmarks/quality/run_all.py --only sst2_full,conll_full
    .venv/bin/python benchmarks/quality/run_all.py --smoke          # tiny budgets: does each recipe work?
    .venv/bin/python benchmarks/quality/run_all.py --report         # rebuild QUALITY.md + chart from results.json

Each row is ``petune run benchmarks/quality/<row>.toml --overwrite`` (the recipe holds the
whole budget), started with ``nice -n 10`` and one compute thread (``OMP_NUM_THREADS=1``:
on a shared 2-core machine two threads fight the other jobs and run about 3x slower).
Rows run strictly one after the other. Run folders go to ``runs/quality/<row>/`` (git
ignores runs/), a log per row to ``runs/quality/logs/<row>.log``. What each row scored,
how long it took and what it trained is merged into ``benchmarks/quality/results.json``,
from which ``benchmarks/QUALITY.md`` (the section between the quality markers only; other
sections of that file are left alone) and ``benchmarks/quality/score_vs_params.png`` are
built.

Instruction-tuning rows also get a "before" run: the same recipe with ``max_steps = 1``,
whose single optimizer step has learning rate 0 (the first step of the warm-up), so the
LoRA B matrices stay exactly zero and the model is the base model (4-bit for QLoRA) — its
held-out loss and its 20 generations are measured by the same code as after training.

The data are read in place from ../shared/data (relative to the repository: the recipes
name ``../../../shared/data/...`` relative to their own folder). A missing data folder
stops the run before anything loads, naming the folder and what it should hold.
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
from datetime import datetime
from pathlib import Path

from sections import replace_section  # benchmarks/quality/sections.py, beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results.json"
QUALITY_MD = REPO / "benchmarks" / "QUALITY.md"
CHART = HERE / "score_vs_params.png"
TEMPLATE = HERE / "QUALITY_template.md"  # the prose of the section; {{KEY}} lines are filled in
RUNS = Path("runs/quality")  # relative to the repository root (the runner's cwd)
BEGIN, END = "<!-- quality:begin (written by benchmarks/quality/run_all.py) -->", "<!-- quality:end -->"

# id → dataset, strategy label, budget text. The recipe is benchmarks/quality/<id>.toml.
ROWS = {
    "sst2_full": ("sst2", "full"),
    "sst2_lora": ("sst2", "lora"),
    "sst2_qlora": ("sst2", "qlora"),
    "sst2_adapters_houlsby": ("sst2", "adapters (houlsby)"),
    "sst2_adapters_pfeiffer": ("sst2", "adapters (pfeiffer)"),
    "sst2_prompt_tuning": ("sst2", "prompt_tuning"),
    # issue 25: peft's methods and LoRA's initialisations side by side, all at one smaller budget
    "sst2_lora_100": ("sst2_peft", "lora"),
    "sst2_ia3": ("sst2_peft", "ia3"),
    "sst2_vera": ("sst2_peft", "vera"),
    "sst2_loha": ("sst2_peft", "loha"),
    "sst2_lokr": ("sst2_peft", "lokr"),
    "sst2_oft": ("sst2_peft", "oft"),
    "sst2_adalora": ("sst2_peft", "adalora"),
    "sst2_lora_pissa": ("sst2_peft", "lora, pissa init"),
    "sst2_lora_olora": ("sst2_peft", "lora, olora init"),
    "sst2_loraplus": ("sst2_peft", "lora+"),
    "sst2_lora_eva": ("sst2_peft", "lora, eva init"),
    "agnews_full": ("agnews", "full"),
    "agnews_lora": ("agnews", "lora"),
    "conll_full": ("conll", "full"),
    "conll_lora": ("conll", "lora"),
    "conll_adapters": ("conll", "adapters (houlsby)"),
    # issue 25: the best two peft methods on SST-2, and plain LoRA, at one smaller budget
    "conll_lora_300": ("conll_peft", "lora"),
    "conll_oft": ("conll_peft", "oft"),
    "conll_adalora": ("conll_peft", "adalora"),
    "alpaca_lora": ("alpaca", "lora"),
    "alpaca_qlora": ("alpaca", "qlora"),
    "multi30k_lora": ("multi30k", "lora"),
    "scitldr_lora": ("scitldr", "lora"),
    "squad_full": ("xquad", "full"),
    "squad_lora": ("xquad", "lora"),
    "squad_adapters": ("xquad", "adapters (houlsby)"),
    "squad_full_2ep": ("xquad_2ep", "full"),
    "squad_lora_2ep": ("xquad_2ep", "lora"),
    "squad_adapters_2ep": ("xquad_2ep", "adapters (houlsby)"),
    "squad_adapters_3ep": ("xquad_2ep", "adapters (houlsby), 3 epochs"),  # 1.5× the steps: not a comparable budget
    "squad_adapters_ln_2ep": ("xquad_2ep", "adapters (houlsby), + norms"),
    "squad_adapters_ln_rf2_2ep": ("xquad_2ep", "adapters (houlsby), + norms, r.f. 2"),
}
DATASETS = {
    "sst2": ("SST-2", "dev accuracy", "validation", "accuracy"),
    "sst2_peft": ("SST-2, peft methods (100 steps)", "dev accuracy", "validation", "accuracy"),
    "agnews": ("AG News", "test accuracy", "test", "accuracy"),
    "conll": ("CoNLL-2003", "test entity F1", "test", "f1"),
    "conll_peft": ("CoNLL-2003, peft methods (300 steps)", "test entity F1", "test", "f1"),
    "alpaca": ("Alpaca instruction tuning", "held-out perplexity", "validation", "perplexity"),
    "multi30k": ("Multi30k en→de", "test_2016_flickr BLEU", "test", "bleu"),
    "scitldr": ("SciTLDR", "test ROUGE-1", "test", "rouge1"),
    "xquad": ("SQuAD → XQuAD (en), 150 steps", "XQuAD F1", "test", "f1"),
    "xquad_2ep": ("SQuAD → XQuAD (en), 2 epochs", "XQuAD F1", "test", "f1"),
}
QA = {"xquad", "xquad_2ep"}  # the same task at two budgets
AGAINST_LORA = {"sst2_peft", "conll_peft"}  # sets without a full row, compared with plain LoRA at their own budget
PERCENT_ALREADY = {"alpaca", "multi30k", "scitldr", *QA}  # scores not in 0..1: shown as they are
WITH_BEFORE = {"alpaca", "multi30k", "scitldr"}  # rows that also score the untrained model
SMOKE = {  # tiny budgets that still go through every step (train, save, evaluate, report)
    "classification": ["train.max_steps=3", "task.max_rows=300", "eval.strategy=no"],
    "ner": ["train.max_steps=3", "task.max_sentences=200", "eval.strategy=no"],
    "sft": ["train.max_steps=2", "task.max_rows=60", "task.num_sample_generations=2"],
    "seq2seq": ["train.max_steps=2", "task.max_rows=40"],
    "qa": ["train.max_steps=2", "task.max_rows=40"],
}
BEFORE = ["train.max_steps=1"]  # lr of the only step is 0 (warm-up): the untrained adapter


# -- data ----------------------------------------------------------------------------------
def data_paths(recipe: Path) -> list[Path]:
    task = tomllib.loads(recipe.read_text())["task"]
    paths = []
    for key in ("train", "validation", "test"):
        value = task.get(key)
        value = value.get("path") if isinstance(value, dict) else value
        if value:
            paths.append((recipe.parent / value).resolve())
    return paths


def check_data(rows: list[str]) -> None:
    missing = [p for row in rows for p in data_paths(HERE / f"{row}.toml") if not p.exists()]
    if not missing:
        return
    folders = sorted({str(p.parent) for p in missing})
    shared = (HERE / "../../../shared/data").resolve()
    print(f"error: the benchmark data are missing: {', '.join(str(p) for p in missing)}", file=sys.stderr)
    if not shared.is_dir():
        print(f"  the shared data folder {shared} does not exist; it sits beside the repository "
              "(../shared/data) and holds sst2/, ag_news/, conll2003/, alpaca/ — see its SOURCES.md", file=sys.stderr)
    else:
        print(f"  missing in: {', '.join(folders)} (see {shared / 'SOURCES.md'})", file=sys.stderr)
    sys.exit(2)


# -- running -------------------------------------------------------------------------------
def petune_command(recipe: Path, overrides: list[str]) -> list[str]:
    cmd = [str(REPO / ".venv/bin/petune"), "run", str(recipe.relative_to(REPO)), "--overwrite"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_one(row: str, overrides: list[str], out_dir: Path, log: Path, retries: int = 2) -> dict:
    """Run one row; a run stopped by a signal (it checkpoints first: status "interrupted")
    is continued with --resume, up to ``retries`` times. Wall and CPU time add up."""
    recipe = HERE / f"{row}.toml"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    wall = cpu = 0.0
    resumed = 0
    while True:
        cmd = petune_command(recipe, [*overrides, f"output.dir={out_dir}"])
        if resumed:
            cmd[cmd.index("--overwrite")] = "--resume"
        print(f"[{datetime.now():%H:%M:%S}] {row}: {shlex.join(cmd[1:])}  (log {log})", flush=True)
        start = time.time()
        with open(log, "a" if resumed else "w") as handle:
            proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=REPO, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall += time.time() - start
        cpu += usage.ru_utime + usage.ru_stime
        code = os.waitstatus_to_exitcode(status)
        print(f"    exit {code}, wall {wall / 60:.1f} min, cpu {cpu / 60:.1f} min", flush=True)
        state = (_read(REPO / out_dir / "manifest.json") or {}).get("status")
        if code == 0 or state != "interrupted" or resumed >= retries:
            break
        resumed += 1
        print("    stopped by a signal: resuming from its checkpoint", flush=True)
    return {"exit": code, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "resumed": resumed, "command": shlex.join(
        ["petune", *cmd[1:3], *[x for o in overrides for x in ("--set", o)]]), "log": str(log)}


def collect(run_dir: Path) -> dict:
    """What a finished run folder says about itself."""
    run_dir = REPO / run_dir
    out: dict = {"run_dir": str(run_dir.relative_to(REPO))}
    manifest = _read(run_dir / "manifest.json") or {}
    out.update({k: manifest.get(k) for k in ("status", "trainable_parameters", "total_parameters", "device",
                                             "started", "ended", "git_commit", "error")})
    out["metrics"] = _read(run_dir / "metrics.json") or {}
    for folder in ("adapter", "model"):  # what the strategy saved: its size on disk
        if (run_dir / folder).is_dir():
            out["saved_bytes"] = sum(f.stat().st_size for f in (run_dir / folder).rglob("*") if f.is_file())
    history = _read(run_dir / "log_history.json") or []
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    out["train_runtime_s"] = summary.get("train_runtime")
    out["steps"] = summary.get("step")
    out["epochs"] = summary.get("epoch")
    out["train_loss"] = summary.get("train_loss")
    out["eval_curve"] = [{k: h[k] for k in h if k in ("step", "eval_accuracy", "eval_f1", "eval_loss")}
                         for h in history if any(k.startswith("eval_") for k in h)]
    recipe = _read_toml(run_dir / "recipe.toml")
    if recipe:
        out["recipe"] = {"strategy": recipe.get("strategy"), "train": {k: recipe["train"].get(k) for k in (
            "epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "warmup_ratio", "lr_scheduler")},
            "task": {k: v for k, v in recipe["task"].items() if k in ("max_rows", "max_sentences", "max_length")}}
    ner = _read(run_dir / "reports" / "ner_report_test.json")
    if ner:
        out["per_type"] = ner.get("per_type")
    samples = run_dir / "samples.jsonl"
    if samples.exists():
        out["samples"] = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return out


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_toml(path: Path):
    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_results() -> dict:
    return _read(RESULTS) or {}


def save_results(results: dict) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS)


# -- publishing ----------------------------------------------------------------------------
def fmt_count(n) -> str:
    if not n:
        return "—"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if n < 10 * size else f"{n / size:.1f}{unit}"
    return str(n)


def train_time(entry: dict) -> str:
    """The Trainer's training time; for a run that was stopped by a signal and resumed,
    the whole command's wall time (its training time covers the last part only)."""
    if entry.get("resumed"):
        return f"{fmt_minutes(entry.get('wall_s'))} (whole run; stopped by a signal and resumed ×{entry['resumed']})"
    return fmt_minutes(entry.get("train_runtime_s"))


def fmt_minutes(seconds) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f} min"


def full_entry(results: dict, dataset: str) -> dict:
    """The full fine-tuning row of a dataset: the reference the other strategies are a share of."""
    row = next((r for r, (d, label) in ROWS.items() if d == dataset and label == "full"), None)
    return results.get(row) or {}


def score_of(entry: dict, dataset: str):
    _, _, split, key = DATASETS[dataset]
    return (entry.get("metrics") or {}).get(split, {}).get(key)


def budget_text(entry: dict, dataset: str) -> str:
    train = (entry.get("recipe") or {}).get("train", {})
    bs = train.get("batch_size", 0) * train.get("grad_accum", 1)
    steps = entry.get("steps")
    unit = "question windows" if dataset in QA else {"conll": "sentences", "conll_peft": "sentences", "multi30k": "sentence pairs"}.get(dataset, "examples")
    seen = f"{steps} steps × {bs} = {steps * bs:,} {unit}" if steps else "?"
    epochs = entry.get("epochs")
    total = {"sst2": 67349, "sst2_peft": 67349, "agnews": 9501, "conll": 14041, "conll_peft": 14041, "alpaca": 900, "multi30k": 29000,
             "scitldr": 1992,
             "xquad": None}.get(dataset)
    if epochs is not None and total:
        seen += f" ({epochs:.2f} epochs of {total:,} {unit})"
    elif epochs is not None:
        seen += f" ({epochs:.2f} epochs)"
    return seen


def strategy_text(entry: dict) -> str:
    s = dict((entry.get("recipe") or {}).get("strategy") or {})
    name = s.pop("name", "?")
    keys = {"lora": ("r", "alpha"), "qlora": ("r", "alpha", "quant_type"), "adapters": ("config", "reduction_factor"),
            "prompt_tuning": ("num_virtual_tokens",), "full": (),
            "peft": ("method", "r", "init_r", "target_r", "oft_block_size", "alpha")}.get(name, ())
    extra = ", ".join(f"{k}={s[k]}" for k in keys if k in s)
    for key in ("init", "loraplus_lr_ratio"):  # LoRA's initialisation and LoRA+, when not the default
        if s.get(key) not in (None, "default"):
            extra += f", {key}={s[key]}"
    if s.get("train_layer_norms"):
        extra += ", layer norms trained"
    lr = ((entry.get("recipe") or {}).get("train") or {}).get("learning_rate")
    return f"{extra + ', ' if extra else ''}lr {fmt_lr(lr)}" if lr else extra


def fmt_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def device_text(entry: dict) -> str:
    device = entry.get("device") or "?"
    threads = entry.get("threads", 1)  # run_all.py runs rows with one; a row run by hand may say otherwise
    return f"{device}, shared, {threads} thread{'s' if threads > 1 else ''}" if device.startswith("cpu") else device


def table(results: dict, dataset: str) -> list[str]:
    metric = DATASETS[dataset][1]
    lines = [(f"| strategy | {metric} | trainable params | training time (wall) | CPU time | budget | settings | device "
             "| command |"), "|---|---:|---:|---:|---:|---|---|---|---|"]
    for row, (ds, label) in ROWS.items():
        if ds != dataset:
            continue
        entry = results.get(row)
        command = f"`petune run benchmarks/quality/{row}.toml`"
        if not entry or entry.get("status") != "completed":
            state = "failed" if entry else "pending"
            lines.append(f"| {label} | {state} | — | — | — | — | — | — | {command} |")
            continue
        score = score_of(entry, dataset)
        shown = "—" if score is None else f"{score:.2f}" if dataset in PERCENT_ALREADY else f"{100 * score:.2f}"
        full = full_entry(results, dataset)
        reference = score_of(full, dataset) if full.get("status") == "completed" else None
        share = f" ({100 * score / reference:.1f}% of full)" if score and reference and full is not entry else ""
        lines.append(f"| {label} | **{shown}**{share} | {fmt_count(entry.get('trainable_parameters'))} "
                     f"({100 * entry['trainable_parameters'] / entry['total_parameters']:.2f}%) | "
                     f"{train_time(entry)} | {fmt_minutes(entry.get('cpu_s'))} | "
                     f"{budget_text(entry, dataset)} | {strategy_text(entry)} | {device_text(entry)} | {command} |")
    return lines


def ner_types(results: dict, dataset: str = "conll") -> list[str]:
    rows = [r for r, (ds, _) in ROWS.items() if ds == dataset and (results.get(r) or {}).get("per_type")]
    if not rows:
        return []
    kinds = sorted(results[rows[0]]["per_type"])
    lines = ["| strategy | " + " | ".join(f"{k} F1" for k in kinds) + " | micro P | micro R | micro F1 |",
             "|---|" + "---:|" * (len(kinds) + 3)]
    for r in rows:
        e = results[r]
        t = e["metrics"]["test"]
        lines.append(f"| {ROWS[r][1]} | " + " | ".join(f"{100 * e['per_type'][k]['f1']:.2f}" for k in kinds)
                     + f" | {100 * t['precision']:.2f} | {100 * t['recall']:.2f} | {100 * t['f1']:.2f} |")
    support = results[rows[0]]["per_type"]
    lines.append("")
    lines.append("Test entities per type: " + ", ".join(f"{k} {support[k]['support']}" for k in kinds) + ".")
    return lines


def sft_table(results: dict) -> list[str]:
    lines = [("| strategy | held-out loss before → after | perplexity before → after | trainable params | "
              "training time (wall) | CPU time (after run) | budget | settings | device | command |"),
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for row, (ds, label) in ROWS.items():
        if ds != "alpaca":
            continue
        after, before = results.get(row), results.get(row + "_before")
        command = f"`petune run benchmarks/quality/{row}.toml`"
        if not after or after.get("status") != "completed":
            lines.append(f"| {label} | {'failed' if after else 'pending'} | | | | | | | | {command} |")
            continue
        a = after["metrics"]["validation"]
        b = (before or {}).get("metrics", {}).get("validation", {})
        lb = f"{b['loss']:.3f}" if b else "?"
        pb = f"{b['perplexity']:.1f}" if b else "?"
        lines.append(f"| {label} | {lb} → **{a['loss']:.3f}** | {pb} → **{a['perplexity']:.1f}** | "
                     f"{fmt_count(after.get('trainable_parameters'))} "
                     f"({100 * after['trainable_parameters'] / after['total_parameters']:.2f}%) | "
                     f"{train_time(after)} | {fmt_minutes(after.get('cpu_s'))} | "
                     f"{budget_text(after, 'alpaca')} | {strategy_text(after)} | {device_text(after)} | {command} |")
    return lines


def before_after_table(results: dict, dataset: str, metrics: list[tuple[str, str]]) -> list[str]:
    """Rows with a before-training run: each metric as "before → after" (both on the test split)."""
    split = DATASETS[dataset][2]
    lines = ["| strategy | " + " | ".join(f"{label} before → after" for _, label in metrics)
             + " | trainable params | training time (wall) | CPU time (after run) | budget | settings | device | command |",
             "|---|" + "---:|" * len(metrics) + "---:|---:|---:|---|---|---|---|"]
    for row, (ds, label) in ROWS.items():
        if ds != dataset:
            continue
        after, before = results.get(row), results.get(row + "_before")
        command = f"`petune run benchmarks/quality/{row}.toml`"
        if not after or after.get("status") != "completed":
            lines.append(f"| {label} | {'failed' if after else 'pending'} |" + " |" * (len(metrics) + 5) + f" {command} |")
            continue
        a = after["metrics"].get(split, {})
        b = ((before or {}).get("metrics") or {}).get(split, {})
        cells = [f"{b[k]:.2f} → **{a[k]:.2f}**" if k in b else f"? → **{a[k]:.2f}**" for k, _ in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt_count(after.get('trainable_parameters'))} "
                     f"({100 * after['trainable_parameters'] / after['total_parameters']:.2f}%) | "
                     f"{train_time(after)} | {fmt_minutes(after.get('cpu_s'))} | "
                     f"{budget_text(after, dataset)} | {strategy_text(after)} | {device_text(after)} | {command} |")
    return lines


def qa_table(results: dict, dataset: str) -> list[str]:
    lines = table(results, dataset)
    lines[0] = lines[0].replace("| XQuAD F1 |", "| XQuAD F1 | exact match |")
    lines[1] = lines[1].replace("|---|---:|", "|---|---:|---:|", 1)
    for i, (row, _) in enumerate((r, v) for r, v in ROWS.items() if v[0] == dataset):
        entry = results.get(row) or {}
        em = ((entry.get("metrics") or {}).get("test") or {}).get("exact_match")
        head, _, tail = lines[2 + i].partition(" | ", )
        score, _, rest = tail.partition(" | ")
        lines[2 + i] = f"{head} | {score} | {'—' if em is None else f'{em:.2f}'} | {rest}"
    reference = full_entry(results, dataset)
    full = reference.get("metrics", {}).get("test", {}).get("f1")
    if full:
        def unequal(entry):  # a share at a different number of steps is no like-for-like comparison: say so
            ratio = (entry.get("steps") or 0) / (reference.get("steps") or 1)
            return "" if abs(ratio - 1) < 0.01 else f" (at {ratio:.1f}× full's steps)"
        shares = [f"{label} {100 * results[r]['metrics']['test']['f1'] / full:.1f}%{unequal(results[r])}"
                  for r, (d, label) in ROWS.items()
                  if d == dataset and label != "full" and (results.get(r) or {}).get("status") == "completed"]
        if shares:
            lines += ["", "F1 as a share of full fine-tuning's: " + ", ".join(shares) + " (target: at least 95%)."]
    return lines


def reference_entry(results: dict, dataset: str) -> dict:
    """The row a dataset's others are compared with: full fine-tuning, or (a set without one)
    plain LoRA at the same budget."""
    full = full_entry(results, dataset)
    if full or dataset not in AGAINST_LORA:
        return full
    row = next((r for r, (d, label) in ROWS.items() if d == dataset and label == "lora"), None)
    return results.get(row) or {}


def sized_table(results: dict, dataset: str) -> list[str]:
    """``table`` with the score's difference from LoRA at the same budget and the saved
    artifact's size on disk."""
    lines = table(results, dataset)
    lines[0] = lines[0].replace("| trainable params |", "| vs LoRA (points) | trainable params | saved size |")
    lines[1] = lines[1].replace("|---|---:|---:|", "|---|---:|---:|---:|---:|", 1)
    ref = reference_entry(results, dataset)
    ref_score = score_of(ref, dataset) if ref.get("status") == "completed" else None
    for i, (row, _) in enumerate((r, v) for r, v in ROWS.items() if v[0] == dataset):
        entry = results.get(row) or {}
        size = entry.get("saved_bytes")
        score = score_of(entry, dataset) if entry.get("status") == "completed" else None
        delta = "—" if score is None or ref_score is None or entry is ref else f"{100 * (score - ref_score):+.2f}"
        cells = lines[2 + i].split(" | ")
        cells[2:2] = [delta]
        cells[4:4] = ["—" if not size else f"{size / 2**20:.2f} MiB"]
        lines[2 + i] = " | ".join(cells)
    return lines


def agnews_variants() -> list[str]:
    data = _read(HERE / "agnews_variants.json") or {}
    rows = [r for r in ROWS if ROWS[r][0] == "agnews" and r in data]
    if not rows:
        return []
    names = list(data[rows[0]])
    lines = ["| strategy | " + " | ".join(f"test text = {n}" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {ROWS[r][1]} | " + " | ".join(f"{100 * data[r][n]:.2f}" for n in names) + " |")
    return lines


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return text.replace("|", "\\|")


def sft_samples(results: dict, row: str) -> list[str]:
    after, before = results.get(row) or {}, results.get(row + "_before") or {}
    a, b = after.get("samples") or [], before.get("samples") or []
    if not a:
        return []
    lines = [f"| # | instruction (+ input) | before training (base model) | after {ROWS[row][1]} SFT | reference answer |",
             "|---:|---|---|---|---|"]
    by_where = {s["where"]: s for s in b}
    for i, s in enumerate(a, 1):
        prompt = "\n".join(m["content"] for m in s["messages"] if m["role"] == "user")
        old = by_where.get(s["where"], {}).get("generated", "?")
        lines.append(f"| {i} | {_cell(prompt, 300)} | {_cell(old) or '*(empty)*'} | {_cell(s['generated']) or '*(empty)*'} "
                     f"| {_cell(s.get('expected', ''), 250)} |")
    return lines


GENERATION_PANEL = [("multi30k", [("bleu", "BLEU"), ("chrf", "chrF")]),
                    ("scitldr", [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")])]


def generation_panel(ax, results: dict, bars: list[tuple[str, str, str]]) -> None:
    """Seq2seq rows have one strategy each: their panel shows before → after per metric."""
    import numpy as np

    x = np.arange(len(bars))
    after = [results[f"{d}_lora"]["metrics"]["test"][key] for _, key, d in bars]
    before = [((results.get(f"{d}_lora_before") or {}).get("metrics") or {}).get("test", {}).get(key, np.nan)
              for _, key, d in bars]
    ax.bar(x - 0.2, before, 0.4, color="lightgray", label="before (untuned, prompted)")
    ax.bar(x + 0.2, after, 0.4, color="tab:blue", label="after LoRA")
    for i, value in enumerate(after):
        ax.text(x[i] + 0.2, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [label for label, _, _ in bars], fontsize=7)
    ax.set_ylabel("score (test set)")
    ax.set_title("Gemma 3 270M seq2seq: before → after LoRA")
    ax.set_ylim(0, 1.3 * max(after))  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)


def chart(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [d for d in DATASETS if d not in ("multi30k", "scitldr") and any(
        ROWS[r][0] == d and (results.get(r) or {}).get("status") == "completed" for r in ROWS)]
    generation = [(f"{DATASETS[d][0].split()[0]}\n{label}", key, d) for d, metrics in GENERATION_PANEL for key, label in metrics
                  if (results.get(f"{d}_lora") or {}).get("status") == "completed"]
    if not panels and not generation:
        return
    count = len(panels) + bool(generation)
    cols = min(4, count)
    rows = -(-count // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.2 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.axis("off")
    if generation:
        generation_panel(axes[len(panels)], results, generation)
    colors = {"full": "tab:red", "lora": "tab:blue", "qlora": "tab:cyan", "adapters (houlsby)": "tab:green",
              "adapters (pfeiffer)": "tab:olive", "prompt_tuning": "tab:purple", "ia3": "tab:orange",
              "vera": "tab:pink", "loha": "tab:brown", "lokr": "gold", "oft": "tab:gray", "adalora": "teal",
              "lora+": "navy"}
    for ax, dataset in zip(axes, panels):
        name, metric, _, _ = DATASETS[dataset]
        variants = iter(["s", "D", "^", "v", "P"])  # marker shapes for other budgets/settings of a strategy
        for row, (ds, label) in ROWS.items():
            entry = results.get(row) or {}
            if ds != dataset or entry.get("status") != "completed":
                continue
            score = score_of(entry, dataset)
            y = score if dataset in PERCENT_ALREADY else 100 * score
            x = entry["trainable_parameters"]
            color = colors.get(label) or ("tab:brown" if label.startswith("adapters") else "gray")
            shown = f"{label}: {y:.2f}" if dataset != "alpaca" else f"{label}: perplexity {y:.1f}"
            if label == label.split(", ")[0]:
                ax.scatter(x, y, s=60, zorder=3, color=color, label=shown)
            else:  # another budget or setting of a strategy: a hollow marker of its own shape
                ax.scatter(x, y, s=60, zorder=3, marker=next(variants), facecolors="none", edgecolors=color, label=shown)
            before = results.get(row + "_before")
            if dataset == "alpaca" and before and before.get("metrics"):
                yb = before["metrics"]["validation"]["perplexity"]
                ax.annotate("", xy=(x, y), xytext=(x, yb), arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
                ax.scatter(x, yb, s=30, marker="x", color="gray", zorder=3)
        full = full_entry(results, dataset)
        lora = reference_entry(results, dataset)
        if dataset in AGAINST_LORA and lora.get("status") == "completed":  # a set measured against LoRA at its own budget
            ref = 100 * score_of(lora, dataset)
            ax.axhline(ref, color="tab:blue", lw=0.8, ls="--", alpha=0.6)
            ax.axhline(ref - 1, color="gray", lw=0.8, ls=":", alpha=0.8)
            ax.text(0.01, ref - 1, "LoRA − 1 point", fontsize=7, color="gray", va="bottom",
                    transform=ax.get_yaxis_transform())
        if dataset != "alpaca" and full.get("status") == "completed":
            ref = score_of(full, dataset) * (1 if dataset in PERCENT_ALREADY else 100)
            share = 0.95 if dataset in QA else 0.98  # the issues' targets
            ax.axhline(ref, color="tab:red", lw=0.8, ls="--", alpha=0.6)
            ax.axhline(share * ref, color="gray", lw=0.8, ls=":", alpha=0.8)
            ax.text(0.01, share * ref, f"{share:.0%} of full", fontsize=7, color="gray", va="bottom",
                    transform=ax.get_yaxis_transform())  # x in axes units: stays inside on a log axis
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.2)  # room for the legend beside the points
        # a legend, not labels beside points: clusters stay readable
        if dataset in AGAINST_LORA:  # many points spread over the panel: room for the legend below them
            low, high = ax.get_ylim()
            ax.set_ylim(low - 0.45 * (high - low), high)
            ax.legend(fontsize=6.5, loc="lower right", ncol=2)
        else:
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(metric + (" (lower is better; x = before)" if dataset == "alpaca" else " (%)"))
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    fig.suptitle("score vs trainable parameters" if len(panels) < 3 else
                 "petune: score vs trainable parameters (MiniLM-L6; Gemma 3 270M for Alpaca and seq2seq; CPU budgets)", fontsize=11)
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)


def publish(results: dict) -> None:
    """Rewrite the quality section of QUALITY.md (between the markers) and the chart."""
    chart(results)
    body = [BEGIN, ""]
    body += TEMPLATE.read_text().rstrip().split("\n")
    generated = {
        "{{SST2}}": table(results, "sst2"), "{{SST2_PEFT}}": sized_table(results, "sst2_peft"),
        "{{CONLL_PEFT}}": sized_table(results, "conll_peft"),
        "{{CONLL_PEFT_TYPES}}": ner_types(results, "conll_peft"),
        "{{AGNEWS}}": table(results, "agnews"),
        "{{CONLL}}": table(results, "conll"), "{{AGNEWS_VARIANTS}}": agnews_variants(), "{{CONLL_TYPES}}": ner_types(results),
        "{{ALPACA}}": sft_table(results), "{{SAMPLES_LORA}}": sft_samples(results, "alpaca_lora"),
        "{{SAMPLES_QLORA}}": sft_samples(results, "alpaca_qlora"),
        "{{MULTI30K}}": before_after_table(results, "multi30k", [("bleu", "BLEU"), ("chrf", "chrF"),
                                                                 ("gen_words", "mean output (words)")]),
        "{{SCITLDR}}": before_after_table(results, "scitldr", [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                                                               ("rougeL", "ROUGE-L"),
                                                               ("gen_words", "mean output (words)")]),
        "{{XQUAD}}": qa_table(results, "xquad"), "{{XQUAD_2EP}}": qa_table(results, "xquad_2ep"),
        "{{CONLL_PEFT_READING}}": (HERE / "conll_peft_reading.md").read_text().rstrip().split("\n")
        if (HERE / "conll_peft_reading.md").exists() else [],
        "{{READING}}": (HERE / "reading.md").read_text().rstrip().split("\n") if (HERE / "reading.md").exists() else [],
        "{{CPU_TOTAL}}": [f"{sum((e or {}).get('cpu_s') or 0 for e in results.values()) / 3600:.1f} CPU-hours"],
    }
    out = []
    for line in body:
        key = line.strip()
        if key in generated:
            out += generated[key] or ["*(pending)*"]
        elif "{{CPU_TOTAL}}" in line:
            out.append(line.replace("{{CPU_TOTAL}}", generated["{{CPU_TOTAL}}"][0]))
        else:
            out.append(line)
    out += ["", END]
    replace_section(QUALITY_MD, BEGIN, END, "\n".join(out), title="# Quality on real data\n\n")
    print(f"wrote {QUALITY_MD.relative_to(REPO)} and {CHART.relative_to(REPO)}")


# -- main ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated row ids (default: all): " + ", ".join(ROWS))
    parser.add_argument("--smoke", action="store_true", help="tiny budgets into runs/quality/smoke/ (results not kept)")
    parser.add_argument("--report", action="store_true", help="only rebuild QUALITY.md and the chart")
    parser.add_argument("--collect", action="store_true", help="re-read finished run folders into results.json")
    parser.add_argument("--no-before", action="store_true", help="skip the before-training runs of SFT rows")
    args = parser.parse_args(argv)
    rows = list(ROWS) if not args.only else [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s): {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    if args.report:
        publish(load_results())
        return 0
    check_data(rows)
    results = load_results()
    failed = []
    for row in rows:
        dataset = ROWS[row][0]
        task = tomllib.loads((HERE / f"{row}.toml").read_text())["task"]["name"]
        jobs = []
        if dataset in WITH_BEFORE and not args.no_before:
            jobs.append((row + "_before", BEFORE))
        jobs.append((row, []))
        for key, overrides in jobs:
            if args.smoke:
                overrides = [*overrides, *SMOKE[task]]
                if key.endswith("_before"):
                    overrides = [o for o in overrides if not o.startswith("train.max_steps")] + ["train.max_steps=1"]
            out_dir = RUNS / ("smoke" if args.smoke else "") / key
            log = RUNS / "logs" / (("smoke_" if args.smoke else "") + key + ".log")
            if args.collect:
                info = {}
            else:
                info = run_one(row, overrides, out_dir, REPO / log)
            entry = {**info, **collect(out_dir), "row": row, "dataset": dataset}
            if info and info["exit"] != 0:
                failed.append(key)
                entry["status"] = "failed"
            if args.smoke:
                m = entry.get("metrics")
                print(f"    smoke {key}: status {entry.get('status')}, metrics {json.dumps(m)[:300]}")
            else:
                results = load_results()  # re-read: another tool may have written it meanwhile
                if args.collect and (results.get(key) or {}).get("cpu_s"):
                    entry = {**results[key], **{k: v for k, v in entry.items() if v is not None}}
                results[key] = entry
                save_results(results)
        if not args.smoke:
            publish(results)
    if failed:
        print(f"failed: {', '.join(failed)} (see runs/quality/logs/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
