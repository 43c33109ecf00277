#!/usr/bin/env bash
# Create .venv and install kvnet with its dev extras. torch is installed first and pinned, so that no
# requirement can pull a multi-GB CUDA build (on this kind of machine 2.13.0 is a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${KVNET_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
echo "kvnet installed in $(pwd)/.venv" >&2
