#!/usr/bin/env bash
# Create .venv and install kvnet with its dev extras. torch is installed first and pinned, so that no
# requirement can pull a multi-GB CUDA build (on this kind of machine 2.13.0 is a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# libp2p 0.8.1 builds fastecdsa from source, which needs gcc and the GMP headers.
if ! ls /usr/include/gmp.h /usr/include/*/gmp.h >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgmp-dev gcc >/dev/null
  else
    echo "setup.sh: libp2p needs the GMP headers: install libgmp-dev (Debian/Ubuntu) or gmp-devel" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${KVNET_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[dev]'
echo "kvnet installed in $(pwd)/.venv" >&2
