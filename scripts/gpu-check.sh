#!/bin/bash
# The GPU suite (tests/test_gpu.py, `pytest -m gpu`) on a machine with an NVIDIA GPU and a
# CUDA build of torch but no network: installs the harness and the pure-Python
# dependencies that machine lacks from .whl/ (downloaded beforehand, see
# docs/replay.md, "On a GPU"), then runs the suite. Logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 4
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 4
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT/gpu.txt"
PYTHONUNBUFFERED=1 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
    | tee "$OUT/pytest-gpu.log"
exit "${PIPESTATUS[0]}"
