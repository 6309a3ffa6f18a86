"""The OpenAI-shaped chat API: request validation and audio decoding, every failure a 4xx with a reason.

Audio arrives only as base64 bytes inside the JSON body (``input_audio`` parts); nothing a client
sends is ever used as a path.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import soundfile as sf
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from blsp_ray.config import ServeConfig
from blsp_ray.engines import GenerationSettings
from blsp_ray.model.audio import AudioError, check_duration, decode_audio, duration_s
from blsp_ray.model.prompts import CHAT_TURN_MARKERS
from blsp_ray.speech_lm import ChatTurn

# Checked from the header, before decoding: what a clip may cost to decode (a 29 s FLAC of 8
# channels at 655 kHz is 165 KB of bytes and 600 MB of samples).
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8
# A part's `format` label -> the container libsndfile must find in its bytes; others are refused, not guessed.
AUDIO_FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class ApiError(Exception):
    """An error the client caused (4xx) or may retry (503/504), returned in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s  # sent as Retry-After

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
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[Part]
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema would need constrained decoding: refused


class StreamOptions(_Strict):
    include_usage: StrictBool = False


# Below this a temperature only overflows the softmax (inf/nan probabilities); it samples as greedy would.
MIN_TEMPERATURE = 1e-3
INT64 = 2**63


class ChatCompletionRequest(_Strict):
    # JSON types are strict: "max_tokens": true or "16" is an error, not 1 or 16.
    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    stop: StrictStr | list[StrictStr] | None = Field(None, max_length=4)  # OpenAI: up to 4 stop sequences
    n: Literal[1] = 1  # one choice per request
    user: StrictStr | None = None
    # Accepted, not applied (the engines here have no such penalties): listed in X-Ignored-Fields.
    presence_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None


@dataclass
class ChatRequest:
    """A validated request, ready for an engine replica."""

    turns: list[ChatTurn]
    header: str
    sampling: GenerationSettings  # stops at the chat template's turn markers and the request's ``stop``
    stream: bool
    include_usage: bool
    audio_seconds: float
    ignored: list[str] = field(default_factory=list)  # request fields accepted but not applied


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
    try:
        # JSON escapes can spell lone UTF-16 surrogates ("\ud800"), which no tokenizer can encode.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds a lone UTF-16 surrogate escape (not text)", "invalid_text") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _validation_message(err: ValidationError) -> tuple[str, str]:
    # The deepest error is the specific one (an unknown field inside a part, not "content is not a
    # string"); loc entries naming union alternatives ("str", "list[...]") are pydantic's, not the client's.
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    path: list = []
    tag_next = False
    for p in first["loc"]:
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p):
            continue
        if tag_next:  # a content part's type tag: pydantic puts the discriminator's value in the path
            tag_next = False
            continue
        path.append(p)
        tag_next = len(path) >= 2 and path[-2] == "content" and isinstance(p, int)
    loc = ".".join(str(p) for p in path)
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
        raise ApiError(400, f"{where}: audio cannot be decoded as {fmt}: {_BYTESIO.sub('the audio', str(err))}",
                       "undecodable_audio", where) from None
    if info.format != AUDIO_FORMATS[fmt]:
        raise ApiError(400, f"{where}: labelled {fmt!r} but the bytes are {info.format}", "audio_format_mismatch", where)
    if info.samplerate > MAX_SAMPLE_RATE or info.channels > MAX_CHANNELS:
        raise ApiError(400, f"{where}: {info.channels} channels at {info.samplerate} Hz: at most {MAX_CHANNELS} channels "
                            f"at {MAX_SAMPLE_RATE} Hz are read", "bad_sample_rate", where)
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


def _parts(msg: Message) -> list:
    """A message's content as parts (a plain string is one text part)."""
    return [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content


def to_chat_request(data: dict, cfg: ServeConfig) -> ChatRequest:
    """Validate an OpenAI chat-completions body into turns + sampling settings."""
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, loc = _validation_message(err)
        raise ApiError(400, message, "invalid_request", loc) from None
    if req.model is not None and req.model != cfg.model_name:
        raise ApiError(404, f"model {req.model!r} not found (this server serves {cfg.model_name!r})", "model_not_found", "model")

    text_bytes = sum(len(p.text.encode()) for m in req.messages for p in _parts(m) if isinstance(p, TextPart))
    if text_bytes > cfg.max_text_bytes:  # before any tokenising: the cost of a request is bounded up front
        raise ApiError(400, f"the messages hold {text_bytes} bytes of text, more than the limit of {cfg.max_text_bytes}", "text_too_long", "messages")
    header = cfg.system_prompt
    turns: list[ChatTurn] = []
    audio_seconds = 0.0
    for i, msg in enumerate(req.messages):
        where = f"messages.{i}"
        parts = _parts(msg)
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        audios = [p for p in parts if isinstance(p, AudioPart)]
        if msg.role in ("system", "developer"):
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
    temperature = cfg.temperature if req.temperature is None else float(req.temperature)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop: a stop sequence must not be empty", "invalid_request", "stop")
    sampling = GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        stop=(*CHAT_TURN_MARKERS, *stops),
        top_p=cfg.top_p if req.top_p is None else req.top_p,
        seed=req.seed if req.seed is not None else cfg.seed,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    ignored = [k for k in ("presence_penalty", "frequency_penalty") if getattr(req, k)]
    return ChatRequest(turns, header, sampling, req.stream, include_usage, audio_seconds, ignored)
