"""Every benchmark, one at a time (run it on a quiet machine), as one table: what is measured, ours,
the baseline measured in the same run, their ratio, the goal, pass/fail. Written as JSON too.

    .venv/bin/python benchmarks/run_all.py --config configs/mini.yaml --out runs/bench.json   # make bench

Each benchmark is its own process (its last stdout line is its JSON result); its full output goes
to the terminal as it runs. The models of ``--config`` are built first if missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str]) -> dict:
    """Run ``benchmarks/<script>`` with ``args``; its final JSON line."""
    print(f"\n==> {script} {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.strip():
            last = line
    if proc.wait() != 0:
        raise SystemExit(f"{script} failed ({proc.returncode})")
    return json.loads(last)


def row(name: str, ours: float, baseline: float, unit: str, goal: float | None) -> dict:
    ratio = ours / baseline
    return {"name": name, "unit": unit, "ours": round(ours, 2), "baseline": round(baseline, 2), "ratio": round(ratio, 3),
            "goal": goal, "pass": None if goal is None else ratio >= goal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mini.yaml")
    p.add_argument("--label-rows", type=int, default=2850, help="the demo's labelling size")
    p.add_argument("--out", default="runs/bench.json")
    args = p.parse_args()
    from blsp_ray.config import load_config

    cfg = load_config(REPO / args.config)
    if not Path(cfg.model.lm_path).exists():
        subprocess.run([sys.executable, "-m", "jobs.build_assets", "--config", args.config], cwd=REPO, check=True)
    t0 = time.time()
    label = run("label_throughput.py", ["--config", args.config, "--rows", str(args.label_rows), "--max-new-tokens", "24",
                                        "--job-batch-size", "64", "--hf-rows", "256"])
    step = run("stage2_step.py", ["--config", args.config, "--batch", "8", "--steps", "6"])
    load = run("serve_load.py", ["--config", args.config, "--concurrency", "1,4,8,16"])
    r, sps = label["results"], step["samples_per_s"]
    at8 = {engine: next(x for x in rows if x["concurrency"] == 8) for engine, rows in load["results"].items()}
    table = [
        row("label: Ray Data + vLLM job (engine start incl.) vs bare vLLM, same prompts", r["ray_data_vllm_job"]["tokens_per_s"],
            r["bare_vllm"]["tokens_per_s"], "tokens/s", 0.9),
        row("label: bare vLLM vs the original's batch-8 transformers generate", r["bare_vllm"]["tokens_per_s"],
            r["transformers"]["tokens_per_s"], "tokens/s", None),
        row(f"stage 2 step: ours as configured (real-length, cached encoder, frozen LM {step['frozen_lm_dtype']}) vs "
            "original-faithful (30 s, encoder every step, float32)", sps["ours_configured"], sps["original"], "samples/s", 3.0),
        row("stage 2 step: ours, float32 (real-length, cached encoder) vs original-faithful", sps["ours_cached"], sps["original"],
            "samples/s", None),
        row("stage 2 step: ours (real-length, encoder every step) vs original-faithful", sps["ours"], sps["original"], "samples/s", None),
        row(f"serving, 8 concurrent chats, one replica, {load['dtype']}: native vLLM BLSP vs transformers (p95 {at8['native']['p95_s']:.2f} s vs "
            f"{at8['transformers']['p95_s']:.2f} s)", at8["native"]["req_s"], at8["transformers"]["req_s"], "req/s", 5.0),
        row(f"serving, 8 concurrent chats, one replica, {load['dtype']}: native vLLM BLSP vs vLLM prompt_embeds (p95 {at8['native']['p95_s']:.2f} s vs "
            f"{at8['prompt_embeds']['p95_s']:.2f} s)", at8["native"]["req_s"], at8["prompt_embeds"]["req_s"], "req/s", 1.0),
    ]
    report = {"config": args.config, "wall_s": round(time.time() - t0, 1), "table": table,
              "engine_start_s": r["bare_vllm"]["engine_start_s"], "stage2_loss": step["loss"],
              "raw": {"label": label, "stage2": step, "serve_load": load}}
    print(f"\n{'benchmark':<112} {'ours':>9} {'baseline':>9} {'ratio':>6} {'goal':>6}  pass")
    for t in table:
        goal = f">={t['goal']}" if t["goal"] is not None else "-"
        verdict = {True: "yes", False: "NO", None: "-"}[t["pass"]]
        print(f"{t['name'][:112]:<112} {t['ours']:>9.2f} {t['baseline']:>9.2f} {t['ratio']:>6.2f} {goal:>6}  {verdict}   ({t['unit']})")
    first = step["first_loss"]
    print(f"stage 2 loss of the first step (same weights): ours float32 {first['ours_cached']:.4f}, as configured "
          f"{first['ours_configured']:.4f}")
    print(f"stage 2 loss after {step['steps'] + 1} steps: original {step['loss']['original']:.4f}, ours {step['loss']['ours']:.4f}, "
          f"ours cached {step['loss']['ours_cached']:.4f}, as configured {step['loss']['ours_configured']:.4f}")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"serving checkpoint: {load['checkpoint']} ({load['checkpoint_is']}), {load['clips']}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
