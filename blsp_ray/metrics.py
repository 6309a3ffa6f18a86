"""Text metrics: WER/CER (jiwer), BLEU/chrF (sacrebleu), word recall."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import jiwer
import sacrebleu

from blsp_ray.text import normalize_english


def text_metrics(hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str] = ("wer", "cer", "bleu", "chrf")) -> dict:
    """Corpus-level scores: WER/CER as fractions (0 = perfect), BLEU/chrF on sacrebleu's 0-100 scale."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    hyps, refs = list(hypotheses), list(references)
    out = {}
    if "wer" in metrics:
        out["wer"] = float(jiwer.wer(refs, hyps))
    if "cer" in metrics:
        out["cer"] = float(jiwer.cer(refs, hyps))
    if "bleu" in metrics:
        out["bleu"] = float(sacrebleu.corpus_bleu(hyps, [refs]).score)
    if "chrf" in metrics:
        out["chrf"] = float(sacrebleu.corpus_chrf(hyps, [refs]).score)
    return out


def word_recall(hypothesis: str, reference: str) -> float:
    """Share of the reference's words (normalised, with multiplicity) that the hypothesis contains."""
    ref, hyp = Counter(normalize_english(reference).split()), Counter(normalize_english(hypothesis).split())
    total = sum(ref.values())
    return sum(min(n, hyp[w]) for w, n in ref.items()) / total if total else 0.0
