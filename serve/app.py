"""The BLSP chat service on Ray Serve: an autoscaling engine deployment behind a FastAPI ingress.

* ``BlspEngine`` (one replica per GPU on clusters, ``cpus_per_replica`` here) holds Whisper +
  adapter + LM and streams replies; it autoscales between ``serve.min_replicas`` and
  ``serve.max_replicas`` on ongoing requests per replica (``serve.target_ongoing_requests``).
* ``ChatIngress`` speaks HTTP: ``POST /v1/chat/completions`` (OpenAI's shape, audio as base64
  ``input_audio`` parts, SSE streaming), ``GET /v1/models``, ``GET /health`` and the chat page at
  ``/``. It validates everything before an engine sees it, enforces auth, body size and the
  per-request timeout, and retries a request whose engine replica died before any of its reply
  reached the client.

Deploy from our config (``python -m serve --config configs/tiny.yaml``) or from a Serve config
(``serve run configs/serve-tiny.yaml``), which calls ``app_builder`` with the same config file.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.util.metrics import Counter

from blsp_ray.config import BlspRayConfig, S3Config, ServeConfig, load_config
from blsp_ray.engines import AsyncVllmEngine
from blsp_ray.io.layout import RunLayout
from blsp_ray.speech_lm import SpeechLM, local_checkpoint
from serve.schemas import ApiError, ChatRequest, parse_json, to_chat_request

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("static") / "chat.html"
APP_NAME = "blsp"
# A replica that died or became unreachable: the request may go to another replica.
REPLICA_FAILURES = (RayActorError, ActorUnavailableError)
MAX_ATTEMPTS = 3


@serve.deployment(name="BlspEngine")
class BlspEngine:
    """One model replica: the conversation in, the reply out.

    ``vllm``: an ``AsyncVllmEngine`` on the checkpoint's native vLLM export takes the conversation as
    token ids + clips (``SpeechLM.audio_prompt``), hears them itself and batches concurrent requests
    continuously. ``transformers``: Whisper + adapter embed the conversation here, then one
    generation at a time per replica (the rest wait).
    """

    def __init__(self, checkpoint: str, settings: dict, dtype: str = "float32", s3: dict | None = None):
        self.cfg = ServeConfig(**settings)
        if self.cfg.gpus_per_replica == 0:
            torch.set_num_threads(self.cfg.replica_threads())
        # The checkpoint may be s3://: each replica's node makes its own local copy.
        local = local_checkpoint(checkpoint, S3Config(**s3) if s3 else None)
        device = "cuda" if self.cfg.gpus_per_replica > 0 else "cpu"
        self.speech_lm = SpeechLM.from_checkpoint(local, self.cfg, dtype=dtype, streaming=True, device=device)
        self.max_context = self.speech_lm.max_context
        self.lock = asyncio.Lock()  # transformers: one generation at a time
        self.embed_lock = threading.Lock()  # speech encoding: one at a time, so threads don't fight over cores
        # Requests by how they ended, on the Ray dashboard / Prometheus as ray_blsp_engine_requests_total.
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.outcome_metric = Counter("blsp_engine_requests", tag_keys=("outcome",), description=(
            "Engine requests by outcome: completed, refused (a 4xx, e.g. the prompt exceeds the context), failed "
            "(a 5xx), cancelled (the caller left mid-reply), dropped (the caller left before the request was started)"))
        log.info("BlspEngine ready (%s): %s (pid %d)", self.cfg.engine, checkpoint, os.getpid())

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.outcome_metric.inc(tags={"outcome": outcome})

    async def outcome_counts(self) -> dict[str, int]:
        """This replica's requests by outcome since it started (``_count``)."""
        return dict(self.outcomes)

    def _embed(self, req: ChatRequest):
        with self.embed_lock:
            return self.speech_lm.prompt_embeds(req.turns, req.header)  # [L, H]

    def _too_long(self, prompt_len: int, req: ChatRequest) -> tuple | None:
        if prompt_len + req.sampling.max_new_tokens <= self.max_context:
            return None
        return ("error", (400, f"prompt of {prompt_len} positions + max_tokens {req.sampling.max_new_tokens} exceeds the model's context of {self.max_context}", "context_length_exceeded"))

    async def generate(self, req: ChatRequest) -> AsyncIterator[tuple]:
        """Events: ("delta", text)..., then ("done", usage) or ("error", (status, message, code)).

        The engine paths below first yield ("started", None) when work begins; it is counted here (a
        request that ends before it was "dropped") and not passed on."""
        streams_async = isinstance(self.speech_lm.engine, AsyncVllmEngine)
        events = self._generate_vllm(req) if streams_async else self._generate_transformers(req)
        outcome = "dropped"
        try:
            async for event in events:
                if event[0] == "started":
                    outcome = "cancelled"  # until it ends one of the ways below
                    continue
                if event[0] == "done":
                    outcome = "completed"
                elif event[0] == "error":
                    outcome = "refused" if event[1][0] < 500 else "failed"
                yield event
        except Exception:  # not CancelledError / GeneratorExit: those are the caller leaving
            outcome = "failed"
            raise
        finally:
            self._count(outcome)

    async def _generate_vllm(self, req: ChatRequest) -> AsyncIterator[tuple]:
        yield ("started", None)
        prompt = self.speech_lm.audio_prompt(req.turns, req.header)  # token ids + clips: the engine hears them
        if too_long := self._too_long(len(prompt.token_ids) - len(prompt.audio), req):  # a floor: before the speech
            yield too_long
            return
        from vllm.exceptions import VLLMClientError

        final = None
        try:
            # Cancelling this generator (client gone, timeout) aborts the request inside vLLM.
            async for delta, done in self.speech_lm.engine.stream(prompt, req.sampling):
                if delta:
                    yield ("delta", delta)
                final = done or final
        except VLLMClientError as err:
            # vLLM checks the prompt with its speech expanded (one position per speech embedding)
            # against the context before it runs a step: the request's fault, said as vLLM says it.
            if final is not None:
                raise
            code = "context_length_exceeded" if "maximum model length" in str(err) else "invalid_request"
            yield ("error", (400, f"the engine refused the prompt: {err}", code))
            return
        yield ("done", {"finish_reason": final.finish_reason or "stop", "prompt_tokens": final.prompt_tokens,
                        "completion_tokens": len(final.token_ids)})

    def _run_transformers(self, req: ChatRequest, cancel: threading.Event, emit) -> None:
        """Embed and generate on a worker thread, handing events to ``emit``."""
        embeds = self._embed(req)
        if too_long := self._too_long(embeds.shape[0], req):
            emit(too_long)
            return
        stream = self.speech_lm.stream(embeds, req.sampling, cancel)
        for delta in stream:
            emit(("delta", delta))
        emit(("done", {"finish_reason": stream.finish_reason, "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens}))

    async def _generate_transformers(self, req: ChatRequest) -> AsyncIterator[tuple]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work() -> None:
            try:
                self._run_transformers(req, cancel, emit)
            except Exception as err:  # a bug, not the client's fault: report it as a 500 with its type
                log.exception("generation failed")
                emit(("error", (500, f"generation failed: {type(err).__name__}: {err}", "internal_error")))

        async with self.lock:
            yield ("started", None)  # a caller that left while waiting for the lock never gets here
            worker = loop.run_in_executor(None, work)
            try:
                while True:
                    event = await queue.get()
                    yield event
                    if event[0] != "delta":
                        break
            finally:
                cancel.set()  # the caller left (timeout, disconnect): stop generating
                await asyncio.shield(worker)  # the next request starts only when this one has stopped


def _ignored_header(req: ChatRequest) -> dict | None:
    """Fields the request set that were accepted and not applied (OpenAI clients send some by default)."""
    return {"X-Ignored-Fields": ", ".join(req.ignored)} if req.ignored else None


def _error(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


api = FastAPI(title="BLSP speech chat", docs_url=None, redoc_url=None)


@serve.deployment(name="ChatIngress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class ChatIngress:
    def __init__(self, engine: DeploymentHandle, settings: dict):
        self.cfg = ServeConfig(**settings)
        self.engine = engine.options(stream=True)
        self.token = None
        if self.cfg.auth_token_env:
            self.token = os.environ.get(self.cfg.auth_token_env)
            if not self.token:
                raise RuntimeError(f"serve.auth_token_env names {self.cfg.auth_token_env!r}, which is not set in the replica's environment")
        self.page = PAGE.read_text()
        # Decoding and validating bodies (base64, audio, resampling) runs off the event loop, a
        # couple at a time, so /health and streaming replies never wait behind a large upload.
        self.decode_slots = asyncio.Semaphore(2)
        self.retried = 0  # requests re-sent after their engine replica failed

    # ---- plumbing -------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", "invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit}", "body_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):  # a stalled upload does not hold the connection
                async for chunk in request.stream():  # chunked uploads are counted as they arrive
                    body += chunk
                    if len(body) > limit:
                        raise ApiError(413, f"request body is over the limit of {limit} bytes", "body_too_large")
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.cfg.body_timeout_s}s", "body_timeout") from None
        return bytes(body)

    async def _chat_request(self, request: Request) -> ChatRequest:
        self._authorize(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            # Also what keeps a web page's plain form post (no CORS preflight) from running inference.
            raise ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}", "unsupported_media_type")
        body = await self._read_body(request)
        async with self.decode_slots:
            return await asyncio.to_thread(lambda: to_chat_request(parse_json(body), self.cfg))

    async def _engine_events(self, req: ChatRequest, restartable: bool) -> AsyncIterator[tuple]:
        """Engine events; a replica failure before any delta went out (or ``restartable``) is retried."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            sent, response = False, None
            try:
                response = self.engine.generate.remote(req)  # BackPressureError may come here or on the first event
                async for event in response:
                    if event[0] == "delta" and not restartable:
                        sent = True
                    yield event
                return
            except BackPressureError:
                response = None  # never assigned to a replica: nothing to cancel (cancel() would raise it again)
                raise ApiError(503, f"all engine replicas are busy and {self.cfg.max_queued_requests} requests wait already; "
                                    f"retry in {self.cfg.retry_after_s}s", "overloaded", retry_after_s=self.cfg.retry_after_s) from None
            except REPLICA_FAILURES as err:
                if sent or attempt == MAX_ATTEMPTS:
                    raise ApiError(503, f"engine replica failed during the reply: {type(err).__name__}", "replica_failed") from None
                log.warning("engine replica failed (%s), retrying (attempt %d)", type(err).__name__, attempt + 1)
                self.retried += 1
                if restartable:
                    yield ("restart", None)
                await asyncio.sleep(0.5 * attempt)
            finally:
                if response is not None:
                    response.cancel()  # no-op when finished; stops the replica's work when we give up

    def _chunk(self, rid: str, created: int, delta: dict, finish_reason=None, usage=None) -> str:
        body = {
            "id": rid, "object": "chat.completion.chunk", "created": created, "model": self.cfg.model_name,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    @staticmethod
    def _usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    # ---- routes ---------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.model_name, "retried_requests": self.retried}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as err:
            return _error(err)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "blsp-ray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            req = await self._chat_request(request)
        except ApiError as err:
            return _error(err)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            # The first event decides the status: an overloaded engine or a refused prompt is a 4xx/503
            # the client can act on, not a 200 followed by an error event.
            events = self._engine_events(req, restartable=False)
            deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s  # the whole reply's
            try:
                async with asyncio.timeout_at(deadline):
                    first = await anext(events)
                if first[0] == "error":
                    raise ApiError(*first[1])
            except (ApiError, TimeoutError, StopAsyncIteration) as err:
                await events.aclose()
                if isinstance(err, TimeoutError):
                    err = ApiError(504, f"no reply within the request timeout of {self.cfg.request_timeout_s}s", "timeout")
                elif isinstance(err, StopAsyncIteration):
                    err = ApiError(503, "the engine ended the reply without an event", "replica_failed")
                return _error(err)
            return StreamingResponse(self._sse(req, rid, created, first, events, deadline), media_type="text/event-stream",
                                     headers=_ignored_header(req))
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                text, done = [], None
                async for kind, value in self._engine_events(req, restartable=True):
                    if kind == "restart":
                        text = []
                    elif kind == "delta":
                        text.append(value)
                    elif kind == "error":
                        raise ApiError(value[0], value[1], value[2])
                    else:
                        done = value
        except TimeoutError:
            return _error(ApiError(504, f"no complete reply within the request timeout of {self.cfg.request_timeout_s}s", "timeout"))
        except ApiError as err:
            return _error(err)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": self.cfg.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": done["finish_reason"], "logprobs": None}],
            "usage": self._usage(done),
        }, headers=_ignored_header(req))

    async def _sse(self, req: ChatRequest, rid: str, created: int, first: tuple, events: AsyncIterator[tuple],
                   deadline: float) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format (``first`` then the rest of ``events``); errors
        after the 200 arrive as an error event."""

        async def all_events() -> AsyncIterator[tuple]:
            yield first
            async for event in events:
                yield event

        yield self._chunk(rid, created, {"role": "assistant", "content": ""})
        try:
            async with asyncio.timeout_at(deadline):
                async for kind, value in all_events():
                    if kind == "delta":
                        yield self._chunk(rid, created, {"content": value})
                    elif kind == "error":
                        raise ApiError(value[0], value[1], value[2])
                    else:
                        yield self._chunk(rid, created, {}, finish_reason=value["finish_reason"])
                        if req.include_usage:
                            yield self._chunk(rid, created, {}, usage=self._usage(value))
        except TimeoutError:
            err = ApiError(504, f"reply not finished within the request timeout of {self.cfg.request_timeout_s}s", "timeout")
            yield f"data: {json.dumps(err.body())}\n\n"
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await events.aclose()  # a client gone mid-reply stops the engine's work
        yield "data: [DONE]\n\n"


# ---- building and deploying ------------------------------------------------------------------


def build_app(cfg: BlspRayConfig, checkpoint: str | None = None):
    """The Serve application for ``cfg``: engine deployment (autoscaling) + ingress."""
    sc = cfg.serve
    checkpoint = checkpoint or sc.checkpoint or RunLayout.of(cfg).stage2_model
    if "://" not in checkpoint:
        checkpoint = str(Path(checkpoint).resolve())
    runtime_env = {"env_vars": dict(cfg.cluster.env_vars)} if cfg.cluster.env_vars else {}
    engine = BlspEngine.options(
        autoscaling_config={
            "min_replicas": sc.min_replicas,
            "max_replicas": sc.max_replicas,
            "initial_replicas": sc.min_replicas,
            "target_ongoing_requests": sc.target_ongoing_requests,
            "upscale_delay_s": sc.upscale_delay_s,
            "downscale_delay_s": sc.downscale_delay_s,
            "look_back_period_s": sc.look_back_period_s,
        },
        max_ongoing_requests=sc.max_ongoing_requests,
        max_queued_requests=sc.max_queued_requests,
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica,
                           "runtime_env": {"env_vars": {**runtime_env.get("env_vars", {}), **sc.replica_env()}}},
    ).bind(checkpoint, sc.model_dump(), sc.engine_dtype(cfg.model), cfg.cluster.s3.model_dump())
    return ChatIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env}).bind(engine, sc.model_dump())


def app_builder(args: dict):
    """``serve run serve.app:app_builder config=configs/tiny.yaml [checkpoint=DIR] [set=key=value,...]``."""
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [s for s in overrides.split(",") if s]
    cfg = load_config(args["config"], overrides)
    return build_app(cfg, args.get("checkpoint"))


def deploy(cfg: BlspRayConfig, checkpoint: str | None = None, name: str = APP_NAME) -> str:
    """Start Serve's proxy on ``serve.host:port`` (connected driver required) and deploy; returns the base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, checkpoint), name=name, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"
