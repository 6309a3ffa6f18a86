"""The BLSP chat service on the real Ray Serve app, over HTTP on 127.0.0.1.

One application is deployed for the module on the session Ray cluster (engine autoscaling
min 1 / max 2 with a low target so load scales it), and Serve is shut down at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-5f1c"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))


def wav_bytes(seconds: float = 1.0, rate: int = 16000, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.shape)
    samples = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(text: str | None = "Please transcribe the following audio.", audio: bytes | None = None) -> dict:
    content = [{"type": "text", "text": text}] if text is not None else []
    if audio is not None:
        content.append(audio_part(audio))
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_root):
    import torch

    from blsp_ray.model.modeling import build_blsp_from_parts

    out = tmp_root / "serve-ckpt"
    if not out.exists():
        torch.manual_seed(0)
        model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=64)
        model.save_adapter(out, str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    return out


@pytest.fixture(scope="module")
def app(ray_cluster, checkpoint, tiny_assets):
    from ray import serve

    from blsp_ray.runtime import free_port
    from blsp_ray.config import config_from_dict
    from serve.app import APP_NAME, build_app

    cfg = config_from_dict(
        {
            "cluster": {
                "env_vars": {
                    "BLSP_TEST_TOKEN": TOKEN,
                    # Report load every second (default 10 s) so the autoscaler reacts within the test.
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                }
            },
            "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper")},
            "serve": {
                "checkpoint": str(checkpoint),
                "engine": "transformers",
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "look_back_period_s": 5,
                "cpus_per_replica": 0.5,
                "max_new_tokens": 32,
                "max_body_bytes": 1_000_000,
                "max_audio_seconds": 5,
                "auth_token_env": "BLSP_TEST_TOKEN",
                "request_timeout_s": 60,
                "body_timeout_s": 2,
            },
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "cfg": cfg, "dashboard": ray_cluster.dashboard_url, "temp_dir": ray_cluster.temp_dir}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def post(app, body, token: str | None = TOKEN, raw: bytes | None = None, content_type: str = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(app["url"] + "/v1/chat/completions", data=data, headers=headers, timeout=60)


def engine_status():
    from ray import serve

    from serve.app import APP_NAME

    return serve.status().applications[APP_NAME].deployments["BlspEngine"]


def engine_pids(app) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=app["dashboard"], filters=[("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.class_name.endswith(":BlspEngine")]


# ---- the OpenAI client against the service ---------------------------------------------------


def test_health_models_and_page(app, client):
    assert requests.get(app["url"] + "/health", timeout=10).json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["blsp"]
    page = requests.get(app["url"] + "/", timeout=10)
    assert page.status_code == 200 and 'id="audio"' in page.text


def test_openai_client_text_and_audio(client):
    out = client.chat.completions.create(
        model="blsp",
        messages=[user("Please transcribe the following audio.", wav_bytes(1.0))],
        max_tokens=12,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 10
    # Greedy decoding is deterministic: the same request gives the same reply.
    again = client.chat.completions.create(
        model="blsp", messages=[user("Please transcribe the following audio.", wav_bytes(1.0))], max_tokens=12, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content


def test_openai_client_streamed_multi_turn(client):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        user("What is said here?", wav_bytes(0.8)),
        {"role": "assistant", "content": "Something about a tone."},
        user("Now summarise this one.", wav_bytes(1.2, rate=8000)),  # 8 kHz: resampled, not rejected
    ]
    stream = client.chat.completions.create(
        model="blsp", messages=messages, max_tokens=10, temperature=0.7, seed=3,
        stream=True, stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            deltas.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([d for d in deltas if d]) >= 2, deltas  # several chunks, not one blob
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens <= 10
    # A streamed reply equals the non-streamed one for the same seeded request.
    whole = client.chat.completions.create(model="blsp", messages=messages, max_tokens=10, temperature=0.7, seed=3)
    assert whole.choices[0].message.content == "".join(deltas)


# ---- malformed requests: each a 4xx with a reason, never a 500 -------------------------------

GOOD_AUDIO = wav_bytes(0.5)
MALFORMED = {
    "bad_json": (None, b'{"messages": [', 400, "invalid_json"),
    "not_an_object": (None, b"[1, 2]", 400, "invalid_json"),
    "unknown_field": ({"messages": [user("hi")], "frobnicate": 1}, None, 400, "invalid_request"),
    "unknown_part_field": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]}, None, 400, "invalid_request"),
    "no_messages": ({"messages": []}, None, 400, "invalid_request"),
    "undecodable_audio": ({"messages": [user("x", b"this is not a wav file at all" * 20)]}, None, 400, "undecodable_audio"),
    "empty_audio_bytes": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, None, 400, "empty_audio"),
    "empty_audio_wav": ({"messages": [user("x", wav_bytes(0.0))]}, None, 400, "empty_audio"),
    "bad_base64": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!not base64!!", "format": "wav"}}]}]}, None, 400, "invalid_base64"),
    "sample_rate_too_low": ({"messages": [user("x", wav_bytes(0.5, rate=4000))]}, None, 400, "bad_sample_rate"),
    "audio_too_long": ({"messages": [user("x", wav_bytes(6.0))]}, None, 400, "audio_too_long"),
    "unsupported_format": ({"messages": [{"role": "user", "content": [audio_part(GOOD_AUDIO, "ogg")]}]}, None, 400, "unsupported_audio_format"),
    "format_label_mismatch": ({"messages": [{"role": "user", "content": [audio_part(GOOD_AUDIO, "mp3")]}]}, None, 400, "audio_format_mismatch"),
    "json_response_format": ({"messages": [user("hi")], "response_format": {"type": "json_object"}}, None, 400, "invalid_request"),
    "text_over_max_text_bytes": ({"messages": [user("x" * 70_000)]}, None, 400, "text_too_long"),
    "path_not_opened": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"/etc/passwd").decode(), "format": "wav"}}]}]}, None, 400, "undecodable_audio"),
    "last_is_assistant": ({"messages": [user("hi"), {"role": "assistant", "content": "hello"}]}, None, 400, "invalid_messages"),
    "two_audios": ({"messages": [{"role": "user", "content": [audio_part(GOOD_AUDIO), audio_part(GOOD_AUDIO)]}]}, None, 400, "invalid_messages"),
    "max_tokens_too_large": ({"messages": [user("hi")], "max_tokens": 100000}, None, 400, "max_tokens_too_large"),
    "negative_temperature": ({"messages": [user("hi")], "temperature": -1}, None, 400, "invalid_request"),
    "unknown_model": ({"model": "gpt-4o", "messages": [user("hi")]}, None, 404, "model_not_found"),
    "body_too_large": ({"messages": [user("x" * 1_100_000)]}, None, 413, "body_too_large"),
    # Shapes that were 500s: JSON nested 10k deep, a clip under Whisper's 201-sample floor, seeds
    # outside int64, a lone surrogate escape, NaN.
    "nested_10k_deep": (None, b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "invalid_json"),
    "wav_of_100_samples": ({"messages": [user("x", wav_bytes(100 / 16000))]}, None, 400, "audio_too_short"),
    "wav_of_200_samples": ({"messages": [user("x", wav_bytes(200 / 16000))]}, None, 400, "audio_too_short"),
    "seed_2_pow_64": ({"messages": [user("hi")], "seed": 2**64}, None, 400, "invalid_request"),
    "seed_below_int64": ({"messages": [user("hi")], "seed": -(2**63) - 1}, None, 400, "invalid_request"),
    "lone_surrogate": (None, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_text"),
    "nan_temperature": (None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_request"),
    # Strict JSON types.
    "max_tokens_true": ({"messages": [user("hi")], "max_tokens": True}, None, 400, "invalid_request"),
    "max_tokens_string": ({"messages": [user("hi")], "max_tokens": "16"}, None, 400, "invalid_request"),
    "stream_string": ({"messages": [user("hi")], "stream": "yes"}, None, 400, "invalid_request"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_request_is_4xx_with_reason(app, kind):
    body, raw, status, code = MALFORMED[kind]
    resp = post(app, body, raw=raw)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["message"]


def test_unknown_part_field_names_the_field(app):
    resp = post(app, MALFORMED["unknown_part_field"][0])
    assert resp.json()["error"]["message"] == "unknown field 'messages.0.content.0.extra'", resp.text


def test_json_routes_require_json(app):
    """A text/plain POST (what a web page may send cross-site without a preflight) runs nothing."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        resp = post(app, {"messages": [user("hi")]}, content_type=content_type)
        assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type", resp.text
    assert post(app, {"messages": [user("hi")], "max_tokens": 2}, content_type="application/json; charset=utf-8").status_code == 200


def test_openai_client_fields_and_mp3(app):
    """What OpenAI-compatible clients send: the developer role, penalties (accepted, not applied, and
    said so), response_format text; mp3 audio decodes."""
    buf = io.BytesIO()
    t = np.arange(16000) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="MP3", subtype="MPEG_LAYER_III")
    mp3 = buf.getvalue()
    resp = post(app, {"messages": [{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "What is this?"}, audio_part(mp3, "mp3")]}],
                      "presence_penalty": 0.5, "frequency_penalty": 0, "response_format": {"type": "text"}, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Ignored-Fields"] == "presence_penalty"


def test_tiny_temperature_is_greedy_not_an_error(app):
    """temperature 1e-300 overflowed the softmax (a 500); below 1e-3 it now samples as greedy."""
    body = {"messages": [user("hi")], "max_tokens": 6}
    tiny = post(app, {**body, "temperature": 1e-300})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == post(app, {**body, "temperature": 0}).json()["choices"][0]["message"]["content"]


def test_body_limit_without_content_length(app):
    """A chunked upload is cut at the limit too (no Content-Length to trust)."""
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}]}'

    resp = requests.post(app["url"] + "/v1/chat/completions", data=chunks(),
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"


def test_stalled_body_is_cut_at_the_body_deadline(app):
    """Headers and 5 of 1,000 declared bytes, then silence: 408 at serve.body_timeout_s, not a held connection."""
    import socket

    host, port = app["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mes").encode())
        t0 = time.time()
        reply = sock.recv(4096).decode(errors="replace")
        waited = time.time() - t0
        while "body_timeout" not in reply and (more := sock.recv(4096)):
            reply += more.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply, reply
    assert waited < app["cfg"].serve.body_timeout_s + 5


def test_audio_bomb_is_refused_from_its_header(app):
    """165 KB of FLAC that decodes to 600 MB (8 channels, 655,350 Hz, 29 s) is refused before decoding."""
    bomb = io.BytesIO()
    sf.write(bomb, np.zeros((655_350 * 29, 8), np.int16), 655_350, format="FLAC", subtype="PCM_16")
    assert len(bomb.getvalue()) < 1_000_000
    t0 = time.time()
    resp = post(app, {"messages": [{"role": "user", "content": [audio_part(bomb.getvalue(), "flac")]}]})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_sample_rate", resp.text
    assert time.time() - t0 < 1.0


def test_overload_gets_503_with_retry_after(app):
    """One replica taking 1 request with 1 queued, 8 clients at once: 200s and 503 + Retry-After
    only (no 504, nobody waits out the request timeout)."""
    from ray import serve

    from serve.app import build_app

    cfg = app["cfg"].model_copy(deep=True)
    cfg.serve = cfg.serve.model_copy(update={"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1,
                                             "max_queued_requests": 1, "retry_after_s": 3})
    serve.run(build_app(cfg), name="overload", route_prefix="/overload")
    try:
        def one(_) -> requests.Response:
            return requests.post(app["url"] + "/overload/v1/chat/completions", timeout=60,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
                                 data=json.dumps({"messages": [user("hi", wav_bytes(1.0))], "max_tokens": 32}))

        assert one(0).status_code == 200  # the replica is up
        t0 = time.time()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, range(8)))
        statuses = sorted(r.status_code for r in replies)
        print(f"\noverload: 8 concurrent requests on 1 ongoing + 1 queued -> {statuses} in {time.time() - t0:.1f}s")
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for r in replies:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "3" and r.json()["error"]["code"] == "overloaded"
    finally:
        serve.delete("overload")


def test_no_request_is_served_after_its_client_gave_up(app):
    """One engine replica taking one request at a time with 16 queued; a client that gives up on its
    request while it waits: the engine never runs it (its replica counts 16 completed and nothing else)."""
    from ray import serve

    from serve.app import build_app

    cfg = app["cfg"].model_copy(deep=True)
    cfg.serve = cfg.serve.model_copy(update={"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1,
                                             "max_queued_requests": 32})
    serve.run(build_app(cfg), name="gaveup", route_prefix="/gaveup")
    try:
        engine = serve.get_deployment_handle("BlspEngine", app_name="gaveup")
        url = app["url"] + "/gaveup/v1/chat/completions"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        body = json.dumps({"messages": [user("hi", wav_bytes(4.0))], "max_tokens": 32, "temperature": 0})
        assert requests.post(url, data=body, headers=headers, timeout=60).status_code == 200  # the replica is up
        before = engine.outcome_counts.remote().result()
        t0 = time.time()
        with ThreadPoolExecutor(16) as pool:
            busy = [pool.submit(requests.post, url, data=body, headers=headers, timeout=120) for _ in range(16)]
            time.sleep(0.3)
            with pytest.raises(requests.Timeout):  # queued behind the 16: the client leaves after 0.3 s
                requests.post(url, data=body, headers=headers, timeout=0.3)
            gave_up_at = time.time() - t0
            statuses = [f.result().status_code for f in busy]
        busy_for = time.time() - t0
        time.sleep(2)  # a request started late would have finished by now
        after = engine.outcome_counts.remote().result()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        print(f"\ngave up at {gave_up_at:.2f}s of {busy_for:.2f}s of queued work; engine outcomes {delta}")
        assert statuses == [200] * 16
        assert busy_for > gave_up_at + 0.5  # it really waited behind the queue when it gave up
        assert delta.get("completed") == 16 and sum(delta.values()) - delta.get("dropped", 0) == 16, delta
    finally:
        serve.delete("gaveup")


def test_auth_required(app):
    for token in (None, "wrong-token"):
        resp = post(app, {"messages": [user("hi")]}, token=token)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(app["url"] + "/v1/models", timeout=10).status_code == 401
    assert requests.get(app["url"] + "/health", timeout=10).status_code == 200  # probes need no token


# ---- a generated hostile set, cost per refused request -----------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def replica_pid(app, deployment: str) -> int:
    from ray.util.state import list_actors

    actors = list_actors(address=app["dashboard"], filters=[("state", "=", "ALIVE")])
    return next(a.pid for a in actors if a.class_name.endswith(f":{deployment}"))


class HealthProbe(threading.Thread):
    """GET /health every 0.1 s while a test runs; ``worst``: the slowest answer (s), ``failed``: non-200s."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.worst, self.failed, self.probes = url, threading.Event(), 0.0, [], 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.time()
            try:
                status = requests.get(self.url + "/health", timeout=5).status_code
            except requests.RequestException as err:
                status = type(err).__name__
            self.worst, self.probes = max(self.worst, time.time() - t0), self.probes + 1
            if status != 200:
                self.failed.append(status)
            time.sleep(0.1)


def hostile_requests():
    """Request bodies over the chat schema: every field right, wrong-typed, missing or extra, any JSON
    value where an object is expected, audio that is valid, tiny, stereo, truncated, random or not base64."""
    from hypothesis import strategies as st

    any_json = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )
    clips = [GOOD_AUDIO, wav_bytes(0.005), wav_bytes(0.3, rate=8000, channels=2), GOOD_AUDIO[:300], wav_bytes(0.4, fmt="FLAC")]
    audio_data = st.sampled_from([b64(c) for c in clips]) | st.binary(max_size=300).map(b64) | st.text(max_size=40)
    audio = st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
        {"data": audio_data, "format": st.sampled_from(["wav", "flac", "mp3", "ogg", "", "WAV"]) | any_json})})
    text = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=120) | any_json})
    part = audio | text | any_json
    role = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", ""]) | any_json
    message = st.fixed_dictionaries({"role": role, "content": st.text(max_size=120) | st.lists(part, max_size=3) | any_json})
    number = st.integers(-3, 40) | st.floats(-2, 3) | any_json
    hostile = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=0, max_size=3) | any_json},
        optional={"model": st.sampled_from(["blsp", "gpt-4o"]) | any_json, "max_tokens": number, "temperature": number,
                  "top_p": number, "seed": st.integers() | any_json, "stream": st.booleans() | any_json,
                  "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | any_json,
                  "presence_penalty": number, "stream_options": any_json, "n": number, "user": any_json},
    )
    # Well-formed requests with odd values (any text, any audio of the set above, edge sampling values),
    # so the engine path is fuzzed too, not only validation.
    good_part = text | st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
        {"data": st.sampled_from([b64(c) for c in clips]), "format": st.sampled_from(["wav", "flac"])})})
    turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=200) | st.lists(good_part, min_size=1, max_size=2)})
    well_formed = st.fixed_dictionaries(
        {"messages": st.lists(turn, min_size=1, max_size=2)},
        optional={"max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
                  "seed": st.integers(-(2**63), 2**63 - 1), "stream": st.booleans(),
                  "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4)},
    )
    return hostile | well_formed


def test_generated_hostile_set_gets_no_5xx_and_health_stays_fast(app):
    """300 generated request bodies plus 60 raw byte strings, one at a time: each answer is a 200 or a
    4xx whose error names a code and a reason; /health, probed throughout, answers every time within 1 s."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    seen: dict[int, int] = {}

    def check(resp: requests.Response, sent) -> None:
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, f"{resp.status_code} for {str(sent)[:300]}: {resp.text[:300]}"
        if resp.status_code >= 400:
            err = resp.json()["error"]
            assert err["code"] and err["message"], resp.text
        elif resp.headers["content-type"].startswith("text/event-stream"):
            assert resp.text.rstrip().endswith("data: [DONE]") and '"error"' not in resp.text, resp.text[-300:]
        else:
            assert isinstance(resp.json()["choices"][0]["message"]["content"], str)

    fuzz = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

    @fuzz
    @given(hostile_requests())
    def bodies(body):
        check(post(app, body), body)

    @settings(fuzz, max_examples=60)
    @given(st.binary(max_size=400))
    def raw_bytes(raw):
        check(post(app, None, raw=raw), raw)

    probe = HealthProbe(app["url"])
    probe.start()
    try:
        bodies()
        raw_bytes()
    finally:
        probe.stop.set()
        probe.join()
    print(f"\nhostile set: statuses {dict(sorted(seen.items()))}; /health {probe.probes} probes, slowest {probe.worst:.3f}s")
    assert probe.failed == [] and probe.probes > 10
    assert probe.worst < 1.0
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if k >= 400) > 0  # both kinds were generated


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), bytes."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_costly_bodies_are_refused_fast_with_bounded_memory(app):
    """Text just under the body limit and a FLAC bomb (600 MB decoded) are refused in under 1 s, and
    neither raises the ingress's or the engine's peak memory by 100 MB."""
    bomb = io.BytesIO()
    sf.write(bomb, np.zeros((655_350 * 29, 8), np.int16), 655_350, format="FLAC", subtype="PCM_16")
    long_text = "many words " * ((app["cfg"].serve.max_body_bytes - 200) // 11)
    cases = {
        "long_text": ({"messages": [user(long_text)]}, "text_too_long"),
        "flac_bomb": ({"messages": [{"role": "user", "content": [audio_part(bomb.getvalue(), "flac")]}]}, "bad_sample_rate"),
    }
    pids = {name: replica_pid(app, name) for name in ("ChatIngress", "BlspEngine")}
    for case, (body, code) in cases.items():
        before = {name: peak_rss(pid) for name, pid in pids.items()}
        t0 = time.time()
        resp = post(app, body)
        took = time.time() - t0
        growth = {name: (peak_rss(pid) - before[name]) / 2**20 for name, pid in pids.items()}
        print(f"\n{case}: {resp.status_code} in {took:.2f}s, peak memory growth (MiB) {growth}")
        assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text
        assert took < 1.0
        assert all(g < 100 for g in growth.values()), growth


def test_a_failed_start_leaves_no_process_behind(checkpoint, tiny_assets, tmp_path):
    """``python -m serve`` with its token variable unset exits with the reason, and the local Ray it
    started (head, dashboard, client server, workers) ends with it."""
    import sys

    import psutil
    import yaml

    from blsp_ray.runtime import free_port

    unset = "BLSP_TOKEN_NOT_SET_4C1E"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"lm_path": str(tiny_assets / "lm"), "whisper_path": str(tiny_assets / "whisper")},
        "serve": {"checkpoint": str(checkpoint), "engine": "transformers", "cpus_per_replica": 0.5,
                  "auth_token_env": unset, "port": free_port()},
    }))
    # The processes the command starts carry this variable (Ray's head, its services and its workers
    # inherit the environment), so other Ray clusters on the machine (another test session's) are not counted.
    mark = f"BLSP_FAILED_START_{uuid.uuid4().hex}"

    def marked_processes() -> dict[int, str]:
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if mark in p.environ():
                    found[p.pid] = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    # One constructor attempt per replica, not Serve's three: every attempt fails the same way here.
    env = {k: v for k, v in os.environ.items() if k not in (unset, "RAY_ADDRESS")} | {
        mark: "1", "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
    seen: set[str] = set()  # the marked processes while it ran: the mark does reach Ray's processes
    log = tmp_path / "serve.log"  # a file, not a pipe: a pipe read only at exit would fill and stall the command
    with open(log, "w") as out, subprocess.Popen([sys.executable, "-m", "serve", "--config", str(config)], cwd=REPO,
                                                 env=env, stdout=out, stderr=subprocess.STDOUT) as run:
        deadline = time.time() + 300
        while run.poll() is None and time.time() < deadline:
            seen.update(c.split()[0] for c in marked_processes().values() if c)
            time.sleep(0.5)
        if run.poll() is None:
            run.kill()
            pytest.fail(f"python -m serve did not exit in 300 s:\n{log.read_text()[-2000:]}")
    output = log.read_text()
    assert run.returncode != 0
    assert unset in output, output[-2000:]
    assert any("raylet" in name for name in seen) and any("gcs_server" in name for name in seen), seen
    deadline = time.time() + 15
    while (left := marked_processes()) and time.time() < deadline:
        time.sleep(1)
    assert left == {}, [c[:200] for c in left.values()]


# ---- load, autoscaling, replica failure ------------------------------------------------------


def run_load(client, n: int, concurrency: int, on_done=None) -> list[str]:
    """``n`` text+audio requests, ``concurrency`` at a time; returns the error messages."""
    errors: list[str] = []
    audio = wav_bytes(1.0)

    def one(i: int) -> None:
        try:
            out = client.chat.completions.create(
                model="blsp", messages=[user(f"Request {i}: what is said?", audio)], max_tokens=8, temperature=0
            )
            assert out.choices[0].message.content is not None
        except Exception as err:  # collected: the test reports every failure
            errors.append(f"{i}: {type(err).__name__}: {err}")
        if on_done:
            on_done(i)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return errors


def controller_log(app, lines: int = 40) -> str:
    """The tail of Serve's controller log (autoscaling decisions), for failure messages."""
    logs = sorted(Path(app["temp_dir"]).glob("session_latest/logs/serve/controller_*.log"))
    return "".join(logs[-1].read_text().splitlines(keepends=True)[-lines:]) if logs else "(no controller log)"


def test_bounded_concurrent_load_has_no_errors(client):
    assert run_load(client, n=64, concurrency=8) == []


def test_load_scales_engine_to_two_replicas(app, client):
    """Autoscaling min 1 / max 2, target 1 ongoing request: sustained load starts a second replica."""
    assert engine_status().replica_states.get("RUNNING", 0) == 1
    scaled = threading.Event()
    errors: list[str] = []
    seen: set[int] = set()

    def load_until_scaled():
        while not scaled.is_set():
            errors.extend(run_load(client, n=16, concurrency=8))

    loader = threading.Thread(target=load_until_scaled)
    loader.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            running = engine_status().replica_states.get("RUNNING", 0)
            seen.add(running)
            if running == 2:
                break
            time.sleep(0.5)
    finally:
        scaled.set()
        loader.join()
    assert errors == []
    assert max(seen) == 2, f"engine never reached 2 running replicas: {sorted(seen)}\n{controller_log(app)}"


def test_killed_replica_loses_no_request_and_recovers(app, client):
    deadline = time.time() + 60
    while len(engine_pids(app)) < 2 and time.time() < deadline:  # the previous test scaled it to 2
        time.sleep(1)
    pids = engine_pids(app)
    victim = pids[0]
    done = []
    killed = threading.Event()

    def on_done(i):
        done.append(i)
        if len(done) == 12 and not killed.is_set():
            os.kill(victim, signal.SIGKILL)  # mid-load: the replica process dies with requests in flight
            killed.set()

    errors = run_load(client, n=48, concurrency=8, on_done=on_done)
    assert killed.is_set()
    # In-flight requests on the dead replica are re-sent to the other one (by Serve's router, or by
    # the ingress when none of the reply had reached the client: /health counts those), so no
    # accepted request is lost; at most the 8 in flight could be.
    assert len(errors) <= 8
    assert errors == [], errors
    deadline = time.time() + 90
    while time.time() < deadline:
        status = engine_status()
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == len(pids) and victim not in engine_pids(app):
            break
        time.sleep(1)
    assert victim not in engine_pids(app)
    assert status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == len(pids), status
    assert run_load(client, n=4, concurrency=2) == []


# ---- the chat page in a real browser ---------------------------------------------------------


class Cdp:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"page never satisfied: {expression}")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


LAST_REPLY = """(() => { const r = [...document.querySelectorAll('.turn.assistant, .turn.error')].pop();
  return r && r.dataset.done ? r.className + '|' + r.textContent : null; })()"""


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_chat_page_in_headless_chromium(app, tmp_path):
    wav = tmp_path / "question.wav"
    wav.write_bytes(wav_bytes(1.0))
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1000,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        cdp = Cdp(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=app["url"] + "/")
        cdp.wait_for("document.readyState === 'complete' && !!document.getElementById('audio')")
        cdp.eval(f"document.getElementById('api-key').value = {json.dumps(TOKEN)}")
        cdp.eval("document.getElementById('max-tokens').value = '12'")
        # Turn 1: upload a wav, type an instruction, send.
        root = cdp.call("DOM.getDocument")["root"]["nodeId"]
        file_input = cdp.call("DOM.querySelector", nodeId=root, selector="#audio")["nodeId"]
        cdp.call("DOM.setFileInputFiles", files=[str(wav)], nodeId=file_input)
        cdp.wait_for("document.getElementById('audio').files.length === 1")
        cdp.eval("document.getElementById('instruction').value = 'Please transcribe the following audio.'")
        cdp.eval("document.getElementById('send').click()")
        first = cdp.wait_for(LAST_REPLY)
        assert first.startswith("turn assistant|BLSP: ") and len(first) > len("turn assistant|BLSP: "), first
        audio_parts = "lastSent.messages.flatMap((m) => Array.isArray(m.content) ? m.content : []).filter((p) => p.type === 'input_audio').length"
        assert cdp.eval(audio_parts) == 1
        # Turn 2: text only; the history goes along, its clip left out (the server's audio limit holds however long the chat).
        cdp.eval("document.getElementById('instruction').value = 'Say more.'")
        cdp.eval("document.getElementById('send').click()")
        cdp.wait_for("document.querySelectorAll('.turn.assistant, .turn.error').length === 2")
        second = cdp.wait_for(LAST_REPLY)
        assert second.startswith("turn assistant|BLSP: "), second
        assert cdp.eval("messages.length") == 4
        assert cdp.eval(audio_parts) == 0
        assert cdp.eval("lastSent.messages[0].content.at(-1).text") == "[audio from an earlier turn, not re-sent]"
        assert "earlier clips are not re-sent" in cdp.eval("document.getElementById('log').textContent")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = cdp.call("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "serve_chat_page.png").write_bytes(base64.b64decode(shot))
        assert (ARTIFACTS / "serve_chat_page.png").stat().st_size > 1000
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
