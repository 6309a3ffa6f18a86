"""The seed's prompt format, shared by stage 1, labelling, stage 2 and inference."""

HUMAN = "###[Human]:"
ASSISTANT = "\n\n\n###[Assistant]:"
CONTINUATION_INSTRUCTION = "Continue the following text in a coherent and engaging style with less than 40 words."


def text_prompt(instruction: str) -> str:
    """Stage 1 and text inference: the LM answers ``instruction``."""
    return f"{HUMAN}{instruction}{ASSISTANT}"


def continuation_prompt(transcript: str, instruction: str = CONTINUATION_INSTRUCTION) -> str:
    """Continuation labelling: the stage-1 LM continues the transcript."""
    return text_prompt(f"{instruction} {transcript}")


def speech_prompt_parts(instruction: str) -> tuple[str, str]:
    """Stage 2 and speech inference: speech embeddings go between these two strings."""
    return f"{HUMAN}{instruction}", ASSISTANT
