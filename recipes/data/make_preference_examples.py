"""Writes the example preference pairs of recipes/dpo_lora.toml (run once; outputs are committed).

Written by the project from templates, so the recipe runs offline and anyone can regenerate it:
python recipes/data/make_preference_examples.py

Each pair is {prompt, chosen, rejected}: the chosen answer is correct, short and polite; the
rejected one is wrong, evasive or rude, so the preference is clear and learnable in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(2024)

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "Austria": "Vienna"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "strong": "weak", "open": "closed", "full": "empty", "old": "young"}
EVASIVE = ["I don't know. Look it up yourself.", "Why would you ask me that?", "That is not my problem.",
           "Figure it out on your own.", "No idea, and I don't care."]
TIPS = {
    "How can I sleep better?": "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room "
                               "dark and cool.",
    "How do I stay focused while studying?": "Work in short blocks of 25 minutes, put your phone in another room, "
                                             "and take a five-minute break after each block.",
    "How can I drink more water?": "Keep a bottle on your desk, drink a glass with every meal, and refill it each "
                                   "time it is empty.",
    "How do I start running?": "Begin with short runs mixed with walking, three times a week, and add a few "
                               "minutes each week.",
    "How can I learn new words faster?": "Review them a little every day, use each new word in a sentence, and "
                                         "test yourself after a few days.",
    "How do I keep my desk tidy?": "Clear it at the end of each day, keep only what you use daily on it, and give "
                                   "everything else a fixed place.",
}


def pairs() -> list[dict]:
    rows = []
    countries = list(CAPITALS)
    for country, capital in CAPITALS.items():
        wrong = CAPITALS[rng.choice([c for c in countries if c != country])]
        rows.append({"prompt": f"What is the capital of {country}?",
                     "chosen": f"The capital of {country} is {capital}.",
                     "rejected": rng.choice([f"The capital of {country} is {wrong}.", rng.choice(EVASIVE)])})
    for word, opposite in OPPOSITES.items():
        rows.append({"prompt": f"What is the opposite of \"{word}\"?",
                     "chosen": f"The opposite of \"{word}\" is \"{opposite}\".",
                     "rejected": rng.choice([f"The opposite of \"{word}\" is \"{word}\".", rng.choice(EVASIVE)])})
    for _ in range(20):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        off = a + b + rng.choice([-3, -1, 1, 2, 10])
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                     "rejected": rng.choice([f"{a} plus {b} is {off}.", rng.choice(EVASIVE)])})
    for question, tip in TIPS.items():
        rows.append({"prompt": question, "chosen": tip, "rejected": rng.choice(EVASIVE)})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    rows = pairs()
    write_jsonl(HERE / "preference_train.jsonl", rows[:-10])
    write_jsonl(HERE / "preference_validation.jsonl", rows[-10:])
    print(f"wrote {len(rows) - 10} training and 10 validation pairs")
