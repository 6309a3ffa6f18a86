"""The multi-turn chat prompt (blsp_ray.speech_lm) and request validation (serve.schemas), without Ray."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from blsp_ray.config import ServeConfig
from blsp_ray.engines import GenerationSettings
from blsp_ray.model.prompts import CHAT_TURN_MARKERS
from blsp_ray.model.modeling import build_blsp_from_parts
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.speech_lm import ChatTurn, SpeechLM
from serve.schemas import ApiError, to_chat_request


@pytest.fixture(scope="module")
def chat(tiny_assets):
    torch.manual_seed(0)
    model = build_blsp_from_parts(tiny_assets / "lm", tiny_assets / "whisper", adapter_inner_dim=32)
    return SpeechLM(model, BlspProcessor.from_paths(tiny_assets / "lm", tiny_assets / "whisper"))


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_single_speech_turn_is_the_stage2_prompt(chat):
    """One turn with speech embeds exactly like stage 2's [prefix | speech | suffix] prompt."""
    instruction, wav = "Please transcribe the following audio.", tone(1.0)
    got = chat.prompt_embeds([ChatTurn(instruction, wav)])
    proc, model = chat.processor, chat.model
    batch = proc.collate_speech([proc.speech_prompt(instruction)], [wav])
    with torch.no_grad():
        embeds, mask, _ = model.splice(batch["prefix_ids"], batch["prefix_mask"], *model.speech_embeddings(batch["speech"]),
                                       batch["suffix_ids"], batch["suffix_mask"])
    torch.testing.assert_close(got, embeds[0, mask[0].bool()])


def test_multi_turn_layout(chat):
    """Turns follow each other: BOS once, past replies + turn end, speech frames where each turn has them."""
    wav1, wav2 = tone(0.6), tone(1.3)
    turns = [ChatTurn("First?", wav1, reply="An answer."), ChatTurn("Second, text only."), ChatTurn("Third?", wav2)]
    got = chat.prompt_embeds(turns, header="System says hi.\n")
    tok, embed = chat.tokenizer, chat.model.llama_model.get_input_embeddings()
    with torch.no_grad():
        # Encoded as one batch, as the chat does (a clip's last mel frames depend on its padding).
        (s1, s2), (n1, n2) = chat.model.speech_embeddings(chat.processor.features([wav1, wav2]))
        ids = lambda text, bos=False: embed(torch.tensor(tok(text, add_special_tokens=bos)["input_ids"]))  # noqa: E731
        expected = torch.cat([
            ids("System says hi.\n###[Human]:First?", bos=True), s1[:n1], ids("\n\n\n###[Assistant]:An answer.\n\n\n"),
            ids("###[Human]:Second, text only."), ids("\n\n\n###[Assistant]:"),
            ids("###[Human]:Third?"), s2[:n2], ids("\n\n\n###[Assistant]:"),
        ])
    torch.testing.assert_close(got, expected)


def test_stream_greedy_matches_generate_and_stops_on_cancel(chat):
    import threading

    embeds = chat.prompt_embeds([ChatTurn("Say something.", tone(0.5))])
    stream = chat.stream(embeds, GenerationSettings(max_new_tokens=12))
    text = "".join(stream)
    with torch.no_grad():
        ids = chat.model.llama_model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                                              max_new_tokens=12, do_sample=False, pad_token_id=chat.processor.pad_id)[0]
    assert text == chat.tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.prompt_tokens == embeds.shape[0] and 0 < stream.completion_tokens <= 12
    cancel = threading.Event()
    cancel.set()  # cancelled before it starts: at most one token
    stopped = chat.stream(embeds, GenerationSettings(max_new_tokens=12), cancel)
    list(stopped)
    assert stopped.completion_tokens <= 1


def wav_b64(seconds: float, rate: int = 16000, channels: int = 1) -> str:
    buf = io.BytesIO()
    samples = np.stack([tone(seconds, rate)] * channels, 1) if channels > 1 else tone(seconds, rate)
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def test_request_to_turns_resamples_and_keeps_history():
    cfg = ServeConfig(max_new_tokens=16, system_prompt="Default header.\n")
    req = to_chat_request({
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav_b64(1.0, 44100, 2), "format": "wav"}},
                                         {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A tone."}]},
            {"role": "user", "content": "Louder?"},
        ],
        "max_tokens": 8, "temperature": 0.5,
    }, cfg)
    assert req.header == "Default header.\n"
    first, second = req.turns
    assert first.instruction == "What is this?" and first.reply == "A tone."
    assert first.speech.dtype == np.float32 and abs(len(first.speech) - 16000) <= 1  # 44.1 kHz stereo -> 16 kHz mono
    assert second.instruction == "Louder?" and second.speech is None and second.reply is None
    assert req.sampling == GenerationSettings(max_new_tokens=8, temperature=0.5, top_p=1.0, seed=cfg.seed, stop=CHAT_TURN_MARKERS)


@pytest.mark.parametrize(
    "messages, code",
    [
        ([{"role": "assistant", "content": "hi"}], "invalid_messages"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "invalid_messages"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "user", "content": "b"}], "invalid_messages"),
        ([{"role": "user", "content": []}], "invalid_messages"),
        ([{"role": "tool", "content": "x"}], "invalid_request"),
    ],
)
def test_bad_conversations(messages, code):
    with pytest.raises(ApiError) as err:
        to_chat_request({"messages": messages}, ServeConfig())
    assert err.value.status == 400 and err.value.code == code


@pytest.mark.parametrize("serve_yaml, run_config", [("configs/serve-tiny.yaml", "configs/tiny.yaml"), ("configs/serve-blsp-7b.yaml", "configs/blsp-7b.yaml")])
def test_serve_config_builds_the_app_from_our_config(serve_yaml, run_config):
    """`serve run/deploy <serve yaml>` builds the app through app_builder from our run config."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from blsp_ray.config import load_config
    from serve.app import app_builder

    repo = Path(__file__).resolve().parents[1]
    schema = ServeDeploySchema.model_validate(yaml.safe_load((repo / serve_yaml).read_text()))
    (spec,) = schema.applications
    assert spec.import_path == "serve.app:app_builder" and spec.args["config"] == run_config
    cfg = load_config(repo / run_config).serve
    ingress = app_builder({**spec.args, "config": str(repo / run_config)})._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert (ingress.name, engine.name) == ("ChatIngress", "BlspEngine")
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests)
    assert engine.ray_actor_options["num_gpus"] == cfg.gpus_per_replica
