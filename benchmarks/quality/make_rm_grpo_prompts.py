"""Writes the prompts of the GRPO-with-a-reward-model row (benchmarks/quality/grpo_reward_model.toml).

    .venv/bin/python benchmarks/quality/make_rm_grpo_prompts.py

"What is a plus b?" questions — the kind the example reward model (recipes/reward_lora.toml, trained
on recipes/data/preference_*.jsonl) was shown answered well ("a plus b is c.") and badly (a wrong
sum, an evasive reply) — with their sums as ``answer``, so a reward of weight 0 can log whether a
higher reward-model score also means more correct sums. Each prompt holds one worked example (the
policy is a base model). Seeded; held-out questions never repeat a training one, nor one the
reward model was trained on. Written to runs/quality/data/ (generated, not committed).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "runs" / "quality" / "data"
EXAMPLE = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 plus 4 is 7."}]


def main(train_size: int = 240, held_out_size: int = 80, seed: int = 11) -> None:
    seen = set()
    for line in (REPO / "recipes" / "data" / "preference_train.jsonl").read_text().splitlines():
        found = re.fullmatch(r"What is (\d+) plus (\d+)\?", json.loads(line)["prompt"])
        if found:
            seen.add((int(found[1]), int(found[2])))
    rng = random.Random(seed)
    splits = {"rm_grpo_validation.jsonl": held_out_size, "rm_grpo_train.jsonl": train_size}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, size in splits.items():
        rows = []
        while len(rows) < size:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"messages": [*EXAMPLE, {"role": "user", "content": f"What is {a} plus {b}?"}],
                         "answer": a + b})
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} prompts to {OUT / name}")


if __name__ == "__main__":
    main()
