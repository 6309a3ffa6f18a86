"""Stage 1 and stage 2 training on the session's local Ray cluster (2 CPU workers, gloo, DeepSpeed).

The two trainings the tests read are the tiny S3 pipeline's (``tiny_s3_run``: stage 1 then stage 2,
each a Ray job, run dir on S3), downloaded; ZeRO-2/3 and the fault test run the library in-process
on the same cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blsp_ray.model.audio import load_audio
from blsp_ray.config import config_from_dict
from blsp_ray.io.layout import COMPLETE, RunLayout
from blsp_ray.model.modeling import ADAPTER_CONFIG, adapter_metadata
from blsp_ray.model.processing import BlspProcessor
from blsp_ray.io.storage import read_jsonl

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Continue the following text in a coherent and engaging style with less than 40 words."


def stage2_config(root: Path, assets: Path, run_id: str, stage2: dict) -> dict:
    """A stage-2 run of its own (the ZeRO tests): ``stage2`` overrides the defaults below."""
    return {
        "cluster": {"storage_root": str(root), "run_id": run_id, "num_workers": 2,
                    # half a CPU each: the 2-CPU test cluster keeps one CPU for Ray Data's read tasks
                    "resources_per_worker": {"CPU": 0.5}},
        "model": {"lm_path": str(assets / "lm"), "whisper_path": str(assets / "whisper"), "adapter_inner_dim": 32},
        "stage2": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4, "zero_stage": 1, "max_failures": 1, **stage2},
    }


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


@pytest.fixture(scope="module")
def trained_run(tiny_s3_run, run_root):
    """The S3 run downloaded as a local run dir. Its stage-2 adapter names the stage-1 LM by its S3
    URI (test_stage2_trains_only_adapter checks that on S3); the local copy names the local stage-1
    LM, so the checkpoint loads here without S3."""
    layout = RunLayout(str(tiny_s3_run.download(run_root / "s3-run")))
    meta = adapter_metadata(layout.stage2_model)
    (Path(layout.stage2_model) / ADAPTER_CONFIG).write_text(json.dumps({**meta, "lm_path": layout.stage1_model}))
    return tiny_s3_run, layout


def _history(export: str) -> list[dict]:
    return json.loads((Path(export) / "train_metrics.json").read_text())["history"]


def test_stage1_trains_lm_and_exports(trained_run, tiny_assets):
    from transformers import AutoTokenizer, LlamaForCausalLM

    run, layout = trained_run
    stage1 = run.cfg.stage1
    export = Path(layout.stage1_model)
    assert (export / COMPLETE).exists() and (export / "loss_curve.png").stat().st_size > 1000
    history = _history(export)
    assert [h["step"] for h in history] == list(range(stage1.log_every, stage1.max_steps + 1, stage1.log_every))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    metrics = json.loads((export / "train_metrics.json").read_text())
    assert metrics["step"] == stage1.max_steps and metrics["tokens_per_s"] > 0 and metrics["samples_per_s"] > 0
    trained = LlamaForCausalLM.from_pretrained(export)
    base = LlamaForCausalLM.from_pretrained(tiny_assets / "lm")
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) == len(base.state_dict())  # full fine-tuning: every tensor moved
    assert AutoTokenizer.from_pretrained(export).eos_token == "</s>"


def test_stage2_trains_only_adapter(trained_run):
    from blsp_ray.model.modeling import build_blsp_from_parts
    from blsp_ray.stages.stage2 import FROZEN_DIGEST, frozen_digest

    run, layout = trained_run
    export = Path(layout.stage2_model)
    assert (export / COMPLETE).exists() and (export / "loss_curve.png").exists()
    history = _history(export)
    assert history[-1]["loss"] < history[0]["loss"], history
    on_s3 = json.loads(run.read("stage2/model/blsp_adapter.json"))
    assert on_s3["lm_path"] == f"s3://{run.bucket}/{run.prefix}stage1/model"  # stage 2 started from stage 1
    # The workers' encoder + LM at the end of training, hashed, equal the checkpoints on disk.
    meta = adapter_metadata(export)
    fresh = build_blsp_from_parts(**meta)
    assert json.loads((export / FROZEN_DIGEST).read_text()) == frozen_digest(fresh)
    from safetensors.torch import load_file

    trained = load_file(export / "adapter.safetensors")
    torch.manual_seed(0)  # the workers' seed: the adapter they started from
    start = build_blsp_from_parts(**meta).adapter_state_dict()
    assert set(trained) == set(start)
    assert all(not torch.equal(trained[k], start[k]) for k in trained)


def test_stage2_checkpoint_gives_same_logits_in_another_process(trained_run, speech_corpus, tmp_path):
    """load_blsp(export) in a fresh process == the adapter in the DeepSpeed state training left."""
    from blsp_ray.model.modeling import build_blsp_from_parts

    run, layout = trained_run
    ckpts = sorted(p for p in Path(layout.stage("stage2"), "ray", run.cfg.cluster.run_id).glob("checkpoint_*") if p.is_dir())
    ds_dir = ckpts[-1] / "deepspeed"
    tag = (ds_dir / "latest").read_text().strip()
    module_state = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    meta = adapter_metadata(layout.stage2_model)
    model = build_blsp_from_parts(**meta).eval()
    missing, unexpected = model.load_state_dict(module_state, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("subsampler.", "adapter.", "speech_ln."))]
    row = read_jsonl(speech_corpus["heldout"])[0]
    proc = BlspProcessor.from_paths(layout.stage1_model, meta["whisper_path"])
    batch = proc.collate_speech([proc.speech_prompt(INSTRUCTION, row["text"])], [load_audio(row["audio"])])
    with torch.no_grad():
        expected = model(**batch).logits
    script = (
        "import sys, torch; from blsp_ray.model.modeling import load_blsp; from blsp_ray.model.processing import BlspProcessor;"
        "from blsp_ray.model.audio import load_audio; m = load_blsp(sys.argv[1]).eval();"
        "p = BlspProcessor.from_paths(sys.argv[2], sys.argv[3]);"
        f"b = p.collate_speech([p.speech_prompt({INSTRUCTION!r}, sys.argv[4])], [load_audio(sys.argv[5])]);"
        "torch.save(m(**b).logits.detach(), sys.argv[6])"
    )
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(layout.stage2_model), layout.stage1_model,
                    str(meta["whisper_path"]), row["text"], row["audio"], str(out)], check=True, cwd=REPO)
    assert torch.equal(torch.load(out), expected)


@pytest.mark.parametrize(("zero_stage", "objective"), [(2, "ce+kl"), pytest.param(3, "ce", marks=pytest.mark.slow)])
def test_zero_stages(trained_run, run_root, tiny_assets, speech_corpus, zero_stage, objective):
    """ZeRO 2 and 3 (the pipeline ran ZeRO 1) on stage 2, on the pipeline's preprocessed shards:
    train and export the adapter. ZeRO 2 also runs ce+kl, from cached encoder outputs, after a
    2-step token-alignment warm-up, with held-out metrics at every report; ZeRO 3 keeps the
    alignment on as an auxiliary loss, without a warm-up."""
    from blsp_ray.stages.stage2 import Stage2Task
    from blsp_ray.train.loop import run_training

    _, layout = trained_run
    run_id = f"zero{zero_stage}"
    target = RunLayout(str(run_root / run_id))
    shutil.copytree(layout.stage("preprocess"), target.stage("preprocess"))
    stage2 = {"zero_stage": zero_stage, "objective": objective, "max_steps": 4, "log_every": 2, "save_every": 4}
    if zero_stage == 2:
        stage2.update(cache_encoder_outputs=True, eval_rows=3, continuation_tokens=4, alignment_steps=2)
    else:
        stage2.update(alignment_weight=0.5)
    config = stage2_config(run_root, tiny_assets, run_id, stage2)
    config["generate"] = {"input_file": str(speech_corpus["heldout"])}  # the held-out clips eval_rows reads
    if zero_stage == 2:
        config["cluster"]["threads_per_worker"] = 2  # each half-CPU worker computes on 2 threads

    result = run_training(config_from_dict(config), Stage2Task)
    steps = 6 if zero_stage == 2 else 4  # the alignment warm-up comes on top of max_steps
    assert result.metrics["step"] == steps and np.isfinite(result.metrics["loss"])
    assert result.metrics["torch_threads"] == (2 if zero_stage == 2 else 1)  # else Ray's default: its CPUs, at least 1
    if objective == "ce+kl":
        assert result.metrics["loss_kl"] > 0
        assert result.metrics["loss"] == pytest.approx(result.metrics["loss_ce"] + result.metrics["loss_kl"], rel=1e-5)
    else:  # ce + 0.5 x alignment
        m = result.metrics
        assert m["loss_alignment"] > 0
        assert m["loss"] == pytest.approx(m["loss_ce"] + 0.5 * m["loss_alignment"], rel=1e-5)
    if zero_stage == 2:
        history = _history(result.export_dir)
        assert [h["step"] for h in history] == [2, 4, 6]
        assert all(np.isfinite(h["heldout_nll"]) and h["heldout_kl"] > 0 for h in history), history
        by_step = {h["step"]: h for h in history}
        assert by_step[2]["loss_alignment"] > 0 and by_step[2]["loss"] == pytest.approx(by_step[2]["loss_alignment"])
        assert "loss_alignment" not in by_step[6] and by_step[6]["loss_kl"] > 0  # the objective's steps
    assert (Path(result.export_dir) / "adapter.safetensors").exists()
    # DeepSpeed's CPU backend did not compile its shared-memory all-reduce op (inference-only; 24 s of
    # both CPUs on a fresh machine): no DeepSpeed training of this session has built a C++ op.
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("deepspeed_shm_comm*")), os.environ["TORCH_EXTENSIONS_DIR"]


def test_fault_resumes_from_last_checkpoint(trained_run, run_root):
    """Stage 1 as the pipeline ran it (same config, seed and data), here with a worker that raises
    one step after the first checkpoint: the run resumes from that checkpoint and ends at the same
    step count, with the losses of the pipeline's uninterrupted run."""
    from blsp_ray.stages.stage1 import Stage1Task
    from blsp_ray.train.loop import run_training

    run, layout = trained_run
    data = run.cfg.model_dump(mode="json")
    data["cluster"].update(storage_root=str(run_root), run_id="fault")
    cfg = config_from_dict(data)
    stage1_data = Path(RunLayout.of(cfg).stage1_data)
    stage1_data.parent.mkdir(parents=True)
    shutil.copy(layout.stage1_data, stage1_data)
    stage1 = cfg.stage1
    marker = run_root / "fault-injected"
    result = run_training(cfg, Stage1Task, inject_failure={"step": stage1.save_every + 1, "rank": 1, "marker": str(marker)})
    assert marker.exists()  # the failure happened
    uninterrupted = json.loads((Path(layout.stage1_model) / "train_metrics.json").read_text())
    assert result.metrics["step"] == uninterrupted["step"] == stage1.max_steps
    assert result.metrics["resumed_from"] == stage1.save_every
    resumed = _history(result.export_dir)
    # history restored from the checkpoint, no step twice
    assert [h["step"] for h in resumed] == list(range(stage1.log_every, stage1.max_steps + 1, stage1.log_every))
    # Same weights, optimiser state, LR position, data order and RNG after the resume: the same losses.
    # The tolerance leaves room for float reduction order only (the runs agree to ~1e-7 in practice).
    expected = {h["step"]: h["loss"] for h in uninterrupted["history"]}
    after = [h for h in resumed if h["step"] > stage1.save_every]
    assert after and [h["loss"] for h in after] == pytest.approx([expected[h["step"]] for h in after], rel=1e-4), (resumed, uninterrupted["history"])


def test_full_state_dict_gathers_zero3_weights(tmp_path):
    """Stage 1's ZeRO-3 export: every weight of the unpartitioned model, gathered layer by layer."""
    port = str(29500 + os.getpid() % 400)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "zero3_state_dict_probe.py"), port],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["partitioned_numel"] == 0  # the weights really were partitioned
    assert report["missing"] == [] and report["extra"] == []
    assert report["max_abs_diff"] == 0.0
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("deepspeed_shm_comm*"))  # nothing compiled
