import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from blsp_ray.config import (
    CONTINUATION_INSTRUCTION,
    TRANSCRIPTION_INSTRUCTION,
    BlspRayConfig,
    ConfigError,
    GenerateConfig,
    LabelConfig,
    ServeConfig,
    Stage2Config,
    config_from_dict,
    is_path_type,
    load_config,
    resolve_paths,
)
from blsp_ray.model import prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny.yaml", "blsp-7b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.lm_path
    assert cfg.stage2.instruction.startswith("Continue the following text")


def test_paper_config_is_the_paper_setup():
    cfg = load_config(REPO / "configs" / "blsp-7b.yaml")
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == 8
    assert (cfg.stage2.lr, cfg.stage2.weight_decay, cfg.stage2.warmup_steps) == (5e-5, 0.05, 1000)
    assert (cfg.stage2.micro_batch_size, cfg.stage2.grad_accum_steps, cfg.stage2.zero_stage) == (8, 12, 1)
    assert cfg.stage2.precision == "bf16" and cfg.label.engine == "vllm"
    # The paper's recipe: continuations only, every adapter position read by the LM.
    assert cfg.stage2.transcription_share == 0 and cfg.stage2.alignment_steps == 0 and cfg.model.speech_positions == "all"


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_its_path(tmp_path):
    p = _write(tmp_path, "model: {lm_path: a, whisper_path: b}\nstage2:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: stage2\.lrr: unknown key"):
        load_config(p)


def test_bad_value_names_its_path(tmp_path):
    p = _write(tmp_path, "model: {lm_path: a, whisper_path: b}\nstage1:\n  zero_stage: 5\n")
    with pytest.raises(ConfigError, match=r"stage1\.zero_stage"):
        load_config(p)
    p = _write(tmp_path, "model: {lm_path: a, whisper_path: b, conv_kernel_sizes: '5,x'}\n")
    with pytest.raises(ConfigError, match=r"model: .*conv_kernel_sizes"):
        load_config(p)


def test_missing_required_and_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(_write(tmp_path, "cluster: {num_workers: 2}\n"))
    bad = "model: {lm_path: a, whisper_path: b}\nlabel: {min_replicas: 3, max_replicas: 2}\n"
    with pytest.raises(ConfigError, match=r"label: .*min_replicas"):
        load_config(_write(tmp_path, bad))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))


def test_overrides(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["stage2.lr=0.5", "cluster.storage_root=s3://b/p"])
    assert cfg.stage2.lr == 0.5 and cfg.cluster.storage_root == "s3://b/p"
    with pytest.raises(ConfigError, match="stage2.nope: unknown key"):
        load_config(REPO / "configs" / "tiny.yaml", ["stage2.nope=1"])


def test_engine_dtype_defaults_to_the_model_dtype():
    cfg = load_config(REPO / "configs" / "mini.yaml")
    assert cfg.label.engine_dtype(cfg.model) == "auto"  # bf16 where the replica's CPU multiplies it, else float32
    assert cfg.generate.engine_dtype(cfg.model) == cfg.model.dtype == "float32"


def test_only_typed_paths_are_made_absolute(tmp_path):
    """Bug: every string with a "/" in label/generate/serve was taken for a path."""
    cfg = config_from_dict({
        "cluster": {"storage_root": "runs", "env_vars": {"SOME_FLAG": "a/b"}, "cluster_file": "configs/cluster.yaml"},
        "model": {"lm_path": "assets/tiny/lm", "whisper_path": "/models/whisper"},
        "data": {"asr_manifests": ["data/a.jsonl", "s3://bucket/b.jsonl"], "gigaspeech_json": "meta/GigaSpeech.json"},
        "label": {"instruction": "Continue and/or extend the text.", "manifests": ["data/train.jsonl"]},
        "generate": {"instruction": "Translate into English/German.", "input_file": "data/heldout.jsonl"},
        "serve": {"system_prompt": "You are a speech/text assistant.\n", "checkpoint": "s3://bucket/run/stage2/model"},
    })
    out = resolve_paths(cfg, tmp_path)
    # Text stays as written.
    assert out.generate.instruction == "Translate into English/German."
    assert out.serve.system_prompt == "You are a speech/text assistant.\n"
    assert out.label.instruction == "Continue and/or extend the text."
    assert out.cluster.env_vars == {"SOME_FLAG": "a/b"}
    assert out.cluster.cluster_file == "configs/cluster.yaml"  # a file of the repository, not a run path
    assert out.data.gigaspeech_json == "meta/GigaSpeech.json"  # relative to gigaspeech_dir
    # Paths become absolute; absolute paths and s3:// URIs stay as they are.
    assert out.cluster.storage_root == str(tmp_path / "runs")
    assert out.model.lm_path == str(tmp_path / "assets/tiny/lm") and out.model.whisper_path == "/models/whisper"
    assert out.data.asr_manifests == [str(tmp_path / "data/a.jsonl"), "s3://bucket/b.jsonl"]
    assert out.label.manifests == [str(tmp_path / "data/train.jsonl")]
    assert out.generate.input_file == str(tmp_path / "data/heldout.jsonl")
    assert out.serve.checkpoint == "s3://bucket/run/stage2/model"
    assert cfg.model.lm_path == "assets/tiny/lm"  # a copy: the input is unchanged
    assert resolve_paths(out, tmp_path / "elsewhere") == out  # idempotent


# Fields named like files that are not run paths, each for a reason.
NOT_RUN_PATHS = {
    "ClusterConfig.cluster_file",  # relative to the repository, read by the cluster launcher
    "PretrainedAssetsConfig.lm_file", "PretrainedAssetsConfig.whisper_file",  # names inside a wheel
    "DataConfig.gigaspeech_json",  # relative to gigaspeech_dir
}


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _sections(arg)


def test_every_path_field_is_typed_as_a_path():
    looks_like_a_path = re.compile(r"(_path|_dir|_file|_json|_root|manifests|_inputs|_output|checkpoint)$")
    untyped = {f"{section.__name__}.{name}" for section in _sections(BlspRayConfig)
               for name, field in section.model_fields.items()
               if looks_like_a_path.search(name) and not is_path_type(field.annotation, field.metadata)}
    assert untyped == NOT_RUN_PATHS


@pytest.mark.parametrize("key, value, hint", [
    ("stage2.ctc_weight", "0.1", r"use stage2\.alignment_weight"),
    ("stage2.alignment_loss", "vocab", r"CTC over the LM's vocabulary"),
    ("data.sample_rate", "16000", r"16 kHz"),
    ("cluster.dashboard_host", "127.0.0.1", r"nothing read it"),
    ("serve.batch_size", "8", r"batches concurrent requests itself"),
    ("serve.stop", "['###']", r"turn markers"),
    ("serve.resources_per_replica", "{GPU: 1}", r"ray_actor_options"),
    ("serve.vllm_multiprocessing", "true", r"own process"),
])
def test_a_removed_key_says_what_replaces_it(tmp_path, key, value, hint):
    section, leaf = key.split(".")
    p = _write(tmp_path, f"model: {{lm_path: a, whisper_path: b}}\n{section}:\n  {leaf}: {value}\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml: {re.escape(key)}: removed; .*{hint}"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"tiny\.yaml: {re.escape(key)}: removed"):
        load_config(REPO / "configs" / "tiny.yaml", [f"{key}={value}"])


def test_serve_has_only_what_serving_reads():
    fields = set(ServeConfig.model_fields)
    assert not fields & {"stop", "batch_size", "resources_per_replica", "vllm_multiprocessing"}
    assert {"engine", "max_new_tokens", "min_replicas", "gpus_per_replica", "vllm_max_model_len", "system_prompt"} <= fields


def test_the_continuation_instruction_is_defined_once():
    assert LabelConfig().instruction is Stage2Config().instruction is CONTINUATION_INSTRUCTION
    assert prompts.CONTINUATION_INSTRUCTION is CONTINUATION_INSTRUCTION


def test_the_transcription_instruction_is_defined_once():
    assert GenerateConfig().instruction is Stage2Config().transcription_instruction is TRANSCRIPTION_INSTRUCTION
