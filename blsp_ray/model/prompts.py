"""How the LM is prompted, shared by stage 1, labelling, stage 2, inference and chat, and which
stage-2 task (so which prompt) a clip trains with.

Two prompt formats (``model.prompt_format``, saved with the checkpoint), one ``PromptFormat``
protocol:

* ``original``: the original release's ``###[Human]:…###[Assistant]:`` layout, which its stage 1
  teaches the LM (the 7B recipe and released checkpoints);
* ``lm_chat_template``: the LM's own chat template (``tokenizer.apply_chat_template``), for an LM
  already instruction-tuned in it that skips stage 1. A small instruct LM follows an instruction
  (e.g. "repeat this sentence") in its own template and not in the original layout.

Every layout puts the speech (or, for the text teacher, ``" " + transcript``) right after the
instruction, inside the user turn.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, get_args

from transformers import PreTrainedTokenizerBase

from blsp_ray.config import CONTINUATION_INSTRUCTION, PromptFormatName

PROMPT_FORMATS = get_args(PromptFormatName)

HUMAN = "###[Human]:"
ASSISTANT = "\n\n\n###[Assistant]:"

# A chat reply ends where the LM starts the next turn: replies stop at these (never shown). The
# chat-template format ends a reply with the tokenizer's EOS, which every engine stops at anyway.
CHAT_TURN_MARKERS = (HUMAN, ASSISTANT.lstrip())
CHAT_TURN_END = "\n\n\n"  # the original release's chat demo closes each assistant reply with this before the next turn


class PromptFormat(Protocol):
    def text_prompt(self, instruction: str) -> str:
        """Stage 1 and text inference: the LM answers ``instruction``."""

    def speech_prompt_parts(self, instruction: str) -> tuple[str, str]:
        """Stage 2 and speech inference: speech embeddings go between these two strings."""

    def chat_turn_parts(self, instruction: str, reply: str | None = None, header: str = "",
                        first: bool = True) -> tuple[str, str]:
        """One turn of a multi-turn chat: the turn's speech (if any) goes between the two strings,
        as in ``speech_prompt_parts``; a past turn's suffix carries the assistant's ``reply``;
        ``header`` (a system prompt) opens the ``first`` turn. The conversation is the
        concatenation of its turns."""


class OriginalPrompts:
    """The original release's layout, as its stage 1, labelling, stage 2 and chat demo write it."""

    def text_prompt(self, instruction: str) -> str:
        return f"{HUMAN}{instruction}{ASSISTANT}"

    def speech_prompt_parts(self, instruction: str) -> tuple[str, str]:
        return f"{HUMAN}{instruction}", ASSISTANT

    def chat_turn_parts(self, instruction: str, reply: str | None = None, header: str = "",
                        first: bool = True) -> tuple[str, str]:
        prefix, suffix = self.speech_prompt_parts(instruction)
        if reply is not None:
            suffix += reply + CHAT_TURN_END
        return (header if first else "") + prefix, suffix


class ChatTemplatePrompts:
    """The LM's own chat template: one user message ``instruction + <speech>`` per turn."""

    SPEECH = "<<blsp-speech>>"  # where the speech goes while the template is rendered

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"prompt_format lm_chat_template: the tokenizer at {tokenizer.name_or_path!r} has no chat template")
        self.tokenizer = tokenizer
        # A later chat turn is rendered after this exchange, and what it adds is the turn's text.
        self._before = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
        self._earlier = self._render(self._before, add_generation_prompt=False)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _split(self, text: str) -> tuple[str, str]:
        prefix, sep, suffix = text.partition(self.SPEECH)
        if not sep:
            raise ValueError("the LM's chat template drops the user message's text; use prompt_format: original")
        return prefix, suffix

    def text_prompt(self, instruction: str) -> str:
        return self._render([{"role": "user", "content": instruction}], add_generation_prompt=True)

    def speech_prompt_parts(self, instruction: str) -> tuple[str, str]:
        return self._split(self.text_prompt(instruction + self.SPEECH))

    def chat_turn_parts(self, instruction: str, reply: str | None = None, header: str = "",
                        first: bool = True) -> tuple[str, str]:
        turn = [{"role": "user", "content": instruction + self.SPEECH}]
        if reply is not None:
            turn.append({"role": "assistant", "content": reply})
        if first:  # as speech_prompt_parts renders it (the template's own system prompt if no header)
            system = [{"role": "system", "content": header}] if header else []
            return self._split(self._render([*system, *turn], reply is None))
        # The template must render a conversation as the concatenation of its messages.
        whole = self._render([*self._before, *turn], reply is None)
        if not whole.startswith(self._earlier):
            raise ValueError("the LM's chat template does not render a conversation turn by turn; use prompt_format: original")
        return self._split(whole[len(self._earlier):])


def make_prompt_format(name: PromptFormatName, tokenizer: PreTrainedTokenizerBase | None = None) -> PromptFormat:
    """The ``PromptFormat`` called ``name`` (``lm_chat_template`` renders with ``tokenizer``)."""
    if name == "original":
        return OriginalPrompts()
    if name == "lm_chat_template":
        if tokenizer is None:
            raise ValueError("prompt_format lm_chat_template needs the LM's tokenizer")
        return ChatTemplatePrompts(tokenizer)
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {name!r}")


def continuation_prompt(prompts: PromptFormat, transcript: str, instruction: str = CONTINUATION_INSTRUCTION) -> str:
    """Continuation labelling: the stage-1 LM continues the transcript."""
    return prompts.text_prompt(f"{instruction} {transcript}")


def stage2_task(audio: str, transcription_share: float) -> str:
    """The clip's stage-2 task: ``transcription`` (say the transcript) for a ``transcription_share``
    of clips, by a hash of the clip's path (the same in labelling and preprocessing, across reruns,
    shards and workers), else ``continuation`` (say the stage-1 LM's continuation)."""
    if transcription_share <= 0:
        return "continuation"
    draw = int.from_bytes(hashlib.sha1(audio.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    return "transcription" if draw < transcription_share else "continuation"
