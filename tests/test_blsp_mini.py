"""BLSP-mini, reduced (issue 9): the pipeline on real small weights (SmolLM2-135M-Instruct + Whisper
tiny.en) learns speech -> behaviour that carries the clip: on held-out voices and sentences the
trained adapter beats the untrained one and the shuffled-speech control on transcribing the clip
and on the teacher's continuations.

Same config, stages and code as ``make demo CONFIG=configs/mini.yaml``, on fewer sentences and steps,
with every clip learning its transcript (the demo: half of them a continuation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blsp_ray.config import load_config
from blsp_ray.model.audio import load_audio
from blsp_ray.speech_lm import SpeechLM
from blsp_ray.stages.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the whole reduced pipeline: about 5.5 min on 2 CPUs; the suite's limit is 15
def test_trained_adapter_beats_untrained_and_shuffled_on_heldout_voices(ray_cluster, mini_assets, tmp_path):
    cfg = load_config(REPO / "configs" / "mini.yaml", [
        f"cluster.address={ray_cluster.dashboard_url}",
        f"cluster.storage_root={tmp_path / 'runs'}",
        f"pretrained.out_dir={mini_assets}",  # the session's conversion: the assets stage finds it done
        f"model.lm_path={mini_assets / 'lm'}",
        f"model.whisper_path={mini_assets / 'whisper'}",
        f"speech.out_dir={tmp_path / 'speech'}",
        f"data.asr_manifests=[{tmp_path / 'speech' / 'train.jsonl'}]",
        "speech.num_sentences=1200",
        "speech.heldout_fraction=0.02",  # 24 held-out clips: the table's rows, all generated
        # Every clip learns its transcript: no continuation is labelled (the label stage is skipped;
        # tests/test_pipeline_s3.py runs it in a whole pipeline, tests/test_label.py on its own).
        "stage2.transcription_share=1.0",
        "label.max_new_tokens=16",  # the teacher's continuations the held-out table scores
        "generate.max_new_tokens=16",
        "stage2.alignment_steps=300",
        "stage2.max_steps=30",
        "stage2.warmup_steps=10",
        "stage2.log_every=110",
        "stage2.save_every=330",
        "stage2.eval_rows=8",
        "evaluate.table_rows=24",
    ])
    run_pipeline(cfg)
    report = json.loads((tmp_path / "runs" / "mini" / "evaluate" / "report.json").read_text())
    table = report["alignment_table"]["conditions"]
    nll = {name: row["nll"] for name, row in table.items()}
    assert nll["trained adapter"] < nll["untrained adapter"], table
    assert nll["trained adapter"] < nll["shuffled speech"], table  # the adapter carries this clip, not a generic shape
    assert nll["transcript"] < nll["trained adapter"], table  # the upper bound stays above what speech reaches
    # It hears: asked to transcribe, the trained adapter's words are the clip's, clearly more than
    # the untrained adapter's or another clip's (WER: word errors per transcript word).
    wer = {name: row["wer"] for name, row in table.items()}
    assert wer["trained adapter"] < wer["untrained adapter"] - 0.2, wer
    assert wer["trained adapter"] < wer["shuffled speech"], wer
    heard = {name: row["transcription_nll"] for name, row in table.items()}
    assert heard["trained adapter"] < heard["shuffled speech"] - 0.1, heard
    history = json.loads((tmp_path / "runs" / "mini" / "stage2" / "model" / "train_metrics.json").read_text())["history"]
    assert [h["step"] for h in history if "heldout_nll" in h] == [110, 220, 330]
    # The generate stage ran the trained checkpoint as vLLM's native BLSP model (mini's generate.engine):
    # its greedy replies are those of the transformers path reading BlspModel's spliced embeddings.
    generated = [json.loads(line) for line in (tmp_path / "runs" / "mini" / "generate" / "heldout.jsonl").read_text().splitlines()][:6]
    reference = SpeechLM.from_checkpoint(str(tmp_path / "runs" / "mini" / "stage2" / "model"),
                                         cfg.generate.model_copy(update={"engine": "transformers"}))
    expected = [g.text.strip() for g in reference.generate([load_audio(r["audio"]) for r in generated], cfg.generate.instruction)]
    assert [r["response"] for r in generated] == expected
