"""Small datasets made by fedtune itself, so a first run needs no download and the repository
carries no third-party text. Deterministic for a given seed."""

from __future__ import annotations

import random

UNITS = [("kilometres", "metres", 1000), ("metres", "centimetres", 100),
         ("kilograms", "grams", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["river", "garden", "window", "planet", "doctor", "ledger", "signal", "harbor",
         "pencil", "meadow", "rocket", "bridge", "candle", "forest", "silver"]


def instruction_demo(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short instruction/answer pairs (unit conversion, arithmetic, days, spelling)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            big, small, f = rng.choice(UNITS)
            k = rng.randint(2, 20)
            out.append({"input": f"Convert {k} {big} to {small}.",
                        "output": f"{k} {big} is {k * f} {small}."})
        elif kind == 1:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append({"input": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."})
        elif kind == 2:
            i = rng.randrange(7)
            out.append({"input": f"Which day comes after {DAYS[i]}?",
                        "output": f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."})
        else:
            w = rng.choice(WORDS)
            out.append({"input": f"Spell the word '{w}' backwards.",
                        "output": f"'{w}' backwards is '{w[::-1]}'."})
    return out


INTENTS = {
    "card_lost": ["I lost my {card}", "my {card} is missing", "I can't find my {card} anywhere",
                  "someone stole my {card}"],
    "balance": ["what is my {acct} balance", "how much money is in my {acct}",
                "show the balance of my {acct}", "check my {acct} funds"],
    "transfer": ["send money from my {acct} to a friend", "transfer funds to another {acct}",
                 "how do I move money out of my {acct}", "wire cash from my {acct}"],
    "pin": ["I forgot the PIN of my {card}", "change the PIN on my {card}",
            "my {card} PIN is blocked", "reset my {card} PIN"],
}
FILLERS = {"card": ["card", "debit card", "credit card", "bank card"],
           "acct": ["account", "savings account", "checking account", "current account"]}


def classification_demo(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short banking-style requests labelled with one of four intents."""
    rng = random.Random(seed)
    out = []
    labels = sorted(INTENTS)
    for _ in range(n):
        label = rng.choice(labels)
        text = rng.choice(INTENTS[label]).format(
            card=rng.choice(FILLERS["card"]), acct=rng.choice(FILLERS["acct"])
        )
        if rng.random() < 0.3:
            text = rng.choice(["please ", "hi, ", "hello, "]) + text
        out.append({"text": text, "label": label})
    return out
