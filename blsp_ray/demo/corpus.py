"""Plain English sentences found on the machine (no downloads): the text the demo speaks and trains on.

Two sources: a toy grammar (fast, for tests) and WordNet's example sentences (Debian's
``wordnet-base``: tens of thousands of short, varied, human-written sentences).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

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


WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
# Speakable plain text: letters, spaces, and the punctuation a TTS voice reads naturally.
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z ,;:'!?.-]*$")
_QUOTED = re.compile(r'"([^"]+)"')


def wordnet_sentences(wordnet_dir: str | Path, min_words: int = 4, max_words: int = 20) -> list[str]:
    """WordNet's example sentences (the quoted parts of its glosses), cleaned and deduplicated.

    Kept: plain letters and punctuation only (no digits, brackets or quote marks a voice would
    read out), ``min_words``..``max_words`` words. First letter capitalised, a full stop added
    when there is no final punctuation. Order: as in the files (shuffle before splitting).
    """
    root = Path(wordnet_dir)
    missing = [f for f in WORDNET_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: WordNet data files {missing} not found (Debian: apt-get install wordnet-base)"
        )
    seen: set[str] = set()
    out: list[str] = []
    for name in WORDNET_FILES:
        with open(root / name, encoding="latin-1") as f:  # WordNet 3.0 predates UTF-8 everywhere
            for line in f:
                if line.startswith("  ") or " | " not in line:  # licence header lines
                    continue
                for quote in _QUOTED.findall(line.split(" | ", 1)[1]):
                    text = " ".join(quote.split()).rstrip(" ;:,")
                    if "--" in text or "..." in text or not _PLAIN.match(text):
                        continue
                    if not min_words <= len(text.split()) <= max_words:
                        continue
                    text = text[0].upper() + text[1:]
                    if text[-1] not in ".!?":
                        text += "."
                    if text.lower() not in seen:
                        seen.add(text.lower())
                        out.append(text)
    return out


def sentence_words(sentence: str) -> list[str]:
    """Lower-cased words (letters and apostrophes), punctuation dropped."""
    return re.findall(r"[a-z']+", sentence.lower())


def within_vocabulary(sentences: list[str], size: int) -> list[str]:
    """The sentences whose words are all among the ``size`` most common of ``sentences`` (each
    word counted once per sentence; ties broken by first appearance). Order kept."""
    words = [sentence_words(s) for s in sentences]
    counts = Counter(w for ws in words for w in dict.fromkeys(ws))
    vocabulary = {w for w, _ in counts.most_common(size)}
    return [s for s, ws in zip(sentences, words) if vocabulary.issuperset(ws)]


def load_sentences(cfg) -> list[str]:
    """``cfg.num_sentences`` distinct sentences from ``cfg.text_source`` (a SpeechSynthConfig), shuffled by seed."""
    if cfg.text_source == "grammar":
        return make_sentences(cfg.num_sentences, cfg.seed)
    pool = wordnet_sentences(cfg.wordnet_dir, cfg.min_words, cfg.max_words)
    if cfg.vocabulary_size:
        pool = within_vocabulary(pool, cfg.vocabulary_size)
    if cfg.num_sentences > len(pool):
        within = f" within its {cfg.vocabulary_size} most common words" if cfg.vocabulary_size else ""
        raise ValueError(
            f"asked for {cfg.num_sentences} sentences, {cfg.wordnet_dir} has {len(pool)} with "
            f"{cfg.min_words}-{cfg.max_words} words{within}"
        )
    random.Random(cfg.seed).shuffle(pool)
    return pool[: cfg.num_sentences]
