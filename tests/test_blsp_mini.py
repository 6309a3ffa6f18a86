"""BLSP-mini, reduced: the pipeline on real small weights (SmolLM2-135M-Instruct + Whisper tiny.en)
learns speech -> behaviour on held-out voices: the trained adapter beats the untrained one and the
shuffled-speech control on the teacher's continuations.

Same config, stages and code as ``make demo CONFIG=configs/mini.yaml``, on fewer sentences and steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blsp_ray.config import load_config
from blsp_ray.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trained_adapter_beats_untrained_and_shuffled_on_heldout_voices(ray_cluster, tmp_path):
    cfg = load_config(REPO / "configs" / "mini.yaml", [
        f"cluster.address={ray_cluster.dashboard_url}",
        f"cluster.storage_root={tmp_path / 'runs'}",
        f"pretrained.out_dir={tmp_path / 'assets'}",
        f"model.lm_path={tmp_path / 'assets' / 'lm'}",
        f"model.whisper_path={tmp_path / 'assets' / 'whisper'}",
        f"speech.out_dir={tmp_path / 'speech'}",
        f"data.asr_manifests=[{tmp_path / 'speech' / 'train.jsonl'}]",
        "speech.num_sentences=400",
        "speech.heldout_fraction=0.08",
        "stage2.max_steps=40",
        "stage2.warmup_steps=5",
        "stage2.log_every=10",
        "stage2.save_every=40",
        "stage2.eval_rows=8",
        "evaluate.table_rows=24",
    ])
    run_pipeline(cfg)
    report = json.loads((tmp_path / "runs" / "mini" / "evaluate" / "report.json").read_text())
    table = report["alignment_table"]["conditions"]
    nll = {name: row["nll"] for name, row in table.items()}
    assert nll["trained adapter"] < nll["untrained adapter"], table
    assert nll["trained adapter"] < nll["shuffled speech"], table
    assert nll["transcript"] < nll["trained adapter"], table  # the upper bound stays above what speech reaches
    history = json.loads((tmp_path / "runs" / "mini" / "stage2" / "model" / "train_metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "heldout_nll" in h] == [10, 20, 30, 40]
