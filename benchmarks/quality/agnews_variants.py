"""AG News: the trained models on the test set with the text built three ways.

The training file (`train_subset10k_alps.tsv`) holds one text per row — the article's
description, without its title — while `test.csv` has title and description in separate
columns. The recipes score title + " " + description (the headline number); this script
also scores description only (the training distribution) and title only, with the runs'
own models, and stores the accuracies in ``agnews_variants.json`` (read by run_all.py):

    .venv/bin/python benchmarks/quality/agnews_variants.py [RUN_DIR ...]
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEST = (HERE / "../../../shared/data/ag_news/test.csv").resolve()
NAMES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not TEST.exists():
        print(f"error: {TEST} is missing (the shared data folder ../shared/data, see its SOURCES.md)", file=sys.stderr)
        return 2
    from petune.plugins import PluginHost
    from petune.run_folders import load_run

    with open(TEST, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    gold = [NAMES[r[0]] for r in rows]
    variants = {"title + description": [f"{r[1].strip()} {r[2].strip()}" for r in rows],
                "description only": [r[2].strip() for r in rows],
                "title only": [r[1].strip() for r in rows]}
    out_path = HERE / "agnews_variants.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    host = PluginHost()
    run_dirs = argv or [str(REPO / "runs/quality" / r) for r in ("agnews_full", "agnews_lora")]
    for run_dir in run_dirs:
        run = load_run(run_dir, host)
        scores = {}
        for name, texts in variants.items():
            predictions = run.task.predict(run.model, run.tokenizer, run.recipe.task, run.state,
                                           [{"text": t, "text_pair": None} for t in texts], batch_size=128)
            scores[name] = sum(p["label"] == g for p, g in zip(predictions, gold)) / len(gold)
            print(f"{Path(run_dir).name}: {name}: {100 * scores[name]:.2f}%", flush=True)
        results[Path(run_dir).name] = scores
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
