"""Evaluate generation outputs: WER/CER and BLEU/chrF against references; with --blsp_model, the held-out behaviour-alignment table.

Submit with ``ray job submit -- python -m jobs.evaluate --config configs/X.yaml``; the code is ``blsp_ray.stages.evaluate``.
"""

from blsp_ray.stages.evaluate import main

if __name__ == "__main__":
    main()
