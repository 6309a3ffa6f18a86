"""The OpenAI-shaped chat API: request validation and audio decoding, every failure a 4xx with a reason.

Audio arrives only as base64 bytes inside the JSON body (``input_audio`` parts); nothing a client
sends is ever used as a path.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blsp_ray.config import ServeConfig
from blsp_ray.engines import GenerationSettings
from blsp_ray.model.audio import AudioError, check_duration, decode_audio, duration_s
from blsp_ray.speech_lm import ChatTurn

AUDIO_FORMATS = {"wav", "flac"}  # what libsndfile decodes reliably; others are rejected, not guessed


class ApiError(Exception):
    """An error the client caused (4xx) or may retry (503/504), returned in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are errors, not silently ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str  # base64 of the encoded file
    format: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | AudioPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: Literal[1] = 1  # one choice per request
    user: str | None = None


@dataclass
class ChatRequest:
    """A validated request, ready for an engine replica."""

    turns: list[ChatTurn]
    header: str
    sampling: GenerationSettings  # no stop strings: a chat reply ends at EOS or max_tokens
    stream: bool
    include_usage: bool
    audio_seconds: float


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
    return data


def _validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown field {loc!r}", loc
    return f"{loc}: {first['msg']}", loc


def decode_input_audio(part: InputAudio, where: str, cfg: ServeConfig) -> np.ndarray:
    """base64 audio bytes -> [T] float32 16 kHz mono, within the configured duration."""
    fmt = part.format.lower()
    if fmt not in AUDIO_FORMATS:
        raise ApiError(400, f"{where}: audio format {part.format!r} not supported (use one of {sorted(AUDIO_FORMATS)})", "unsupported_audio_format", where)
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{where}: audio data is not valid base64: {err}", "invalid_base64", where) from None
    if not raw:
        raise ApiError(400, f"{where}: audio is empty", "empty_audio", where)
    try:
        info = sf.info(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        raise ApiError(400, f"{where}: audio cannot be decoded as {fmt}: {err}", "undecodable_audio", where) from None
    if info.samplerate < cfg.min_sample_rate:
        raise ApiError(400, f"{where}: sample rate {info.samplerate} Hz is below {cfg.min_sample_rate} Hz", "bad_sample_rate", where)
    seconds = info.frames / info.samplerate
    if seconds > cfg.max_audio_seconds:
        raise ApiError(400, f"{where}: audio is {seconds:.1f}s, longer than the limit of {cfg.max_audio_seconds}s", "audio_too_long", where)
    try:
        # Any rate at or above min_sample_rate is resampled to 16 kHz mono.
        wav = decode_audio(io.BytesIO(raw), where)
        check_duration(wav, where, 0.0, float("inf"))  # the one duration rule (max checked above, from the header)
        return wav
    except AudioError as err:
        code = {"empty": "empty_audio", "too_short": "audio_too_short"}.get(err.reason, "undecodable_audio")
        raise ApiError(400, str(err), code, where) from None


def to_chat_request(data: dict, cfg: ServeConfig) -> ChatRequest:
    """Validate an OpenAI chat-completions body into turns + sampling settings."""
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, loc = _validation_message(err)
        raise ApiError(400, message, "invalid_request", loc) from None
    if req.model is not None and req.model != cfg.model_name:
        raise ApiError(404, f"model {req.model!r} not found (this server serves {cfg.model_name!r})", "model_not_found", "model")

    header = cfg.system_prompt
    turns: list[ChatTurn] = []
    audio_seconds = 0.0
    for i, msg in enumerate(req.messages):
        where = f"messages.{i}"
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        audios = [p for p in parts if isinstance(p, AudioPart)]
        if msg.role == "system":
            if turns or audios:
                raise ApiError(400, f"{where}: a system message (text only) may only open the conversation", "invalid_messages", where)
            header = " ".join(texts) + "\n"
            continue
        if msg.role == "assistant":
            if audios:
                raise ApiError(400, f"{where}: assistant messages hold text only", "invalid_messages", where)
            if not turns or turns[-1].reply is not None:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", "invalid_messages", where)
            turns[-1].reply = " ".join(texts)
            continue
        if turns and turns[-1].reply is None:
            raise ApiError(400, f"{where}: two user messages in a row (put both parts in one message)", "invalid_messages", where)
        if len(audios) > 1:
            raise ApiError(400, f"{where}: at most one input_audio part per message", "invalid_messages", where)
        if not texts and not audios:
            raise ApiError(400, f"{where}: a user message needs text or audio", "invalid_messages", where)
        speech = None
        if audios:
            speech = decode_input_audio(audios[0].input_audio, f"{where}.input_audio", cfg)
            audio_seconds += duration_s(speech)
        # The original release's prompt puts the instruction before the speech, whatever the part order.
        turns.append(ChatTurn(instruction=" ".join(texts), speech=speech))
    if not turns or turns[-1].reply is not None:
        raise ApiError(400, "the last message must be from the user", "invalid_messages", "messages")
    if audio_seconds > cfg.max_audio_seconds:
        raise ApiError(400, f"audio totals {audio_seconds:.1f}s, longer than the limit of {cfg.max_audio_seconds}s", "audio_too_long", "messages")

    max_tokens = req.max_completion_tokens or req.max_tokens or cfg.max_new_tokens
    if max_tokens > cfg.max_new_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {cfg.max_new_tokens}", "max_tokens_too_large", "max_tokens")
    sampling = GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=cfg.temperature if req.temperature is None else req.temperature,
        top_p=cfg.top_p if req.top_p is None else req.top_p,
        seed=req.seed if req.seed is not None else cfg.seed,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatRequest(turns, header, sampling, req.stream, include_usage, audio_seconds)
