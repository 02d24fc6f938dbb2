"""Writes the small example datasets of the seq2seq and qa recipes (run once; outputs are committed).

The data is written by the project itself from templates, so the recipes run offline and
anyone can regenerate it: python recipes/data/make_seq2seq_qa_examples.py

* translation_{train,validation,test}.{en,de}: English → German sentence pairs, line-aligned
  (lora_translation.toml);
* summaries_{train,validation,test}.jsonl: short reports as a list of sentences with a
  one-sentence summary — a string in train, a list of two references in validation/test
  (lora_summarization.toml);
* qa_train.json (SQuAD v1.1 layout) and qa_{validation,test}.jsonl ({id, question, context,
  answers}): questions on short profiles, some contexts long enough to need several windows
  (lora_qa.toml, adapters_qa.toml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

# -- translation ------------------------------------------------------------------------------
# noun: (German noun, gender)
NOUNS = {"dog": ("Hund", "m"), "cat": ("Katze", "f"), "house": ("Haus", "n"), "car": ("Auto", "n"),
         "book": ("Buch", "n"), "table": ("Tisch", "m"), "flower": ("Blume", "f"), "lamp": ("Lampe", "f"),
         "apple": ("Apfel", "m"), "child": ("Kind", "n"), "bird": ("Vogel", "m"), "window": ("Fenster", "n"),
         "door": ("Tür", "f"), "chair": ("Stuhl", "m"), "bicycle": ("Fahrrad", "n"), "cup": ("Tasse", "f")}
ADJECTIVES = {"big": "groß", "small": "klein", "old": "alt", "new": "neu", "red": "rot", "green": "grün",
              "beautiful": "schön", "cold": "kalt", "warm": "warm", "clean": "sauber", "heavy": "schwer",
              "cheap": "billig"}
PLACES = {"garden": ("Garten", "m"), "house": ("Haus", "n"), "kitchen": ("Küche", "f"), "park": ("Park", "m"),
          "city": ("Stadt", "f"), "room": ("Zimmer", "n"), "school": ("Schule", "f")}
NAMES = ["Anna", "Peter", "Maria", "Tom", "Lisa", "Paul", "Eva", "Jan"]
VERBS = {"see": "sehe", "like": "mag", "need": "brauche", "buy": "kaufe", "have": "habe"}
NOMINATIVE = {"m": "der", "f": "die", "n": "das"}
ACCUSATIVE = {"m": "den", "f": "die", "n": "das"}
INDEFINITE_ACCUSATIVE = {"m": "einen", "f": "eine", "n": "ein"}
IN_DATIVE = {"m": "im", "f": "in der", "n": "im"}


def translation_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = set()
    nouns, adjectives, places = list(NOUNS), list(ADJECTIVES), list(PLACES)
    while len(pairs) < 380:
        noun = rng.choice(nouns)
        german, gender = NOUNS[noun]
        kind = rng.randrange(5)
        if kind == 0:
            adjective = rng.choice(adjectives)
            pair = (f"The {noun} is {adjective}.", f"{NOMINATIVE[gender].capitalize()} {german} ist {ADJECTIVES[adjective]}.")
        elif kind == 1:
            verb = rng.choice(list(VERBS))
            pair = (f"I {verb} the {noun}.", f"Ich {VERBS[verb]} {ACCUSATIVE[gender]} {german}.")
        elif kind == 2:
            place = rng.choice(places)
            where, place_gender = PLACES[place]
            pair = (f"The {noun} is in the {place}.",
                    f"{NOMINATIVE[gender].capitalize()} {german} ist {IN_DATIVE[place_gender]} {where}.")
        elif kind == 3:
            name = rng.choice(NAMES)
            pair = (f"{name} has a {noun}.", f"{name} hat {INDEFINITE_ACCUSATIVE[gender]} {german}.")
        else:
            adjective = rng.choice(adjectives)
            name = rng.choice(NAMES)
            pair = (f"{name} says that the {noun} is {adjective}.",
                    f"{name} sagt, dass {NOMINATIVE[gender]} {german} {ADJECTIVES[adjective]} ist.")
        pairs.add(pair)
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    return ordered


def write_lines(name: str, lines: list[str]) -> None:
    (HERE / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -- summarization ----------------------------------------------------------------------------
TEAMS = ["the Rovers", "the Falcons", "the Harbour Club", "the Lions", "the City Stars", "the Valley Rangers"]
CITIES = ["Leeds", "Porto", "Lyon", "Graz", "Turin", "Ghent", "Cork", "Malmo"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLAYERS = ["Sam Reed", "Luis Ortega", "Jonas Berg", "Ali Hassan", "Marco Conti", "Ben Clarke"]
CONDITIONS = {"heavy rain": "rain", "snow": "snow", "strong winds": "wind", "sunshine": "sun", "thick fog": "fog"}
COMPANIES = ["Northwind", "Acme", "Bluepeak", "Solano", "Kestrel Labs", "Orbitex"]
PRODUCTS = ["phone", "laptop", "bicycle", "coffee machine", "camera", "watch"]
MONTHS = ["January", "March", "May", "July", "September", "November"]


def summary_rows(rng: random.Random, count: int, references: int) -> list[dict]:
    rows = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            home, away = rng.sample(TEAMS, 2)
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            city, day, player = rng.choice(CITIES), rng.choice(DAYS), rng.choice(PLAYERS)
            source = [f"{home.capitalize()} played {away} on {day}.",
                      f"The match took place in {city} in front of {rng.randint(2, 40) * 1000} fans.",
                      f"{home.capitalize()} scored {a} goals and {away} scored {b}.",
                      f"{player} was named player of the match."]
            if a == b:
                refs = [f"{home.capitalize()} and {away} drew {a}-{b} in {city} on {day}.",
                        f"The match in {city} between {home} and {away} ended {a}-{b}."]
            else:
                winner, loser, high, low = (home, away, a, b) if a > b else (away, home, b, a)
                refs = [f"{winner.capitalize()} beat {loser} {high}-{low} in {city} on {day}.",
                        f"{winner.capitalize()} won {high}-{low} against {loser} in {city}."]
        elif kind == 1:
            condition = rng.choice(list(CONDITIONS))
            city, day, degrees = rng.choice(CITIES), rng.choice(DAYS), rng.randint(-5, 32)
            source = [f"Forecasters expect {condition} in {city} on {day}.",
                      f"Temperatures will reach {degrees} degrees during the afternoon.",
                      rng.choice(["Drivers are asked to take care on the roads.", "Schools will stay open.",
                                  "The weekend is expected to be calmer."])]
            refs = [f"{city} will have {condition} and {degrees} degrees on {day}.",
                    f"On {day}, {city} expects {CONDITIONS[condition]} with {degrees} degrees."]
        else:
            company, product = rng.choice(COMPANIES), rng.choice(PRODUCTS)
            price, month = rng.randint(2, 40) * 50, rng.choice(MONTHS)
            source = [f"{company} announced a new {product} on {rng.choice(DAYS)}.",
                      f"The {product} will cost {price} dollars.",
                      f"It goes on sale in {month}.",
                      "The company said early demand was strong."]
            refs = [f"{company} will sell a new {product} for {price} dollars from {month}.",
                    f"A new {company} {product} costing {price} dollars goes on sale in {month}."]
        rows.append({"document": source, "summary": refs[0] if references == 1 else refs[:references]})
    return rows


# -- extractive QA ----------------------------------------------------------------------------
PEOPLE = ["Anna Berg", "Omar Haddad", "Mei Lin", "Carlos Ruiz", "Ingrid Olsen", "Tomasz Nowak", "Aisha Bello",
          "Lukas Meier", "Sofia Rossi", "Kenji Sato", "Nora Walsh", "David Cohen", "Elena Petrova", "Yusuf Demir"]
BIRTHPLACES = ["Lisbon", "Krakow", "Nairobi", "Osaka", "Dublin", "Quito", "Tunis", "Bergen", "Adelaide", "Hanoi"]
JOBS = ["nurse", "bridge engineer", "school teacher", "pilot", "baker", "software developer", "architect",
        "marine biologist", "journalist", "violinist"]
EMPLOYERS = ["the city hospital", "Harbor Bridges Ltd", "Westside Primary School", "Blue Sky Airlines",
             "the Corner Bakery", "Datacraft", "Studio Arco", "the Ocean Institute", "the Morning Post",
             "the National Orchestra"]
FOODS = ["lentil soup", "grilled fish", "mushroom risotto", "apple pie", "spicy noodles", "tomato salad"]
HOBBIES = ["climbing", "chess", "painting", "sailing", "gardening", "running"]
FILLER = ["The town is known for its old market and its narrow streets.",
          "Many visitors come in the summer to walk along the river.",
          "The local library opens early on weekdays and late on Fridays.",
          "A new tram line was built across the centre a few years ago.",
          "Most of the houses on the main square are more than two hundred years old."]


def profile(rng: random.Random, person: str) -> tuple[str, list[tuple[str, str]]]:
    first = person.split()[0]
    born, year = rng.choice(BIRTHPLACES), str(rng.randint(1950, 2001))
    job, employer = rng.choice(JOBS), rng.choice(EMPLOYERS)
    food, hobby = rng.choice(FOODS), rng.choice(HOBBIES)
    text = (f"{person} was born in {born} in {year}. {first} works as a {job} at {employer}. "
            f"In the evenings {first} enjoys {hobby}, and {first}'s favourite food is {food}.")
    questions = [(f"Where was {person} born?", born), (f"In which year was {person} born?", year),
                 (f"What is {person}'s job?", job), (f"Where does {person} work?", employer),
                 (f"What does {first} enjoy in the evenings?", hobby), (f"What is {person}'s favourite food?", food)]
    return text, questions


def qa_paragraphs(rng: random.Random, count: int, prefix: str) -> list[dict]:
    """SQuAD-style paragraphs: one to three profiles each, with filler sentences between (the
    longer contexts span several windows at the recipes' max_length)."""
    paragraphs = []
    for p in range(count):
        people = rng.sample(PEOPLE, rng.choice([1, 1, 2, 3]))
        parts, questions = [], []
        for person in people:
            text, qs = profile(rng, person)
            if parts:
                parts.append(" ".join(rng.sample(FILLER, 2)))
            parts.append(text)
            questions.append((len(" ".join(parts)) - len(text), text, rng.sample(qs, 3)))
        context = " ".join(parts)
        qas = []
        for offset, text, qs in questions:
            for q, (question, answer) in enumerate(qs):
                start = offset + text.index(answer)
                assert context[start:start + len(answer)] == answer
                qas.append({"id": f"{prefix}-{p}-{len(qas)}", "question": question,
                            "answers": [{"text": answer, "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    return paragraphs


def main() -> None:
    rng = random.Random(2024)
    pairs = translation_pairs(rng)
    for split, part in (("train", pairs[:300]), ("validation", pairs[300:340]), ("test", pairs[340:380])):
        write_lines(f"translation_{split}.en", [en for en, _ in part])
        write_lines(f"translation_{split}.de", [de for _, de in part])

    for split, count, refs in (("train", 240, 1), ("validation", 30, 2), ("test", 30, 2)):
        rows = summary_rows(rng, count, refs)
        (HERE / f"summaries_{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    train = {"version": "1.1", "data": [{"title": "profiles-train", "paragraphs": qa_paragraphs(rng, 110, "train")}]}
    (HERE / "qa_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for split in ("validation", "test"):
        with open(HERE / f"qa_{split}.jsonl", "w", encoding="utf-8") as handle:
            for paragraph in qa_paragraphs(rng, 12, split):
                for qa in paragraph["qas"]:
                    handle.write(json.dumps({"id": qa["id"], "question": qa["question"],
                                             "context": paragraph["context"], "answers": qa["answers"]},
                                            ensure_ascii=False) + "\n")

if __name__ == "__main__":
    main()
