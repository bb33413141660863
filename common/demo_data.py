"""Small datasets made by fedtune itself, so a first run needs no download and the repository
carries no third-party text. Deterministic for a given seed."""

from __future__ import annotations

import random

UNITS = [("kilometres", "metres", 1000), ("metres", "centimetres", 100),
         ("kilograms", "grams", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["river", "garden", "window", "planet", "doctor", "ledger", "signal", "harbor",
         "pencil", "meadow", "rocket", "bridge", "candle", "forest", "silver"]


def _unique(make, n: int, seed: int) -> list[dict[str, str]]:
    """n distinct records: a record is one person's data, so it must not appear at two sites."""
    rng = random.Random(seed)
    seen: dict[str, dict[str, str]] = {}
    for _ in range(n * 50):
        rec = make(rng)
        seen.setdefault(str(sorted(rec.items())), rec)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"the demo generator cannot make {n} distinct records (max ~{len(seen)})")


def instruction_demo(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short instruction/answer pairs (unit conversion, arithmetic, days, spelling)."""
    return _unique(_instruction, n, seed)


def _instruction(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        big, small, f = rng.choice(UNITS)
        k = rng.randint(2, 20)
        return {"input": f"Convert {k} {big} to {small}.",
                "output": f"{k} {big} is {k * f} {small}."}
    if kind == 1:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"input": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}."}
    if kind == 2:
        i = rng.randrange(7)
        return {"input": f"Which day comes after {DAYS[i]}?",
                "output": f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."}
    w = rng.choice(WORDS)
    return {"input": f"Spell the word '{w}' backwards.",
            "output": f"'{w}' backwards is '{w[::-1]}'."}


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


PREFIXES = ["", "please ", "hi, ", "hello, "]
SUFFIXES = ["", " please", " now", " today", " asap", " urgently", " thanks"]


def classification_demo(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short banking-style requests labelled with one of four intents."""
    return _unique(_classification, n, seed)


def _classification(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(INTENTS))
    text = rng.choice(INTENTS[label]).format(
        card=rng.choice(FILLERS["card"]), acct=rng.choice(FILLERS["acct"])
    )
    return {"text": rng.choice(PREFIXES) + text + rng.choice(SUFFIXES), "label": label}
