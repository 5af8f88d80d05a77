"""Write the small CSV files the privacy and rnn examples read (seeded, no download).

    python examples/make_data.py        # examples/data/messages.csv and examples/data/people.csv
    python examples/make_data.py --out DIR

messages.csv: short support messages (text, topic) with phone numbers and e-mail addresses in
them, for examples/rnn-messages.yaml (the digits and addresses are masked before training).
people.csv: made-up people (name, email, zip, age, income, label), for
examples/people-private.yaml (names hashed, e-mails dropped, zip codes masked, ages generalised).
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TOPICS = {
    "billing": ["charged twice", "refund my payment", "invoice is wrong", "card was declined"],
    "delivery": ["parcel is late", "where is my order", "package arrived damaged", "wrong address"],
    "account": ["reset my password", "cannot log in", "delete my account", "change my e-mail"],
}


def write_messages(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "topic"])
        for i in range(rows):
            topic = rng.choice(sorted(TOPICS))
            phone = f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
            contact = rng.choice([f"call me on {phone}", f"mail user{i}@example.com", "thanks"])
            out.writerow([f"{rng.choice(TOPICS[topic])}, {contact}", topic])


def write_people(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["name", "email", "zip", "age", "income", "label"])
        for i in range(rows):
            age = rng.randint(18, 90)
            income = round(rng.gauss(3.0 + age / 30, 1.0), 2)
            label = "high" if income + rng.gauss(0, 0.3) > 4.5 else "low"
            out.writerow(
                [
                    f"Person {i}",
                    f"p{i}@example.com",
                    f"{rng.randint(10000, 99999)}",
                    age,
                    income,
                    label,
                ]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_messages(args.out / "messages.csv", args.rows, random.Random(0))
    write_people(args.out / "people.csv", args.rows, random.Random(1))
    print(f"wrote {args.out / 'messages.csv'} and {args.out / 'people.csv'}")


if __name__ == "__main__":
    main()
