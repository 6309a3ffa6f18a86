"""The original release's prompt format, shared by stage 1, labelling, stage 2 and inference, and
which stage-2 task (so which prompt) a clip trains with."""

import hashlib

from blsp_ray.config import CONTINUATION_INSTRUCTION

HUMAN = "###[Human]:"
ASSISTANT = "\n\n\n###[Assistant]:"


def text_prompt(instruction: str) -> str:
    """Stage 1 and text inference: the LM answers ``instruction``."""
    return f"{HUMAN}{instruction}{ASSISTANT}"


def continuation_prompt(transcript: str, instruction: str = CONTINUATION_INSTRUCTION) -> str:
    """Continuation labelling: the stage-1 LM continues the transcript."""
    return text_prompt(f"{instruction} {transcript}")


def stage2_task(audio: str, transcription_share: float) -> str:
    """The clip's stage-2 task: ``transcription`` (say the transcript) for a ``transcription_share``
    of clips, by a hash of the clip's path (the same in labelling and preprocessing, across reruns,
    shards and workers), else ``continuation`` (say the stage-1 LM's continuation)."""
    if transcription_share <= 0:
        return "continuation"
    draw = int.from_bytes(hashlib.sha1(audio.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    return "transcription" if draw < transcription_share else "continuation"


def speech_prompt_parts(instruction: str) -> tuple[str, str]:
    """Stage 2 and speech inference: speech embeddings go between these two strings."""
    return f"{HUMAN}{instruction}", ASSISTANT


# A reply ends where the LM starts the next turn: chat replies stop at these (never shown).
CHAT_TURN_MARKERS = (HUMAN, ASSISTANT.lstrip())
CHAT_TURN_END = "\n\n\n"  # the original release's chat demo closes each assistant reply with this before the next turn


def chat_turn_parts(instruction: str, reply: str | None = None, header: str = "") -> tuple[str, str]:
    """One turn of a multi-turn chat, as the original release's chat demo lays it out.

    The turn's speech (if any) goes between the two strings, exactly as in ``speech_prompt_parts``;
    a past turn's suffix carries the assistant's ``reply``; ``header`` (a system prompt) opens the
    first turn. The conversation is the concatenation of its turns.
    """
    prefix, suffix = speech_prompt_parts(instruction)
    if reply is not None:
        suffix += reply + CHAT_TURN_END
    return header + prefix, suffix
