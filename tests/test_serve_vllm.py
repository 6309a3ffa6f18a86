"""The chat service on the vLLM engine (the checkpoint as vLLM's native BLSP model), over HTTP on 127.0.0.1.

Slow (vLLM's engine start on CPU): one deployment, a plain and a streamed completion, and the
greedy reply checked against the transformers path on the same checkpoint and conversation.
"""

from __future__ import annotations

import pytest

from tests.test_serve import user, wav_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_app(ray_cluster, tiny_assets, tmp_root):
    import torch
    from ray import serve

    from blsp_ray.runtime import free_port
    from blsp_ray.config import config_from_dict
    from blsp_ray.model.modeling import build_blsp_from_parts
    from serve.app import build_app

    ckpt = tmp_root / "serve-vllm-ckpt"
    torch.manual_seed(0)
    build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=64).save_adapter(
        ckpt, str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    cfg = config_from_dict({
        "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper")},
        "serve": {"checkpoint": str(ckpt), "engine": "vllm", "min_replicas": 1, "max_replicas": 1,
                  "cpus_per_replica": 1, "max_new_tokens": 16, "vllm_max_model_len": 512},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="blsp-vllm", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "checkpoint": ckpt}
    finally:
        serve.shutdown()


def test_vllm_engine_completion_stream_and_parity(vllm_app):
    from openai import OpenAI

    from blsp_ray.config import ServeConfig
    from blsp_ray.engines import GenerationSettings
    from blsp_ray.speech_lm import SpeechLM
    from serve.schemas import to_chat_request

    client = OpenAI(base_url=vllm_app["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [user("What is said here?", wav_bytes(0.8)), {"role": "assistant", "content": "A tone."},
                user("And here?", wav_bytes(1.1))]
    out = client.chat.completions.create(model="blsp", messages=messages, max_tokens=12, temperature=0)
    text = out.choices[0].message.content
    assert text and 0 < out.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="blsp", messages=messages, max_tokens=12, temperature=0, stream=True)
                       if c.choices)
    assert streamed == text
    # Same conversation, same checkpoint, greedy: the transformers path gives the same reply.
    req = to_chat_request({"messages": messages, "max_tokens": 12, "temperature": 0}, ServeConfig(max_new_tokens=16))
    chat = SpeechLM.from_checkpoint(vllm_app["checkpoint"], ServeConfig(engine="transformers"))
    reference = "".join(chat.stream(chat.prompt_embeds(req.turns, req.header), GenerationSettings(12)))
    assert text == reference


def test_speech_that_overflows_the_context_is_a_400(vllm_app):
    """The replica checks the prompt's text against the context before the engine; the speech's
    positions are known once vLLM's processor has run, and a prompt they push past the context is
    the client's 400 context_length_exceeded, not a 500."""
    import requests

    from blsp_ray.config import ServeConfig
    from blsp_ray.speech_lm import SpeechLM
    from serve.schemas import to_chat_request

    chat = SpeechLM.from_checkpoint(vllm_app["checkpoint"], ServeConfig(engine="transformers"))
    audio = wav_bytes(1.1)

    def body(words: int) -> dict:
        return {"messages": [user("a " * words, audio)], "max_tokens": 1, "temperature": 0}

    def positions(words: int) -> tuple[int, int]:  # (whole prompt, its speech positions)
        req = to_chat_request(body(words), ServeConfig(max_new_tokens=16))
        whole = chat.prompt_embeds(req.turns, req.header).shape[0]
        return whole, whole - chat.prompt_embeds([t.__class__(t.instruction) for t in req.turns], req.header).shape[0]

    words = next(w for w in range(400, 520) if positions(w)[0] > 512)  # vllm_max_model_len: 512
    whole, speech = positions(words)
    assert whole - speech + 1 + 1 <= 512, "the text alone (one speech token, max_tokens 1) must pass the replica's own check"
    r = requests.post(vllm_app["url"] + "/v1/chat/completions", json=body(words), timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded", r.text
