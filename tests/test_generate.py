"""Speech generation: SpeechLM (the native vLLM model vs transformers on the same clips, and
BlspModel.generate) and the original release's ``jobs.generate`` command line through
``ray job submit`` on the session's local cluster."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from blsp_ray.model.audio import load_audio
from blsp_ray.config import GenerateConfig
from blsp_ray.io.storage import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Please transcribe the following audio."


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory):
    """An adapter-only BLSP checkpoint (untrained adapter) on the tiny assets."""
    import torch

    from blsp_ray.model.modeling import build_blsp_from_parts

    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    out = tmp_path_factory.mktemp("blsp") / "model"
    model.save_adapter(out, str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    return out


@pytest.fixture(scope="module")
def clips(speech_corpus):
    return read_jsonl(speech_corpus["heldout"])[:6]


def test_transformers_engine_matches_blsp_generate(checkpoint, clips):
    """SpeechLM's transformers path (left-padded spliced embeddings through TransformersEngine)
    gives BlspModel.generate's tokens, batch by batch."""
    from blsp_ray.engines import GenerationSettings
    from blsp_ray.model.modeling import SpeechBatch
    from blsp_ray.speech_lm import SpeechLM

    waves = [load_audio(c["audio"]) for c in clips]
    speech_lm = SpeechLM.from_checkpoint(str(checkpoint), GenerateConfig(engine="transformers", batch_size=4),
                                         GenerationSettings(max_new_tokens=12))
    got = [g.token_ids for g in speech_lm.generate(waves, INSTRUCTION)]
    proc, eos = speech_lm.processor, speech_lm.tokenizer.eos_token_id
    speech, expected = proc.features(waves), []
    for s in range(0, len(waves), 4):  # as the original release generates: BlspModel.generate per batch
        lengths = speech.frame_lengths[s : s + 4]
        part = SpeechBatch(speech.features[s : s + 4, :, : int(lengths.max())], lengths)
        batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION)] * len(lengths))
        new = speech_lm.model.generate(batch["prefix_ids"], batch["prefix_mask"], batch["suffix_ids"], batch["suffix_mask"],
                                       speech=part, max_new_tokens=12, do_sample=False, pad_token_id=proc.pad_id, eos_token_id=eos)
        expected += [row[: row.index(eos)] if eos in row else row for row in new.tolist()]
    assert got == expected


def test_native_vllm_matches_transformers(checkpoint, clips):
    """SpeechLM on the vLLM engine (the checkpoint exported and run as vLLM's native BLSP model)
    gives the transformers engine's greedy tokens on the same clips."""
    from blsp_ray.engines import GenerationSettings
    from blsp_ray.speech_lm import SpeechLM

    waves = [load_audio(c["audio"]) for c in clips]
    settings = GenerationSettings(max_new_tokens=12)
    outs = {}
    for engine in ("transformers", "vllm"):
        speech_lm = SpeechLM.from_checkpoint(str(checkpoint), GenerateConfig(engine=engine, batch_size=4), settings)
        eos = speech_lm.tokenizer.eos_token_id
        outs[engine] = [[t for t in g.token_ids if t != eos] for g in speech_lm.generate(waves, INSTRUCTION)]  # vLLM keeps EOS
        del speech_lm
    assert all(len(t) > 0 for t in outs["vllm"])
    assert outs["vllm"] == outs["transformers"]


@pytest.mark.slow
def test_original_cli_via_ray_job_submit(ray_cluster, checkpoint, clips, tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wav file")
    rows = [{"audio": c["audio"], "reference": c["text"], "id": f"clip-{i}"} for i, c in enumerate(clips[:4])]
    rows.insert(1, {"audio": str(tmp_path / "missing.wav"), "reference": "x", "id": "missing"})
    rows.insert(3, {"audio": str(bad), "reference": "y", "id": "corrupt"})
    # Clips at and around Whisper's floor (MIN_SAMPLES = 201) and a header with no samples.
    for n in (1, 100, 200, 201):
        sf.write(tmp_path / f"samples_{n}.wav", np.full(n, 0.1, np.float32), 16000)
        rows.append({"audio": str(tmp_path / f"samples_{n}.wav"), "reference": "z", "id": f"samples-{n}"})
    sf.write(tmp_path / "header_only.wav", np.zeros(0, np.float32), 16000)
    rows.append({"audio": str(tmp_path / "header_only.wav"), "reference": "h", "id": "header-only"})
    write_jsonl(tmp_path / "test.jsonl", rows)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "cluster": {"storage_root": str(tmp_path / "runs"), "run_id": "gen"},
        "model": {"lm_path": "unused", "whisper_path": "unused"},
        "data": {"min_duration_s": 0.0},  # only Whisper's own floor: the 201-sample clip is answered
        "generate": {"engine": "transformers", "batch_size": 2, "max_new_tokens": 8},
    }))
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run(
        [ray, "job", "submit", "--address", ray_cluster.dashboard_url,
         "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}}), "--",
         sys.executable, "-m", "jobs.generate", "--config", str(tmp_path / "cfg.yaml"),
         "--input_file", str(tmp_path / "test.jsonl"), "--output_file", str(tmp_path / "out.jsonl"),
         "--blsp_model", str(checkpoint), "--instruction", INSTRUCTION, "--max_new_tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # input order, pass-through fields
    assert [r["reference"] for r in out] == [r["reference"] for r in rows]
    by_id = {r["id"]: r for r in out}
    # Errors name the reason and the manifest's 1-based line.
    assert by_id["missing"]["error"].startswith(f"missing_file: {tmp_path / 'test.jsonl'}:2: ") and "response" not in by_id["missing"]
    assert by_id["missing"]["error_reason"] == "missing_file"
    assert by_id["corrupt"]["error"].startswith(f"undecodable: {tmp_path / 'test.jsonl'}:4: ")
    for n in (1, 100, 200):
        assert by_id[f"samples-{n}"]["error_reason"] == "too_short", by_id[f"samples-{n}"]
    assert by_id["header-only"]["error_reason"] == "empty"
    for key in [f"clip-{i}" for i in range(4)] + ["samples-201"]:
        r = by_id[key]
        assert "error" not in r and isinstance(r["response"], str) and r["response"], r
    assert "[generate] 5 responses, 6 errors {'empty': 1, 'missing_file': 1, 'too_short': 3, 'undecodable': 1}" in proc.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o666 & ~umask  # others may read it


def test_async_vllm_streams_clips(checkpoint, clips):
    """The serving path: SpeechLM's clip prompts streamed through its AsyncVllmEngine (the native
    model) give the same greedy tokens as the transformers engine, and the deltas add up to the text."""
    import asyncio

    from blsp_ray.engines import AsyncVllmEngine, GenerationSettings
    from blsp_ray.speech_lm import SpeechLM

    settings = GenerationSettings(max_new_tokens=12)
    cfg = GenerateConfig(engine="transformers", batch_size=4)
    reference = SpeechLM.from_checkpoint(str(checkpoint), cfg, settings)
    waves = [load_audio(c["audio"]) for c in clips[:3]]
    expected = [g.token_ids for g in reference.generate(waves, INSTRUCTION)]
    streaming = SpeechLM.from_checkpoint(str(checkpoint), cfg.model_copy(update={"engine": "vllm"}), settings, streaming=True)
    prompts = streaming.clip_prompts(waves, [INSTRUCTION] * len(waves))
    engine = streaming.engine
    assert isinstance(engine, AsyncVllmEngine) and streaming.max_context == cfg.vllm_max_model_len

    async def one(e):
        deltas, final = [], None
        async for delta, done in engine.stream(e, settings):
            deltas.append(delta)
            final = done or final
        return "".join(deltas), final

    async def all_at_once():
        return await asyncio.gather(*(one(p) for p in prompts))  # concurrent requests, one engine

    try:
        results = asyncio.run(all_at_once())
    finally:
        engine.shutdown()
    eos = reference.tokenizer.eos_token_id
    assert [[t for t in final.token_ids if t != eos] for _, final in results] == expected
    assert all(text == final.text for text, final in results)
    assert all(final.prompt_tokens > len(p.token_ids) for (_, final), p in zip(results, prompts))  # speech expanded


def test_streamed_reply_ends_before_its_stop_string(checkpoint, clips):
    """The transformers stream (serving's path) stops at a stop string and never emits any part of
    it; chat requests always stop at the template's turn markers."""
    from blsp_ray.config import ServeConfig
    from blsp_ray.engines import GenerationSettings, cut_at_stop
    from blsp_ray.model.prompts import CHAT_TURN_MARKERS
    from blsp_ray.speech_lm import ChatTurn, SpeechLM
    from serve.schemas import to_chat_request

    assert "".join(cut_at_stop(iter("abc###[Human]:def"), CHAT_TURN_MARKERS)) == "abc"
    assert "".join(cut_at_stop(iter(["ab#", "#x", "yz"]), ("###",))) == "ab##xyz"  # a near-miss is held, then released
    speech_lm = SpeechLM.from_checkpoint(str(checkpoint), GenerateConfig(engine="transformers"), GenerationSettings(max_new_tokens=24))
    embeds = speech_lm.prompt_embeds([ChatTurn(instruction=INSTRUCTION, speech=load_audio(clips[0]["audio"]))])
    full = "".join(speech_lm.stream(embeds))
    assert len(full) > 6, full
    stop = full[3:6]
    pieces = list(speech_lm.stream(embeds, GenerationSettings(max_new_tokens=24, stop=(stop,))))
    assert "".join(pieces) == full[: full.find(stop)]
    req = to_chat_request({"messages": [{"role": "user", "content": "hi"}], "stop": ["END"]}, ServeConfig())
    assert req.sampling.stop == (*CHAT_TURN_MARKERS, "END")
