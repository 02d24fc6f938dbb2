"""Writes the small example datasets the bundled recipes use (run once; outputs are committed).

The data is written by the project itself from templates, so recipes run offline and
anyone can regenerate it: python recipes/data/make_examples.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(1234)

# -- instructions (alpaca format) -----------------------------------------------------------
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi"}
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
            "strong": "weak", "open": "closed", "full": "empty", "rich": "poor", "old": "young", "high": "low"}
PLURALS = {"cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities", "leaf": "leaves",
           "tooth": "teeth", "bus": "buses", "person": "people", "knife": "knives"}
COLORS = {"the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange"}


def instructions() -> list[dict]:
    rows = []
    for country, city in CAPITALS.items():
        rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                     "output": f"The capital of {country} is {city}."})
    for word, opposite in ANTONYMS.items():
        rows.append({"instruction": "Give the opposite of the word.", "input": word,
                     "output": f"The opposite of \"{word}\" is \"{opposite}\"."})
    for word, plural in PLURALS.items():
        rows.append({"instruction": "Write the plural form of the noun.", "input": word, "output": plural})
    for thing, color in COLORS.items():
        rows.append({"instruction": f"What color is {thing}?", "input": "", "output": f"It is {color}."})
    for _ in range(30):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
    for _ in range(15):
        words = rng.sample(["apple", "river", "stone", "cloud", "garden", "window", "music", "paper", "forest", "candle"], 3)
        rows.append({"instruction": "Sort these words in alphabetical order.", "input": ", ".join(words),
                     "output": ", ".join(sorted(words))})
    for _ in range(15):
        text = rng.choice(["good morning", "see you soon", "thank you very much", "welcome home", "happy birthday",
                           "well done", "keep going", "time to rest"])
        rows.append({"instruction": "Rewrite the text in capital letters.", "input": text, "output": text.upper()})
    rng.shuffle(rows)
    return rows


# -- sentiment (CSV with header) ------------------------------------------------------------
SUBJECTS = ["the movie", "this film", "the acting", "the story", "the soundtrack", "the ending", "the cast",
            "the script", "the director's work", "the camera work"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "excellent", "gripping"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "terrible", "lifeless", "painful", "messy"]
TAILS = ["", " from start to finish", " and i would watch it again", " , honestly", " for most of the time",
         " in every scene"]


def sentiment(n: int) -> list[tuple[str, str]]:
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        adj = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        tail = rng.choice(TAILS)
        if label == "negative" and "again" in tail:
            tail = " and i would not watch it again"
        rows.append((f"{rng.choice(SUBJECTS)} was {adj}{tail}".strip(), label))
    return rows


# -- NER (CoNLL, IOB2) ----------------------------------------------------------------------
PEOPLE = [["Anna", "Berg"], ["John", "Smith"], ["Maria", "Lopez"], ["Kenji", "Sato"], ["Olga", "Ivanova"],
          ["Peter", "Hall"], ["Amara", "Okafor"], ["Lena", "Fischer"]]
PLACES = [["Paris"], ["New", "York"], ["Berlin"], ["Lagos"], ["Buenos", "Aires"], ["Oslo"], ["Cape", "Town"], ["Kyoto"]]
ORGS = [["Acme", "Corp"], ["the", "United", "Nations"], ["Globex"], ["Red", "Cross"], ["Initech"], ["Northwind", "Bank"]]
TEMPLATES = [
    ["{PER}", "works", "for", "{ORG}", "in", "{LOC}", "."],
    ["{PER}", "visited", "{LOC}", "last", "week", "."],
    ["{ORG}", "opened", "an", "office", "in", "{LOC}", "."],
    ["Yesterday", "{PER}", "met", "{PER}", "at", "{ORG}", "."],
    ["{PER}", "moved", "from", "{LOC}", "to", "{LOC}", "."],
    ["The", "report", "by", "{ORG}", "was", "praised", "by", "{PER}", "."],
]


def ner_sentence() -> list[tuple[str, str]]:
    tokens = []
    for slot in rng.choice(TEMPLATES):
        pools = {"{PER}": ("PER", PEOPLE), "{LOC}": ("LOC", PLACES), "{ORG}": ("ORG", ORGS)}
        if slot in pools:
            kind, pool = pools[slot]
            words = rng.choice(pool)
            if kind == "ORG" and words[0] == "the":  # "the" is not part of the name
                tokens.append(("the", "O"))
                words = words[1:]
            tokens += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]
        else:
            tokens.append((slot, "O"))
    return tokens


def write_conll(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("-DOCSTART- O\n\n")
        for _ in range(n):
            f.writelines(f"{tok} {tag}\n" for tok, tag in ner_sentence())
            f.write("\n")


def main() -> None:
    with (HERE / "instructions.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in instructions())
    for split, n in (("train", 240), ("validation", 60), ("test", 60)):
        with (HERE / f"sentiment_{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(sentiment(n))
    for split, n in (("train", 240), ("validation", 60), ("test", 60)):
        write_conll(HERE / f"ner_{split}.conll", n)


if __name__ == "__main__":
    main()
