#!/usr/bin/env bash
# The GPU check of extraction at scale, prepared for a session lent a device machine (run from the repository root,
# with the machine's own python3 and torch; nothing is installed). About 10 minutes on one H200:
#   device run:  bash benchmarks/gpu/extract.sh
# Results (gpu-extract.json / .md) go to $OUT when set (the device tool brings that folder back), else to
# benchmarks/results/. Commit them with the device named in the file.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/gpu/extract.py --out "${OUT:-benchmarks/results}" "$@"
