#!/usr/bin/env bash
# hla — the Python package on a GPU machine: builds the extension against that machine's torch (with
# libhla's CUDA backend) and runs the pytest suite, which then also covers the CUDA backend and, where
# transformers is installed, the layers against transformers' own modules. Log under $OUT.
# If pytest is missing there, a folder of pure-Python wheels' contents can be passed as PYDEPS.
set -u -o pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-python/build}
mkdir -p "$LOG"
python3 -c "import pytest" 2>/dev/null || export PYTHONPATH="${PYDEPS:-$PWD/.pydeps}:${PYTHONPATH:-}"
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'python', sys.version.split()[0])"
python3 -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null || echo "transformers: not installed"
echo "== build"
(cd python && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace) > "$LOG/python-build.log" 2>&1 \
    || { tail -40 "$LOG/python-build.log"; exit 1; }
echo "== pytest"
(cd python && python3 -m pytest -q -p no:cacheprovider -rs tests) 2>&1 | tee "$LOG/pytest.log" | tail -40
