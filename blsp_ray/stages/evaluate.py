"""Evaluation: WER/CER (jiwer) and BLEU/chrF (sacrebleu) of predictions, and behaviour alignment
of a BLSP checkpoint on held-out clips.

Behaviour alignment asks how close the LM's behaviour given speech is to its behaviour given the
transcript (the BLSP objective). It is ``blsp_ray.heldout``'s, the numbers stage 2 reports while it
trains: ``alignment`` (in ``evaluate.metrics``) is the trained adapter's KL(text || speech) and NLL
on the teacher's continuation, and BLEU/chrF of its greedy continuation against the teacher's;
``evaluate.table_rows`` adds the table of conditions (untrained, trained, shuffled, transcript).
"""

from __future__ import annotations

import json
import time

import ray
import torch

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import BlspRayConfig
from blsp_ray.heldout import HeldoutSet, bootstrap_difference, labelling_settings
from blsp_ray.io.layout import RunLayout, join
from blsp_ray.io.storage import open_output, read_jsonl
from blsp_ray.metrics import text_metrics
from blsp_ray.model.modeling import frozen_dtype
from blsp_ray.runtime import init_ray
from blsp_ray.speech_lm import SpeechLM, local_checkpoint


def heldout_set(cfg: BlspRayConfig, blsp_model: str, rows: list[dict]) -> HeldoutSet:
    """``rows`` (audio + text) ready to score the checkpoint ``blsp_model`` (path or s3:// URI).

    The frozen LM runs in the dtype stage 2 trained the adapter against (``stage2.frozen_lm_dtype``),
    so the table scores what training's held-out metrics score; in bfloat16 (``auto`` on a CPU
    with AVX-512 BF16) its greedy passes run ~1.5x faster than in float32."""
    speech_lm = SpeechLM.from_checkpoint(local_checkpoint(blsp_model, cfg.cluster.s3), cfg.generate.model_copy(update={"engine": "transformers"}),
                                         labelling_settings(cfg))
    lm = speech_lm.model.llama_model
    lm.to(frozen_dtype(cfg.stage2.frozen_lm_dtype, lm.dtype, lm.device))
    return HeldoutSet.from_config(cfg, speech_lm, rows)


def alignment_metrics(held: HeldoutSet) -> dict:
    """The checkpoint's own adapter on ``held``: the table's "trained adapter" row, as metrics."""
    scores = held.alignment(held.blsp.speech_adapter.eval(), "speech")
    return {"alignment_kl": scores["kl"], "alignment_nll": scores["nll"], "alignment_bleu": scores["bleu"],
            "alignment_chrf": scores["chrf"], "alignment_rows": len(held)}


# The held-out table's columns: what each number compares, in the order printed.
TABLE_COLUMNS = {
    "wer": "transcription WER (vs transcript)",
    "transcription_nll": "transcript NLL (nats/token)",
    "nll": "continuation NLL (nats/token, teacher's)",
    "kl": "KL(text‖·) per token",
    "content_word": "continuations sharing a content word with the clip",
    "chrf": "continuation chrF vs teacher's",
}
CELL_FORMATS = {"wer": ".1%", "content_word": ".1%", "chrf": ".1f"}  # the rest: .3f
EXAMPLES = 5


def _condition_difference(a: dict, b: dict, metric: str) -> tuple[float, float, float]:
    """a − b on ``metric`` (wer or nll) over the same clips, with its 95% bootstrap interval."""
    num, den = {"wer": ("word_errors", "words"), "nll": ("continuation_nats", "continuation_tokens")}[metric]
    pa, pb = a["per_clip"], b["per_clip"]
    return bootstrap_difference(pa[num], pa[den], pb[num], pb[den])


def summarize_table(conditions: dict, teacher_content_word: list[bool]) -> dict:
    """What the table says, as numbers: the continuation-NLL gap closed by training, trained minus
    shuffled with bootstrap intervals, and content-word sharing on the clips where the teacher's
    continuation shares one (``teacher_content_word``, per clip)."""
    nll = {k: v["nll"] for k, v in conditions.items()}
    gap = nll["untrained adapter"] - nll["transcript"]
    trained, shuffled = conditions["trained adapter"], conditions["shuffled speech"]
    teacher_clips = [i for i, shared in enumerate(teacher_content_word) if shared]
    summary = {
        "gap_closed": (nll["untrained adapter"] - nll["trained adapter"]) / gap if gap > 0 else float("nan"),
        "trained_minus_shuffled": {m: dict(zip(("difference", "low", "high"), _condition_difference(trained, shuffled, m)))
                                   for m in ("wer", "nll")},
        "teacher_content_word_clips": len(teacher_clips),
    }
    for name, row in conditions.items():
        shares = row["per_clip"]["content_word"]
        row["content_word_where_teacher"] = (sum(1 for i in teacher_clips if shares[i]) / len(teacher_clips)
                                             if teacher_clips else float("nan"))
    return summary


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_table(report: dict) -> str:
    """report.md: the predictions' scores (the generate stage), then the held-out table, its
    summary and examples side by side."""
    lines = [f"Predictions `{report['predictions']}`: {report['scored']} rows scored, {report['skipped']} skipped "
             f"(errors or no reference); each score compares the model's reply with the reference field "
             f"(WER/CER: edits per reference word/character, 0 = exact; BLEU/chrF: 0-100, 100 = exact).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report["metrics"].items()]
    table = report.get("alignment_table")
    if table:
        conditions, s = table["conditions"], table["summary"]
        lines += ["", f"## Held-out speech: {table['rows']} clips, voices and sentences unseen in training", "",
                  "Conditions: what the LM reads where the speech goes. *untrained adapter*: a fresh adapter on the clip; "
                  "*trained adapter*: the checkpoint's on the clip; *shuffled speech*: the checkpoint's on another clip "
                  "(does the adapter carry this clip?); *transcript*: the transcript's token embeddings (the teacher "
                  "whose continuations stage 2 learns, so the upper bound for continuations; asked to transcribe, the "
                  "untuned LM often answers or goes on instead of repeating the text, so its WER bounds nothing). "
                  "Lower is better for WER, NLL and KL.", "",
                  "| condition | " + " | ".join(TABLE_COLUMNS.values()) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
        for name, row in conditions.items():
            cells = [format(row[k], CELL_FORMATS.get(k, ".3f")) for k in TABLE_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        diff = s["trained_minus_shuffled"]
        lines += ["", f"- Training closed {s['gap_closed']:.0%} of the continuation-NLL gap between the untrained adapter and the transcript.",
                  f"- Trained minus shuffled speech (95% bootstrap interval over clips): transcription WER "
                  f"{diff['wer']['difference']:+.1%} [{diff['wer']['low']:+.1%}, {diff['wer']['high']:+.1%}], "
                  f"continuation NLL {diff['nll']['difference']:+.3f} [{diff['nll']['low']:+.3f}, {diff['nll']['high']:+.3f}] nats/token.",
                  f"- Of the {s['teacher_content_word_clips']} clips whose teacher continuation shares a content word with the clip, "
                  f"the trained adapter's continuation shares one for {conditions['trained adapter']['content_word_where_teacher']:.0%} "
                  f"(untrained {conditions['untrained adapter']['content_word_where_teacher']:.0%}, "
                  f"shuffled {conditions['shuffled speech']['content_word_where_teacher']:.0%}).",
                  "", f"Examples (the first {EXAMPLES} held-out clips, trained adapter):", "",
                  "| transcript | transcription (given the speech) | continuation (given the speech) | teacher's continuation (given the transcript) |",
                  "|---|---|---|---|"]
        for ex in conditions["trained adapter"]["examples"][:EXAMPLES]:
            lines.append("| " + " | ".join(_cell(ex[k]) for k in ("text", "transcription", "continuation", "teacher")) + " |")
    return "\n".join(lines) + "\n"


def alignment_table(cfg: BlspRayConfig, blsp_model: str, rows: list[dict]) -> dict:
    """Held-out rows scored for the untrained adapter (a fresh init), the trained one, the trained one
    fed another clip (shuffled), and the transcript itself (upper bound). See ``blsp_ray.heldout``."""
    held = heldout_set(cfg, blsp_model, rows)
    trained = held.blsp.speech_adapter.eval()
    torch.manual_seed(cfg.stage2.seed)
    untrained = held.blsp.fresh_speech_adapter().eval()
    if cfg.model.match_embedding_scale:  # the init stage 2 started from (build_blsp_from_parts)
        untrained.match_embedding_scale(held.blsp.llama_model)
    conditions = {
        "untrained adapter": held.scores(untrained, "speech"),
        "trained adapter": held.scores(trained, "speech"),
        "shuffled speech": held.scores(trained, "shuffled"),
        "transcript": held.scores(None, "transcript"),
    }
    return {"rows": len(held), "conditions": conditions, "teacher_content_word": held.teacher_content_word,
            "summary": summarize_table(conditions, held.teacher_content_word)}


def run_evaluate(cfg: BlspRayConfig, predictions_file: str, output_dir: str, reference_field: str = "reference",
                 hypothesis_field: str = "response", blsp_model: str | None = None, max_alignment_rows: int = 64) -> dict:
    """Score ``predictions_file`` (jsonl with ``hypothesis_field`` and ``reference_field``); with a
    BLSP checkpoint and ``alignment`` in the metrics, also behaviour alignment on rows with audio +
    ``text``. Writes ``report.json`` and ``report.md`` to ``output_dir``."""
    t0 = time.time()
    rows = read_jsonl(predictions_file, cfg.cluster.s3)
    scored = [r for r in rows if not r.get("error") and isinstance(r.get(hypothesis_field), str) and isinstance(r.get(reference_field), str)]
    with_speech = [r for r in rows if r.get("audio") and r.get("text")]
    metrics = [m for m in cfg.evaluate.metrics if m != "alignment"]
    report = {"predictions": predictions_file, "rows": len(rows), "scored": len(scored), "skipped": len(rows) - len(scored),
              "metrics": text_metrics([r[hypothesis_field] for r in scored], [r[reference_field] for r in scored], metrics) if scored else {}}
    if "alignment" in cfg.evaluate.metrics and blsp_model and with_speech:
        report["metrics"].update(alignment_metrics(heldout_set(cfg, blsp_model, with_speech[:max_alignment_rows])))
    if cfg.evaluate.table_rows and blsp_model:
        init_ray(cfg)  # a task with its own resources (and torch threads), not the job's 0-CPU driver
        table_task = ray.remote(num_cpus=cfg.evaluate.table_cpus, num_gpus=cfg.evaluate.table_gpus)(alignment_table)
        report["alignment_table"] = ray.get(table_task.remote(cfg, blsp_model, with_speech[: cfg.evaluate.table_rows]))
    report["wall_s"] = round(time.time() - t0, 2)
    with open_output(join(output_dir, "report.json"), "w", cfg.cluster.s3) as f:
        f.write(json.dumps(report, indent=2) + "\n")
    with open_output(join(output_dir, "report.md"), "w", cfg.cluster.s3) as f:
        f.write(markdown_table(report))
    print(markdown_table(report), flush=True)
    return report


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
