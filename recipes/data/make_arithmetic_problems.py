"""Writes the arithmetic word problems of recipes/grpo_arithmetic.toml (run once; outputs are committed).

Written by the project from templates with a seeded generator, so the recipe runs offline and
anyone can regenerate the same files: python recipes/data/make_arithmetic_problems.py

Each record is {"messages", "answer"}: a one-step word problem (addition, subtraction or a small
multiplication) after two worked examples (the same two in every record: the packaged model is a
base model, which answers in a format it has been shown), and its integer answer, which the
math_answer reward compares. The validation
problems never share a (template, numbers) combination with the training ones, so held-out
scores measure arithmetic and format learned, not memorised problems.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo", "Maya",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "coins", "cards"]

#: the worked examples before each problem: the working as one line, then "Answer: <number>"
SHOTS = [
    {"role": "user", "content": "Mia has 4 cards. A friend gives Mia 3 more cards. How many cards does Mia have now?"},
    {"role": "assistant", "content": "4 + 3 = 7\nAnswer: 7"},
    {"role": "user", "content": "There are 5 rows of shells with 6 shells in each row. How many shells are there?"},
    {"role": "assistant", "content": "5 * 6 = 30\nAnswer: 30"},
]

# (operation, template): {n} a name, {t} a thing, {a} and {b} the numbers
TEMPLATES = [
    ("+", "{n} has {a} {t}. A friend gives {n} {b} more {t}. How many {t} does {n} have now?"),
    ("+", "There are {a} {t} in a box and {b} {t} on the table. How many {t} are there in all?"),
    ("+", "{n} collected {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} collect?"),
    ("-", "{n} had {a} {t} and gave away {b} of them. How many {t} does {n} have left?"),
    ("-", "A jar holds {a} {t}. {n} takes out {b} {t}. How many {t} are still in the jar?"),
    ("*", "{n} buys {a} bags with {b} {t} in each bag. How many {t} does {n} buy?"),
    ("*", "There are {a} rows of {t} with {b} {t} in each row. How many {t} are there?"),
]


def problem(rng: random.Random) -> tuple[tuple, dict]:
    index = rng.randrange(len(TEMPLATES))
    op, template = TEMPLATES[index]
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        if op == "-" and b > a:
            a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    text = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    return (index, a, b), {"messages": [*SHOTS, {"role": "user", "content": text}], "answer": answer}


def main(train_size: int = 800, validation_size: int = 200, seed: int = 7) -> None:
    rng = random.Random(seed)
    validation, held = [], set()
    while len(validation) < validation_size:
        key, record = problem(rng)
        if key not in held:
            held.add(key)
            validation.append(record)
    train = []
    while len(train) < train_size:
        key, record = problem(rng)
        if key not in held:  # never a held-out combination
            train.append(record)
    for name, rows in (("arithmetic_train.jsonl", train), ("arithmetic_validation.jsonl", validation)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} problems to {HERE / name}")


if __name__ == "__main__":
    main()
