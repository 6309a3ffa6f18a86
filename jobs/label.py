"""Continuation labelling (the original release's continue_writing): the stage-1 LM continues every ASR transcript with vLLM on Ray Data.

Submit with ``ray job submit -- python -m jobs.label --config configs/X.yaml``; the code is ``blsp_ray.stages.label``.
"""

from blsp_ray.stages.label import main

if __name__ == "__main__":
    main()
