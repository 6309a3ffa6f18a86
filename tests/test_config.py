from pathlib import Path

import pytest

from blsp_ray.config import ConfigError, load_config

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
    assert cfg.label.engine_dtype(cfg.model) == "bfloat16"  # mini labels in bf16
    assert cfg.generate.engine_dtype(cfg.model) == cfg.model.dtype == "float32"
