#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py), from a fresh checkout, in under 8 minutes on one
# GPU:  bash bench/gpu_check.sh [gpu_check.py options, e.g. --parts exactness,attention]
#
# Set-up: the first Python that imports a torch which sees a GPU, among $PYTHON, .venv/bin/python
# and python3 (GPU machines usually carry their own CUDA build of torch; the project's pinned
# torch==2.13.0 is a CPU wheel here). If none does and pip can reach a registry, it makes .venv
# from requirements.txt with torch pinned as the Makefile does (pip then takes PyPI's default
# CUDA build of that version). Packages the chosen Python lacks are installed from wheels in
# .whl/ when that folder exists (machines without a network), else from the registry. It prints
# which Python and torch it used.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

has_cuda_torch() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null && has_cuda_torch "$candidate"
    then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no Python here imports a torch that sees a GPU; trying a new .venv (needs a registry)"
    python3 -m venv .venv && .venv/bin/python -m pip install -q -r requirements.txt \
        && PY=.venv/bin/python
    if [ -z "$PY" ] || ! has_cuda_torch "$PY"; then
        echo "set-up failed: no CUDA torch; running the CPU path instead"
        PY=${PY:-python3}
    fi
fi

NEEDED="transformers safetensors tokenizers jinja2 tqdm"
missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in '$NEEDED'.split() if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "installing missing packages: $missing"
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/infinillm-site .whl/*.whl \
            && export PYTHONPATH="/tmp/infinillm-site:${PYTHONPATH:-}"
    else
        "$PY" -m pip install -q $(for m in $missing; do grep -i "^$m==" requirements.txt \
            || echo "$m"; done)
    fi
fi

export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" -c "
import sys, torch
print(f'python {sys.executable} {sys.version.split()[0]}; torch {torch.__version__} '
      f'(CUDA build {torch.version.cuda}, GPU: '
      f'{torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})')"
# The parts time-box themselves (about 7 minutes in all); this is the backstop.
exec timeout 450 "$PY" -m bench.gpu_check "$@"
