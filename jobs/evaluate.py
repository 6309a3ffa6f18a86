"""Evaluate generation outputs: WER/CER, BLEU/chrF against references, and (with --blsp_model) (``blsp_ray.stages.evaluate``)."""

from blsp_ray.stages.evaluate import main

if __name__ == "__main__":
    main()
