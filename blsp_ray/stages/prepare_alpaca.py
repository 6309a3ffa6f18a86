"""Alpaca instruction data -> stage-1 jsonl ``{"instruction", "output"}`` in the original release's format.

52k rows fit comfortably in one process; this job needs no Ray.
"""

from __future__ import annotations

import json

from blsp_ray.cli import job_parser, load_job_config
from blsp_ray.config import S3Config
from blsp_ray.drops import DropReason, RowDropped
from blsp_ray.io.layout import RunLayout
from blsp_ray.io.shards import Summary
from blsp_ray.io.storage import open_input, open_output
from blsp_ray.text import alpaca_instruction, strip_nonprintable


def summary_path(output: str) -> str:
    return output.rsplit(".", 1)[0] + ".summary.json"


def alpaca_row(rec) -> dict:
    """An Alpaca record -> a stage-1 row; RowDropped if it cannot be one."""
    if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) or not isinstance(rec.get("output"), str):
        raise RowDropped(DropReason.BAD_ROW, "needs string `instruction` and `output`")
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        raise RowDropped(DropReason.BAD_ROW, "`input` is not a string")
    instruction = alpaca_instruction(rec["instruction"], rec.get("input") or "")
    output = strip_nonprintable(rec["output"]).strip()
    if not instruction or not output:
        raise RowDropped(DropReason.NO_TEXT, "empty instruction or output")
    return {"instruction": instruction, "output": output}


def prepare_alpaca(alpaca_json: str, output: str, s3: S3Config | None = None) -> dict:
    """Write the stage-1 jsonl and its summary (``<output stem>.summary.json``); returns the summary."""
    with open_input(alpaca_json, s3) as f:
        try:
            records = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{alpaca_json}: not a UTF-8 JSON file: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{alpaca_json}: expected a JSON list of {{instruction, input, output}}")
    summary = Summary()
    with open_output(output, "w", s3) as out:
        for i, rec in enumerate(records):
            try:
                row = alpaca_row(rec)
            except RowDropped as err:
                summary.drop(err, f"{alpaca_json}: record {i + 1}")
                continue
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.kept += 1
    return summary.report("prepare_alpaca", summary_path(output), {"input": alpaca_json, "output": output}, s3)


# ---- entry point: jobs/prepare_alpaca.py ----


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--output", help="jsonl to write (default: the run's stage-1 data)")
    args = parser.parse_args()
    cfg = load_job_config(args)
    if not cfg.data.alpaca_json:
        raise SystemExit("config has no data.alpaca_json: nothing to prepare")
    prepare_alpaca(cfg.data.alpaca_json, args.output or RunLayout.of(cfg).stage1_data, cfg.cluster.s3)
