"""Why a row was dropped: the one reason type and the one exception every stage counts bad rows with.

A check raises ``RowDropped(reason, detail)``; the code that reads the row catches it and counts it
with the row's place (``file:line``, 1-based) in a ``blsp_ray.io.shards.Summary``, which logs it.
The reason values are the keys of every ``dropped`` count in the jobs' summaries.
"""

from __future__ import annotations

from enum import StrEnum


class DropReason(StrEnum):
    # the row itself
    BAD_ROW = "bad_row"  # not a JSON object, wrong field count, a required key missing or not a string
    BAD_UTF8 = "bad_utf8"  # a line or a field that is not valid UTF-8
    NO_TEXT = "no_text"  # transcript / instruction / output empty after normalisation
    MISSING_TEXT = "missing_text"  # labelling: no string `text`
    EMPTY_TEXT = "empty_text"  # labelling: `text` empty or whitespace only
    PROMPT_TOO_LONG = "prompt_too_long"  # labelling: prompt tokens >= label.max_prompt_tokens
    NO_TARGET = "no_target"  # preprocessing: the target column is missing or empty
    TARGET_TOO_LONG = "target_too_long"  # preprocessing: more target tokens than data.max_target_tokens
    GENERATION_FAILED = "generation_failed"  # generate: the engine raised on this row alone
    UNEXPECTED = "unexpected_error"  # a per-row step raised something no check names (logged with its traceback)
    # its audio (raised as blsp_ray.model.audio.AudioError)
    MISSING_FILE = "missing_file"
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"  # the header reads, the data is shorter than it declares or unreadable part-way
    EMPTY = "empty"  # no samples
    NON_FINITE = "non_finite"  # NaN or inf samples
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"


AUDIO_REASONS = frozenset({DropReason.MISSING_FILE, DropReason.UNDECODABLE, DropReason.TRUNCATED, DropReason.EMPTY,
                           DropReason.NON_FINITE, DropReason.TOO_SHORT, DropReason.TOO_LONG})


class RowDropped(ValueError):
    """A row that cannot be used. ``detail`` says what is wrong with it; the place is added by whoever counts it."""

    def __init__(self, reason: DropReason | str, detail: str):
        self.reason = DropReason(reason)  # an unknown reason fails here, not as a stray key in a summary
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}")

    def __reduce__(self):
        # Rebuilt from (reason, detail), not from the message: Ray ships a worker's exception to the
        # driver by pickling it, and an exception whose __init__ needs two arguments otherwise
        # arrives as "TypeError: __init__() missing 1 required positional argument" instead of itself.
        return type(self), (self.reason, self.detail)
