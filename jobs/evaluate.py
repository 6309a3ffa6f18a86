"""Evaluate generation outputs: WER/CER, BLEU/chrF against references, and (with --blsp_model)
behaviour alignment between speech- and transcript-conditioned continuations.

    python -m jobs.evaluate --config configs/tiny.yaml --predictions out.jsonl [--reference_field text] \
        [--blsp_model runs/tiny/stage2/model] [--output_dir runs/tiny/evaluate]
"""

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.evaluation import run_evaluate
from blsp_ray.layout import RunLayout


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


if __name__ == "__main__":
    main()
