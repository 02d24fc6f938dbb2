"""One GRPO step: ``petune run recipes/grpo_arithmetic.toml`` against TRL's ``GRPOTrainer`` used
directly with the same settings, in one invocation (issue 36)::

    .venv/bin/python benchmarks/grpo_step.py                 # 1 warm-up + 4 measured steps per side
    .venv/bin/python benchmarks/grpo_step.py --steps 8 --markdown benchmarks/out/grpo_step.md

Both sides train the packaged Gemma 3 270M with the same LoRA (r 16, alpha 32, all linear layers),
on the same first rows of ``recipes/data/arithmetic_train.jsonl`` rendered with the same chat
template, 4 prompts × 4 completions of at most 24 tokens per step, the same two rewards (the
number after "Answer:", a full-match format regex), learning rate, seed and dtype (what petune's
``auto`` picks on this machine: the plain side is given the same, so the comparison is of the
pipelines, not of the dtype). Each side runs in a fresh process, one after the other.

Step time is TRL's own ``step_time`` metric on both sides (generation, rewards, forward and
backward of one optimizer step), the median over the measured steps after the warm-up; the
completions' mean length is shown beside it because sampled completions of different lengths
cost different times. Peak memory is the process's maximum resident set: petune's includes its
held-out evaluation before and after training (16 prompts, greedy), which the plain loop does
not do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "grpo_arithmetic.toml"
DATA = REPO / "recipes" / "data" / "arithmetic_train.jsonl"
PATTERN = r"\d{1,3} [-+*] \d{1,3} = \d{1,4}\nAnswer: \d{1,4}"  # the recipe's format reward


def run_child(command: list, work: Path, name: str) -> tuple[int, str, int]:
    """Run ``command``; its exit status, the end of its stderr and its own peak resident set (bytes)."""
    with open(work / f"{name}.out", "w") as out, open(work / f"{name}.err", "w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's resources alone
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, (work / f"{name}.err").read_text()[-3000:], usage.ru_maxrss * 1024


def petune_side(steps: int, rows: int, work: Path) -> dict:
    out = work / "petune-run"
    command = [sys.executable, "-m", "petune", "run", str(RECIPE), "--set", f"train.max_steps={steps}",
               "--set", f"task.max_rows={rows}", "--set", "task.num_sample_generations=0",
               "--set", f'output.dir="{out}"', "--overwrite"]
    started = time.perf_counter()
    status, stderr, peak = run_child(command, work, "petune")
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"petune run failed:\n{stderr}")
    return _record("petune", json.loads((out / "log_history.json").read_text()), wall, peak)


def trl_side(steps: int, rows: int, work: Path) -> None:
    """TRL's GRPOTrainer as its documentation shows it, with petune's settings (run in a child)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from petune import precision
    from petune.models import resolve_model
    from petune.plugins import get_host
    from petune_plugins.tasks.chat_templates import builtin_template

    path = resolve_model("gemma-3-270m", get_host().model_sources()).path  # the folder petune converted
    dtype = precision.resolve("auto", weights=True).torch_dtype
    train_precision = precision.training_precision("auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = builtin_template("gemma", tokenizer)  # the base model has none
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    records = [json.loads(line) for line in DATA.read_text().splitlines()[:rows]]
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": str(r["answer"])} for r in records])

    def text(completion):
        return completion[-1]["content"] if isinstance(completion, list) else completion

    def math_answer(prompts, completions, answer, **_):
        found = [re.findall(r"Answer:\s*(-?\d+)", text(c)) for c in completions]
        return [float(bool(f) and f[-1] == a) for f, a in zip(found, answer)]

    def format_reward(prompts, completions, **_):
        return [float(re.fullmatch(PATTERN, text(c)) is not None) for c in completions]

    config = GRPOConfig(
        output_dir=str(work / "trl-run"), max_steps=steps, per_device_train_batch_size=16, num_generations=4,
        max_completion_length=24, temperature=1.0, learning_rate=1e-4, warmup_steps=0.05,  # a ratio (transformers 5)
        lr_scheduler_type="constant_with_warmup", loss_type="dapo", beta=0.0, reward_weights=[1.0, 0.5],
        logging_steps=1, save_strategy="no", report_to="none", seed=42,
        gradient_checkpointing=False,  # TRL's default is on; petune's recipe leaves it off
        bf16=train_precision == "bf16", fp16=train_precision == "fp16", use_cpu=not torch.cuda.is_available())
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[math_answer, format_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    (work / "trl-history.json").write_text(json.dumps(trainer.state.log_history))


def _record(side: str, history: list[dict], wall: float, peak_bytes: int) -> dict:
    steps = [h for h in history if "step_time" in h]
    return {"side": side, "step_times": [h["step_time"] for h in steps],
            "mean_lengths": [h.get("completions/mean_length") for h in steps],
            "rewards": [h.get("reward") for h in steps], "wall_s": wall, "peak_rss_bytes": peak_bytes}


def run_trl_child(steps: int, rows: int, work: Path) -> dict:
    started = time.perf_counter()
    status, stderr, peak = run_child([sys.executable, __file__, "--side", "trl", "--steps", str(steps),
                                      "--rows", str(rows), "--work", str(work)], work, "trl")
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"the TRL side failed:\n{stderr}")
    return _record("trl", json.loads((work / "trl-history.json").read_text()), wall, peak)


def summary(record: dict, warmup: int) -> dict:
    times, lengths = record["step_times"][warmup:], [x for x in record["mean_lengths"][warmup:] if x is not None]
    return {"median_step_s": statistics.median(times) if times else float("nan"),
            "mean_length": statistics.fmean(lengths) if lengths else float("nan"),
            "steps": len(times), "peak_rss_gib": record["peak_rss_bytes"] / 2**30, "wall_s": record["wall_s"]}


def table_rows(results: dict, warmup: int) -> list[list[str]]:
    rows = []
    for side, label in (("trl", "TRL GRPOTrainer, used directly"), ("petune", "petune run (grpo task)")):
        s = summary(results[side], warmup)
        rows.append([label, f"{s['median_step_s']:.1f}", f"{s['mean_length']:.1f}", str(s["steps"]),
                     f"{s['peak_rss_gib']:.2f}", f"{s['wall_s']:.0f}"])
    return rows


HEADER = ["side", "median step (s)", "completion tokens (mean)", "measured steps", "peak RSS (GiB)", "process wall (s)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    parser.add_argument("--rows", type=int, default=64, help="training prompts read")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    total = args.steps + args.warmup
    if args.side == "trl":
        trl_side(total, args.rows, args.work)
        return 0

    import torch
    from rich.console import Console
    from rich.table import Table

    from petune import precision

    with tempfile.TemporaryDirectory(prefix="petune-grpo-bench-") as tmp:
        work = Path(tmp)
        results = {"trl": run_trl_child(total, args.rows, work), "petune": petune_side(total, args.rows, work)}
    choice = precision.resolve("auto", weights=True)
    machine = (f"CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, dtype {choice}; "
               f"torch {torch.__version__}")
    table = Table(title=f"One GRPO step — {machine}", title_justify="left")
    for column in HEADER:
        table.add_column(column, justify="left" if column == "side" else "right")
    rows = table_rows(results, args.warmup)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    s = {side: summary(results[side], args.warmup) for side in results}
    ratio = s["petune"]["median_step_s"] / s["trl"]["median_step_s"]
    print(f"petune / TRL median step time: ×{ratio:.2f}")
    if args.markdown:
        lines = [f"{machine}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", f"petune / TRL median step time: ×{ratio:.2f}"]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
        (args.markdown.with_suffix(".json")).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
