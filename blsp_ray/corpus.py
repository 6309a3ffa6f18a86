"""Plain English sentences made on the machine (no downloads): the text the demo speaks and trains on."""

from __future__ import annotations

import random

_SUBJECTS = [
    "the old farmer", "my sister", "a young doctor", "the small dog", "our teacher", "the tired pilot",
    "a quiet student", "the baker", "his grandmother", "the new manager", "a curious child", "the sailor",
    "the musician", "a friendly neighbour", "the gardener", "the engineer",
]
_VERBS = [
    "carried", "painted", "found", "cleaned", "opened", "sold", "watched", "repaired", "borrowed",
    "described", "followed", "visited", "remembered", "ordered", "measured", "packed",
]
_OBJECTS = [
    "a red bicycle", "the wooden door", "three fresh apples", "an empty bottle", "the broken clock",
    "a long letter", "the blue kite", "a heavy suitcase", "the garden fence", "a warm blanket",
    "the morning newspaper", "a silver spoon", "the green lamp", "two paper boats", "a small boat",
]
_PLACES = [
    "near the river", "after dinner", "in the kitchen", "before the storm", "at the station",
    "during the summer", "behind the school", "on a cold morning", "in the market", "by the window",
    "at the harbour", "under the bridge",
]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences like "The baker repaired the broken clock near the river."."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    limit = len(_SUBJECTS) * len(_VERBS) * len(_OBJECTS) * len(_PLACES)
    if n > limit:
        raise ValueError(f"asked for {n} sentences, the grammar makes at most {limit}")
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_instructions(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-shaped instruction data made from the sentences (for stage 1 on the demo)."""
    rng = random.Random(seed + 1)
    rows = []
    for s in make_sentences(n, seed):
        words = s.rstrip(".").split()
        kind = rng.randrange(3)
        if kind == 0:
            rows.append({"instruction": "Repeat the following sentence.", "input": s, "output": s})
        elif kind == 1:
            rows.append({"instruction": "How many words are in this sentence?", "input": s, "output": str(len(words))})
        else:
            rows.append({"instruction": "What is the last word of this sentence?", "input": s, "output": words[-1]})
    return rows
