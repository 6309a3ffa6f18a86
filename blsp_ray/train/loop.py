"""The one training loop (Ray Train + DeepSpeed) behind stage 1 and stage 2, and its driver.

Driver (``run_training``): builds the task's Ray Data dataset, a ``TorchTrainer`` with elastic
scaling, failure retries and checkpoint storage under the run directory, then publishes the final
Hugging Face export to the stage's place in ``RunLayout``.

Workers (``train_loop_per_worker``): ``deepspeed.initialize`` on the task's trainable module,
length-bucketed micro-batches from the Ray Data shard, ``ray.train.report`` every ``log_every``
steps, and a checkpoint (HF export + DeepSpeed state + loop state) every ``save_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn

from blsp_ray.config import BlspRayConfig, TrainConfig, resolve_paths
from blsp_ray.io.layout import COMPLETE, RunLayout, join
from blsp_ray.io.storage import atomic_dir, filesystem, is_s3
from blsp_ray.model.modeling import to_device
from blsp_ray.train.batching import bucketed_batches
from blsp_ray.train.deepspeed_config import deepspeed_config, lr_schedule

if TYPE_CHECKING:
    import ray.data
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"  # DeepSpeed state inside a Ray checkpoint (one merged dir, every rank's files)
EXPORT_DIR = "hf"  # Hugging Face-layout export inside a Ray checkpoint
STATE_FILE = "train_state.json"  # loop position + loss history
LOSS_CURVE = "loss_curve.png"
BUCKET_POOL = 16  # micro-batches pooled for length bucketing


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own learning-rate warm-up and decay (``WarmupDecay``)."""

    start: int  # the optimiser step it begins at; the last phase's steps come on top of the step budget
    lr_scale: float  # its peak learning rate as a multiple of ``train.lr``
    name: str  # what is trained, with which loss: its legend in ``loss_curve.png``


@runtime_checkable
class Task(Protocol):
    """What the loop needs from a stage (``Stage1Task``, ``Stage2Task``).

    The driver builds one from the config for ``dataset()`` and the step budget; every Ray Train
    worker builds its own from the same config for the rest, so nothing heavy is pickled.
    """

    def __init__(self, cfg: BlspRayConfig) -> None: ...

    @property
    def name(self) -> str:
        """The stage's name: its directory in ``RunLayout`` and its checkpoints' prefix."""

    @property
    def train(self) -> TrainConfig:
        """The stage's training settings (its config section)."""

    @property
    def export_target(self) -> str:
        """Where the final export is published (a path or ``s3://`` URI)."""

    @property
    def phases(self) -> list[Phase]:
        """The training phases in order, the first at step 0 (one phase for most stages)."""

    # -- driver side --

    def dataset(self) -> tuple[ray.data.Dataset, int]:
        """The training rows, with a ``length`` column for bucketing, and how many there are: counted
        without a pass over the rows where the source can tell (a corpus-scale stage 2 would read
        every waveform once only to count them)."""

    # -- worker side --

    def build(self, dtype: torch.dtype) -> nn.Module:
        """The module DeepSpeed trains (anything frozen the loss needs stays on the task)."""

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """One micro-batch of rows -> CPU tensors."""

    def loss(self, engine: DeepSpeedEngine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss": what backpropagates, other parts: reported as loss_<name>}``."""

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens in a micro-batch, for throughput."""

    def export(self, engine: DeepSpeedEngine, out_dir: Path, rank: int) -> None:
        """Write the Hugging Face-layout export; every rank calls it (collective under ZeRO-3)."""

    def load_export(self, hf_dir: Path) -> None:
        """Weights from an earlier export (resuming on a different number of workers)."""

    def heldout_metrics(self, engine: DeepSpeedEngine) -> dict[str, float]:
        """Rank 0, at every report: ``heldout_*`` metrics (``{}``: none)."""


@dataclass
class TrainResult:
    export_dir: str  # where the final HF checkpoint was published (RunLayout)
    checkpoint_path: str  # the last Ray checkpoint in storage
    metrics: dict  # the last report of rank 0
    history: list[dict] = field(default_factory=list)  # every report of rank 0


# ---- worker side -------------------------------------------------------------------------------


def _micro_batches_per_epoch(rows_per_worker: int, micro_batch_size: int, pool: int = BUCKET_POOL) -> int:
    """What ``bucketed_batches`` yields for ``rows_per_worker`` rows (full pools, then the rest)."""
    per_pool = micro_batch_size * pool
    full, rest = divmod(rows_per_worker, per_pool)
    return full * pool + math.ceil(rest / micro_batch_size)


def _micro_batch_seed(seed: int, epoch: int, micro_in_epoch: int, rank: int) -> int:
    """The torch seed of one micro-batch of one worker: a function of its place in the data only."""
    return int(np.random.SeedSequence([seed, epoch, micro_in_epoch, rank]).generate_state(1)[0])


def _torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _plot_loss(history: list[dict], path: Path, title: str, phases: list[Phase]) -> None:
    """Training loss over steps, one line per phase (their losses differ, so no line joins them),
    the phase boundaries marked; beside it the held-out metrics, when the task reported any."""
    heldout = sorted({k for h in history for k in h if k.startswith("heldout_")})
    fig = Figure(figsize=(11 if heldout else 6, 4))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(1, 2 if heldout else 1, squeeze=False)
    ax = axes[0][0]
    bounds = [p.start for p in phases] + [float("inf")]
    for start, end, name in zip(bounds, bounds[1:], [p.name for p in phases]):
        points = [(h["step"], h["loss"]) for h in history if start < h["step"] <= end]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
        if start > 0:
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per phase)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    if heldout:
        ax = axes[0][1]
        for key in heldout:
            points = [(h["step"], h[key]) for h in history if key in h]
            ax.plot(*zip(*points), marker="o", label=key.removeprefix("heldout_"))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
        ax.set_title("held-out speech")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def full_state_dict(engine: DeepSpeedEngine, rank: int) -> dict[str, torch.Tensor] | None:
    """The trained module's whole state dict on CPU for rank 0 (None elsewhere); collective under ZeRO-3.

    Under ZeRO-3 each module's own parameters are gathered in turn (public
    ``deepspeed.zero.GatheredParameters``), so no rank ever holds more than one layer gathered.
    Below ZeRO-3 every rank already holds the full weights: None tells the caller to save its module.
    """
    if engine.zero_optimization_stage() != 3:
        return None
    import deepspeed  # lazy, as in train_loop_per_worker: importing it picks the accelerator

    state: dict[str, torch.Tensor] = {}
    for prefix, module in engine.module.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
            if rank == 0:
                for name, p in own.items():
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    if rank != 0:
        return None
    for name, tensor in engine.module.state_dict().items():  # the persistent buffers: never partitioned
        state.setdefault(name, tensor.detach().cpu().clone())
    return state


def skip_shared_memory_allreduce_build(deepspeed) -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op.

    ``TorchBackend`` JIT-compiles that op with the machine's C++ compiler whenever its build cache
    misses (a fresh machine or venv): 24 s of both CPUs here, inside the first training run. Only
    ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference) calls it; training's collectives
    go through torch.distributed. Marking it incompatible in DeepSpeed's op table skips the build.
    That table, ``deepspeed.ops.__compatible_ops__``, is DeepSpeed-internal (pinned deepspeed==0.19.8,
    whose ``ops/__init__.py`` computes it once and keeps edits to it); a release without it falls
    back to building the op, as before.
    """
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[ShareMemCommBuilder.NAME] = False


def train_loop_per_worker(loop: dict) -> None:
    """Runs in every Ray Train worker; ``loop`` carries the config dict and the run's step budget."""
    use_gpu = loop["use_gpu"]
    cfg = BlspRayConfig.model_validate(loop["cfg"])
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Denormal floats take the CPU's slow path: an adapter driven there (mini's alignment warm-up with a
        # one-step learning-rate ramp to 3e-3) made every step 4x slower. Flushed to zero, they cost nothing,
        # and no value above 1e-38 changes. Set in this thread, the one that trains, before torch's
        # intra-op threads exist, which inherit it.
        torch.set_flush_denormal(True)
        if cfg.cluster.threads_per_worker:
            torch.set_num_threads(cfg.cluster.threads_per_worker)
    import deepspeed  # here, not at the top: DeepSpeed picks its accelerator at import and must see DS_ACCELERATOR first

    if not use_gpu:
        skip_shared_memory_allreduce_build(deepspeed)

    task: Task = loop["task"](cfg)
    train = task.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    total_steps = loop["total_steps"]
    torch.manual_seed(train.seed)

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray Train's process group
    module = task.build(_torch_dtype(train.precision))
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=trainable,  # frozen weights get no optimiser state
        config=deepspeed_config(train, world),
        lr_scheduler=lr_schedule([p.start for p in task.phases], total_steps, train.warmup_steps, [p.lr_scale for p in task.phases]),
    )

    # ---- resume ----
    state = {"epoch": 0, "micro_in_epoch": 0, "history": [], "world_size": world}
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt_dir = Path(ckpt_dir)
            state = json.loads((ckpt_dir / STATE_FILE).read_text())
            if state["world_size"] == world:
                engine.load_checkpoint(str(ckpt_dir / DEEPSPEED_DIR), tag=state["tag"])
            else:
                # Elastic resize: DeepSpeed's partitioned state belongs to the old world size; take
                # the weights from the HF export, a fresh optimiser, and the schedule's position.
                log.warning("resuming %d-worker checkpoint on %d workers: optimizer state restarts",
                            state["world_size"], world)
                task.load_export(ckpt_dir / EXPORT_DIR)
                engine.global_steps = state["step"]
                scheduler.last_epoch = state["step"] - 1
                scheduler.step()  # the schedule at the resumed step
        resumed_from = state["step"]
        if rank == 0:
            log.info("%s: resumed from step %d", task.name, resumed_from)
    history: list[dict] = state["history"]

    shard = ray.train.get_dataset_shard("train")
    inject = loop.get("inject_failure")
    step = engine.global_steps
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}
    window_parts: dict[str, float] = {}
    epoch = state["epoch"]
    skip = state["micro_in_epoch"]
    engine.train()
    while step < total_steps and epoch < loop["max_epochs"]:
        micro_in_epoch = 0
        batches = bucketed_batches(shard, train.micro_batch_size, BUCKET_POOL, "length", seed=train.seed + 1000 * epoch + rank)
        for rows in batches:
            micro_in_epoch += 1
            if micro_in_epoch <= skip:  # consumed before the checkpoint we resumed from
                continue
            batch = to_device(task.collate(rows), engine.device)  # collated on the CPU
            # The loss's random draws (dropout, sampled negatives) depend on where the micro-batch sits
            # in the data, not on how many ran in this process: a resumed run draws what the
            # uninterrupted one drew.
            torch.manual_seed(_micro_batch_seed(train.seed, epoch, micro_in_epoch, rank))
            out = task.loss(engine, batch)
            engine.backward(out["loss"])
            engine.step()
            window["loss"] += float(out["loss"].detach())
            for k, v in out.items():
                if k != "loss":
                    window_parts[k] = window_parts.get(k, 0.0) + float(v.detach())
            window["micro"] += 1
            window["tokens"] += task.count_tokens(batch)
            window["samples"] += len(rows)
            if engine.global_steps == step:
                continue  # inside a gradient-accumulation cycle
            step = engine.global_steps
            if inject and step == inject["step"] and rank == inject["rank"] % world and not Path(inject["marker"]).exists():
                Path(inject["marker"]).touch()
                raise RuntimeError(f"injected failure at step {step} on rank {rank}")
            last = step >= total_steps
            save = step % train.save_every == 0 or last
            if not (save or step % train.log_every == 0):
                continue
            # ---- report (a barrier: every worker gets here at the same step) ----
            elapsed = time.perf_counter() - window["t0"]
            part_names = sorted(window_parts)
            sums = _all_reduce([window["loss"], window["micro"], window["tokens"], window["samples"]]
                               + [window_parts[k] for k in part_names])
            peak = _all_reduce([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], op="max")[0]
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": sums[0] / max(sums[1], 1),
                "lr": float(engine.get_lr()[0]),
                "tokens_per_s": sums[2] / elapsed,
                "samples_per_s": sums[3] / elapsed,
                "peak_rss_gib": peak,  # per worker, the largest
                "world_size": world,
                "torch_threads": torch.get_num_threads(),  # per worker (rank 0's): cluster.threads_per_worker
                "resumed_from": resumed_from,
            }
            for k, v in zip(part_names, sums[4:]):
                metrics[f"loss_{k}"] = v / max(sums[1], 1)
            if rank == 0:
                metrics.update(task.heldout_metrics(engine))
            history.append({"step": step, **{k: v for k, v in metrics.items() if k == "loss" or k.startswith(("loss_", "heldout_"))}})
            window = {"loss": 0.0, "micro": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}
            window_parts = {}
            if not save:
                ray.train.report(metrics)
                continue
            with tempfile.TemporaryDirectory(prefix=f"{task.name}-ckpt-") as tmp:
                tmp = Path(tmp)
                tag = f"step{step}"
                engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=tag)
                task.export(engine, tmp / EXPORT_DIR, rank)
                if rank == 0:
                    loop_state = {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch, "tag": tag,
                                  "world_size": world, "history": history, "metrics": metrics}
                    (tmp / STATE_FILE).write_text(json.dumps(loop_state, indent=2))
                    if last:
                        _plot_loss(history, tmp / EXPORT_DIR / LOSS_CURVE, f"{task.name} training loss", task.phases)
                        (tmp / EXPORT_DIR / "train_metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                                 checkpoint_dir_name=f"checkpoint_{step:07d}")
            if last:
                break
        epoch += 1
        skip = 0


# ---- driver side -------------------------------------------------------------------------------


def publish_export(cfg: BlspRayConfig, checkpoint, target: str) -> str:
    """Copy the checkpoint's HF export to ``target`` (local: one atomic rename; S3: objects, then a marker)."""
    src_fs, src = checkpoint.filesystem, join(checkpoint.path, EXPORT_DIR)
    dst_fs, dst = filesystem(target, cfg.cluster.s3)
    if not is_s3(target):
        with atomic_dir(dst) as tmp:
            pafs.copy_files(src, str(tmp), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
        Path(dst, COMPLETE).touch()
    else:
        dst_fs.delete_dir_contents(dst, missing_dir_ok=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        with dst_fs.open_output_stream(join(dst, COMPLETE)) as f:
            f.write(b"")
    return target


@contextlib.contextmanager
def _rows_in_order() -> Iterator[None]:
    """Datasets made inside (Ray Data copies the current context into each) keep their rows in order.

    Ray Data otherwise passes blocks on as their tasks finish, so the order of a dataset's rows,
    and with it which rows each training worker gets, varies between runs: a resumed run would skip
    a different prefix than the one it trained on. In order, both are a function of the input files
    alone (in-order output can hold a finished block back behind a slower one).
    """
    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def _ordered_ingest() -> DataConfig:
    """Ray Train's ingest, in order (``_rows_in_order``): each worker's rows and their order are the
    same in every run and every epoch."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def run_training(cfg: BlspRayConfig, task_cls: type[Task], inject_failure: dict | None = None) -> TrainResult:
    """Train the stage ``task_cls`` describes (a ``Task``) on the connected Ray cluster and publish its export.

    ``inject_failure`` ({"step", "rank", "marker"}) makes one worker raise once at that step:
    the fault-tolerance test's lost worker.
    """
    cfg = resolve_paths(cfg, Path.cwd())  # Ray workers run in another directory
    task = task_cls(cfg)
    if not isinstance(task, Task):  # fail on the driver, not in every worker
        missing = [m for m in dir(Task) if not m.startswith("_") and not hasattr(task, m)]
        raise TypeError(f"{task_cls.__name__} is not a training Task: it lacks {missing}")
    stage = task.name
    train = task.train
    with _rows_in_order():
        dataset, rows = task.dataset()
    max_workers = cfg.cluster.num_workers
    if rows < max_workers:
        raise ValueError(f"{stage}: {rows} training rows for {max_workers} workers")
    micro_per_epoch = _micro_batches_per_epoch(rows // max_workers, train.micro_batch_size)
    steps_per_epoch = max(micro_per_epoch // train.grad_accum_steps, 1)
    if train.max_steps is not None:
        total_steps, max_epochs = train.max_steps, 10**9  # cycle the data until the step budget is spent
    else:
        total_steps, max_epochs = steps_per_epoch * train.epochs, train.epochs
    extra = task.phases[-1].start  # stage 2's alignment warm-up comes on top of the objective's steps
    total_steps, max_epochs = total_steps + extra, max_epochs + -(-extra // steps_per_epoch)
    log.info("%s: %d rows, %d workers, %d steps/epoch, %d steps", stage, rows, max_workers, steps_per_epoch, total_steps)

    workers = max_workers if cfg.cluster.min_workers is None else (cfg.cluster.min_workers, max_workers)
    storage = join(RunLayout.of(cfg).stage(stage), "ray")  # Ray Train checkpoints (local or s3://)
    storage_fs, storage_path = filesystem(storage, cfg.cluster.s3) if is_s3(storage) else (None, storage)
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "task": task_cls,  # pickled by reference: each worker builds it from the config
            "total_steps": total_steps,
            "max_epochs": max_epochs,
            "use_gpu": cfg.cluster.use_gpu,
            "inject_failure": inject_failure,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.cluster.use_gpu, resources_per_worker=dict(cfg.cluster.resources_per_worker)
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.cluster.run_id,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=_ordered_ingest(),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training ended without a checkpoint")
    export = publish_export(cfg, result.checkpoint, task.export_target)
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    log.info("%s: done, final metrics %s; exported to %s", stage, result.metrics, export)
    return TrainResult(export, f"{result.checkpoint.path}", dict(result.metrics or {}), history)
