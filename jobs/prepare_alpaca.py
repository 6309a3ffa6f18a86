"""Alpaca instruction data (data.alpaca_json) -> the stage-1 jsonl of the run (RunLayout.stage1_data). (``blsp_ray.stages.prepare_alpaca``)."""

from blsp_ray.stages.prepare_alpaca import main

if __name__ == "__main__":
    main()
