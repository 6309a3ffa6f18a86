"""Evaluation: WER/CER (jiwer), BLEU/chrF (sacrebleu), and behaviour alignment.

Behaviour alignment asks how close the LM's behaviour given speech is to its behaviour given the
transcript (the BLSP objective):
* BLEU/chrF of the speech-conditioned continuation against the transcript-conditioned one;
* next-token KL(teacher || student) on the reference (transcript-conditioned) continuation,
  teacher = LM reading the transcript, student = LM reading the speech, mean over tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from blsp_ray.config import BlspRayConfig
from blsp_ray.metrics import text_metrics
from blsp_ray.model.prompts import CONTINUATION_INSTRUCTION, continuation_prompt
from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.io.layout import RunLayout


def mean_token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over positions of KL(softmax(teacher/T) || softmax(student/T)); logits [N, V]."""
    from blsp_ray.model.losses import response_kl

    return float(response_kl(student_logits, teacher_logits, temperature)) / temperature**2  # without the loss's T^2


@torch.no_grad()
def continuation_logits(model, processor, waveform: np.ndarray | None, transcript: str, continuation: str,
                        instruction: str = CONTINUATION_INSTRUCTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [N, V] predicting each token of ``continuation`` (+EOS), given the transcript
    (teacher: the text prompt) and given the speech (student: [prefix | speech | suffix])."""
    tok = processor.tokenizer
    target = tok(continuation, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(target)
    text_ids = tok(continuation_prompt(transcript, instruction))["input_ids"] + target
    teacher = model.llama_model(input_ids=torch.tensor([text_ids])).logits[0, -n - 1 : -1]  # [N, V]
    example = processor.speech_prompt(instruction, continuation)
    batch = processor.collate_speech([example], [waveform])
    student = model(prefix_ids=batch["prefix_ids"], prefix_mask=batch["prefix_mask"], suffix_ids=batch["suffix_ids"],
                    suffix_mask=batch["suffix_mask"], speech=batch["speech"]).logits[0, -n - 1 : -1]
    return teacher, student


def alignment_scores(speech_continuations: Sequence[str], text_continuations: Sequence[str], kls: Sequence[float] | None = None) -> dict:
    """BLEU/chrF of speech-conditioned against transcript-conditioned continuations, and mean KL."""
    scores = text_metrics(speech_continuations, text_continuations, ("bleu", "chrf"))
    out = {"alignment_bleu": scores["bleu"], "alignment_chrf": scores["chrf"]}
    if kls:
        out["alignment_kl"] = float(np.mean(kls))
    return out


TABLE_COLUMNS = {"nll": "NLL (nats/token)", "kl": "KL(text‖·)", "chrf": "chrF vs text cont.", "bleu": "BLEU vs text cont.",
                 "wer": "WER (transcribe)", "word_recall": "word recall"}


def markdown_table(report: dict) -> str:
    rows = [(k, v) for k, v in report["metrics"].items()]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    table = report.get("alignment_table")
    if table:
        lines += ["", f"Held-out alignment ({table['rows']} clips of held-out voices); "
                  f"NLL gap closed by training: {table['gap_closed']:.1%}", "",
                  "| condition | " + " | ".join(TABLE_COLUMNS.values()) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
        for name, scores in table["conditions"].items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def alignment_table(cfg: BlspRayConfig, blsp_model: str, rows: list[dict]) -> dict:
    """Held-out rows scored for the untrained adapter (a fresh init), the trained one, the trained one
    fed another clip (shuffled), and the transcript itself (upper bound). See ``blsp_ray.heldout``."""
    import copy

    from blsp_ray.heldout import HeldoutSet
    from blsp_ray.model.audio import load_audio
    from blsp_ray.engines import GenerationSettings
    from blsp_ray.stages.generate import SpeechGenerator, local_checkpoint
    from blsp_ray.model.modeling import embedding_rms
    from blsp_ray.stages.stage2 import AdapterModule

    generator = SpeechGenerator(local_checkpoint(blsp_model, cfg.cluster.s3), cfg.generate.model_copy(update={"engine": "transformers"}))
    held = HeldoutSet(generator.model, generator.processor, rows, [load_audio(r["audio"]) for r in rows],
                      GenerationSettings.from_config(cfg.label), cfg.generate.batch_size, cfg.stage2.instruction)
    trained = AdapterModule(generator.model).eval()
    untrained = copy.deepcopy(trained)
    torch.manual_seed(cfg.stage2.seed)
    for module in untrained.modules():
        if module is not untrained and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if cfg.model.match_embedding_scale:  # the init stage 2 started from (build_blsp_from_parts)
        with torch.no_grad():
            untrained.speech_ln.weight.fill_(embedding_rms(generator.model.llama_model))
    conditions = {
        "untrained adapter": held.scores(untrained, "speech"),
        "trained adapter": held.scores(trained, "speech"),
        "shuffled speech": held.scores(trained, "shuffled"),
        "transcript": held.scores(None, "transcript"),
    }
    nll = {k: v["nll"] for k, v in conditions.items()}
    gap = nll["untrained adapter"] - nll["transcript"]
    return {"rows": len(held), "conditions": conditions,
            "gap_closed": (nll["untrained adapter"] - nll["trained adapter"]) / gap if gap > 0 else float("nan")}


def run_evaluate(cfg: BlspRayConfig, predictions_file: str, output_dir: str, reference_field: str = "reference",
                 hypothesis_field: str = "response", blsp_model: str | None = None, max_alignment_rows: int = 64) -> dict:
    """Score ``predictions_file`` (jsonl with ``hypothesis_field`` and ``reference_field``); with a
    BLSP checkpoint and ``alignment`` in the metrics, also behaviour alignment on rows with audio +
    ``text``. Writes ``report.json`` and ``report.md`` to ``output_dir``."""
    from blsp_ray.io.layout import join
    from blsp_ray.io.storage import open_output, read_jsonl

    t0 = time.time()
    rows = read_jsonl(predictions_file, cfg.cluster.s3)
    scored = [r for r in rows if not r.get("error") and isinstance(r.get(hypothesis_field), str) and isinstance(r.get(reference_field), str)]
    metrics = [m for m in cfg.evaluate.metrics if m != "alignment"]
    report = {"predictions": predictions_file, "rows": len(rows), "scored": len(scored), "skipped": len(rows) - len(scored),
              "metrics": text_metrics([r[hypothesis_field] for r in scored], [r[reference_field] for r in scored], metrics) if scored else {}}
    if "alignment" in cfg.evaluate.metrics and blsp_model:
        report["metrics"].update(behaviour_alignment(cfg, blsp_model, [r for r in rows if r.get("audio") and r.get("text")][:max_alignment_rows]))
    if cfg.evaluate.table_rows and blsp_model:
        import ray

        from blsp_ray.runtime import init_ray

        init_ray(cfg)  # a task with its own resources (and torch threads), not the job's 0-CPU driver
        table_task = ray.remote(num_cpus=cfg.evaluate.table_cpus, num_gpus=cfg.evaluate.table_gpus)(alignment_table)
        table_rows = [r for r in rows if r.get("audio") and r.get("text")][: cfg.evaluate.table_rows]
        report["alignment_table"] = ray.get(table_task.remote(cfg, blsp_model, table_rows))
    report["wall_s"] = round(time.time() - t0, 2)
    with open_output(join(output_dir, "report.json"), "w", cfg.cluster.s3) as f:
        f.write(json.dumps(report, indent=2) + "\n")
    with open_output(join(output_dir, "report.md"), "w", cfg.cluster.s3) as f:
        f.write(markdown_table(report))
    print(markdown_table(report), flush=True)
    return report


def behaviour_alignment(cfg: BlspRayConfig, blsp_model: str, rows: list[dict]) -> dict:
    """Speech- vs transcript-conditioned continuations of the same LM (greedy), and token KL."""
    from blsp_ray.model.audio import load_audio
    from blsp_ray.engines import GenerationSettings, TransformersEngine
    from blsp_ray.stages.generate import SpeechGenerator, local_checkpoint

    if not rows:
        return {}
    gen_cfg = cfg.generate.model_copy(update={"instruction": CONTINUATION_INSTRUCTION})
    generator = SpeechGenerator(local_checkpoint(blsp_model, cfg.cluster.s3), gen_cfg)
    waves = [load_audio(r["audio"]) for r in rows]
    speech_out = [g.text.strip() for g in generator.generate(waves, CONTINUATION_INSTRUCTION)]
    text_engine = TransformersEngine(generator.model.llama_model, generator.tokenizer, GenerationSettings.from_config(gen_cfg), gen_cfg.batch_size)
    text_out = [g.text.strip() for g in text_engine.generate([continuation_prompt(r["text"]) for r in rows])]
    kls = []
    for w, r, ref in zip(waves, rows, text_out):
        teacher, student = continuation_logits(generator.model, generator.processor, w, r["text"], ref)
        kls.append(mean_token_kl(teacher, student))
    return {**alignment_scores(speech_out, text_out, kls), "alignment_rows": len(rows)}


# ---- entry point: jobs/evaluate.py ----


def main() -> None:
    p = job_parser(__doc__)
    p.add_argument("--predictions", required=True, help="jsonl with the hypothesis and reference fields")
    p.add_argument("--reference_field", default="reference")
    p.add_argument("--hypothesis_field", default="response")
    p.add_argument("--blsp_model", default=None, help="checkpoint for behaviour alignment (rows need audio + text)")
    p.add_argument("--output_dir", default=None, help="default: the run's evaluate/ directory")
    args = p.parse_args()
    cfg = load_job_config(args)
    run_evaluate(cfg, args.predictions, args.output_dir or RunLayout.of(cfg).evaluation, args.reference_field,
                 args.hypothesis_field, args.blsp_model)
