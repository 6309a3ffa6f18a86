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


# English function words: sharing one of these with a clip says nothing about having heard it.
FUNCTION_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves one s t
""".split())


def content_words(text: str) -> set[str]:
    """The text's normalised words (Whisper's English normaliser) that are not function words."""
    return {w for w in normalize_english(text).split() if w not in FUNCTION_WORDS}
