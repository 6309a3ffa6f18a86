"""Throughput and memory of the offline preprocessing (Ray Data, 2 CPUs) on the demo corpus.

Speech comes from ``blsp_ray.demo.speech.synthesize_corpus`` (espeak-ng), labelled with a stand-in
continuation and repeated to ``--rows`` rows. Baseline, measured in the same run on the same rows:
a plain single-process loop over the same shards with the same worker code (``ShardProcessor``),
no Ray. Peak memory: the baseline's max RSS; for Ray, the peak of the summed RSS of the driver and
every process of the cluster (sampled every 0.2 s), and the largest single worker.

    .venv/bin/python benchmarks/preprocess.py --rows 600
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: stay on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from blsp_ray.config import SpeechSynthConfig, TinyAssetsConfig, config_from_dict  # noqa: E402


def make_inputs(work: Path, rows: int, sentences: int) -> tuple[Path, Path]:
    from blsp_ray.demo.assets import build_tiny_assets
    from blsp_ray.demo.speech import synthesize_corpus
    from blsp_ray.io.storage import read_jsonl, write_jsonl

    assets = build_tiny_assets(TinyAssetsConfig(out_dir=str(work / "assets")))
    manifest = synthesize_corpus(SpeechSynthConfig(out_dir=str(work / "speech"), num_sentences=sentences,
                                                   heldout_fraction=0.0))["train"]
    base = read_jsonl(manifest)
    labelled = [{**r, "continuation": f"and so the story of {r['text'].split()[1]} went on."}
                for r in (base * (rows // len(base) + 1))[:rows]]
    out = work / "labelled.jsonl"
    write_jsonl(out, labelled)
    return assets, out


def cfg_for(assets: Path, rows_per_shard: int, address: str | None = None):
    return config_from_dict({
        "cluster": {"address": address, "storage_root": "unused"},
        "model": {"lm_path": str(assets / "lm"), "whisper_path": str(assets / "whisper")},
        "data": {"rows_per_shard": rows_per_shard, "block_rows": 32, "concurrency": 2},
    })


def _baseline(assets: str, manifest: str, out: str, rows_per_shard: int, q) -> None:
    from blsp_ray.io.shards import plan_shards
    from blsp_ray.stages.preprocess import Settings, ShardProcessor

    t0 = time.perf_counter()
    cfg = cfg_for(Path(assets), rows_per_shard)
    worker = ShardProcessor(cfg, Settings.of(cfg, [manifest]), out)
    t_ready = time.perf_counter()
    kept = sum(worker.write_shard(s).kept for s in plan_shards([manifest], rows_per_shard))
    t1 = time.perf_counter()
    q.put({"kept": kept, "wall_s": t1 - t0, "work_s": t1 - t_ready,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_baseline(assets: Path, manifest: Path, out: Path, rows_per_shard: int) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_baseline, args=(str(assets), str(manifest), str(out), rows_per_shard, q))
    p.start()
    res = q.get()
    p.join()
    return res


class RssSampler(threading.Thread):
    """Peak summed RSS of this process and every process whose command line names the cluster's temp dir."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.peak_total, self.peak_single, self.stop_flag = marker, 0, 0, False

    def procs(self):
        me = psutil.Process()
        found = {me}
        for p in psutil.process_iter(["cmdline"]):
            if self.marker in " ".join(p.info["cmdline"] or []):
                found.add(p)
                try:
                    found.update(p.children(recursive=True))
                except psutil.Error:
                    pass
        return found

    def run(self):
        while not self.stop_flag:
            total = 0
            for p in self.procs():
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid != os.getpid():
                    self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(0.2)


def run_ray(assets: Path, manifest: Path, out: Path, rows_per_shard: int) -> dict:
    import ray

    from blsp_ray.runtime import start_local_cluster
    from blsp_ray.stages.preprocess import preprocess

    cluster = start_local_cluster(num_cpus=2)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        sampler = RssSampler(str(cluster.temp_dir))
        sampler.start()
        t0 = time.perf_counter()
        summary = preprocess(cfg_for(assets, rows_per_shard, cluster.address), [str(manifest)], str(out))
        wall = time.perf_counter() - t0
        sampler.stop_flag = True
        sampler.join()
        steady = (summary["kept"] - rows_per_shard) / (wall - summary["seconds_to_first_shard"])
        return {"kept": summary["kept"], "wall_s": wall, "steady_rows_s": steady, "peak_total_rss_mib": sampler.peak_total / 2**20,
                "peak_worker_rss_mib": sampler.peak_single / 2**20}
    finally:
        ray.shutdown()
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--sentences", type=int, default=60, help="distinct spoken sentences (repeated to --rows)")
    ap.add_argument("--rows-per-shard", type=int, default=50)
    ap.add_argument("--work-dir", default=None, help="keep inputs here (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    assets, manifest = make_inputs(work, args.rows, args.sentences)
    for out in ("out-baseline", "out-ray"):  # a kept work dir must not turn the runs into resumes
        shutil.rmtree(work / out, ignore_errors=True)
    audio_s = sum(json.loads(line)["duration"] for line in manifest.read_text().splitlines())
    print(f"corpus: {args.rows} rows, {audio_s / 60:.1f} min of 16 kHz speech, {args.rows_per_shard} rows/shard, "
          f"{os.cpu_count()} CPUs on the machine", flush=True)

    base = run_baseline(assets, manifest, work / "out-baseline", args.rows_per_shard)
    ray_res = run_ray(assets, manifest, work / "out-ray", args.rows_per_shard)
    assert base["kept"] == ray_res["kept"] == args.rows, (base, ray_res)
    print(f"baseline (1 process, no Ray): {args.rows / base['wall_s']:.1f} rows/s wall incl. start "
          f"({args.rows / base['work_s']:.1f} rows/s after the tokenizer loaded), {base['wall_s']:.1f}s, "
          f"peak RSS {base['peak_rss_mib']:.0f} MiB")
    print(f"Ray Data (2 CPUs, 2 workers):  {args.rows / ray_res['wall_s']:.1f} rows/s wall incl. worker start "
          f"({ray_res['steady_rows_s']:.1f} rows/s after the first shard), "
          f"{ray_res['wall_s']:.1f}s, peak RSS driver+cluster {ray_res['peak_total_rss_mib']:.0f} MiB, "
          f"largest process {ray_res['peak_worker_rss_mib']:.0f} MiB")
    print(f"speed-up over baseline: {base['wall_s'] / ray_res['wall_s']:.2f}x wall, "
          f"{ray_res['steady_rows_s'] * base['work_s'] / args.rows:.2f}x after start-up")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
