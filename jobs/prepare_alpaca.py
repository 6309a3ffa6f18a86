"""Alpaca instruction data (data.alpaca_json) -> the run's stage-1 jsonl (RunLayout.stage1_data).

Submit with ``ray job submit -- python -m jobs.prepare_alpaca --config configs/X.yaml``; the code is ``blsp_ray.stages.prepare_alpaca``.
"""

from blsp_ray.stages.prepare_alpaca import main

if __name__ == "__main__":
    main()
