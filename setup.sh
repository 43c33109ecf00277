#!/usr/bin/env bash
# Create .venv and install kvnet with its dev extras. torch is installed first and pinned, so that no
# requirement can pull a multi-GB CUDA build (on this kind of machine 2.13.0 is a local CPU wheel).
#
# libp2p 0.8.1 builds fastecdsa from source, which needs a C compiler and the GMP headers. They are
# looked for the way the compiler looks for them (any include path, multiarch included); only when
# the compiler cannot find gmp.h and the install fails without it is the system package manager used,
# and if that is impossible or fails (not root, dpkg locked, ...) this script says what to install.
#   ./setup.sh --check-gmp   only report whether the compiler finds gmp.h (exit 0 if it does)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
CC=${CC:-cc}

have_gmp() {
  command -v "$CC" >/dev/null 2>&1 && echo '#include <gmp.h>' | "$CC" -E - >/dev/null 2>&1
}

what_to_install() {
  cat >&2 <<EOF
setup.sh: $1
  libp2p needs a C compiler and the GMP headers to build fastecdsa. Install them, then run ./setup.sh again:
    Debian/Ubuntu:  sudo apt-get install gcc libgmp-dev
    Fedora/RHEL:    sudo dnf install gcc gmp-devel
    Alpine:         sudo apk add build-base gmp-dev
    macOS:          brew install gmp
EOF
}

install_gmp() {
  # Root only; waits up to 2 minutes for a dpkg lock held by another process instead of failing at once.
  [ "$(id -u)" = 0 ] || return 1
  if command -v apt-get >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=120 update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq libgmp-dev gcc >/dev/null
  elif command -v dnf >/dev/null 2>&1; then
    dnf install -y -q gmp-devel gcc
  elif command -v apk >/dev/null 2>&1; then
    apk add -q build-base gmp-dev
  else
    return 1
  fi
}

install_kvnet() {
  .venv/bin/python -m pip install -q -e '.[dev]'
}

if [ "${1:-}" = "--check-gmp" ]; then
  if have_gmp; then echo "gmp.h: found by $CC"; exit 0; fi
  echo "gmp.h: not found by $CC" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${KVNET_TORCH_VERSION:-2.13.0}"
if have_gmp; then
  install_kvnet
else
  log=$(mktemp)
  # Without the headers the install may still work (a prebuilt fastecdsa wheel, or one already built).
  if install_kvnet 2>"$log"; then
    rm -f "$log"
  else
    echo "setup.sh: $CC cannot find gmp.h and the install failed without it; installing GMP with the system" \
         "package manager" >&2
    if install_gmp && have_gmp; then
      rm -f "$log"
      install_kvnet
    else
      tail -n 5 "$log" >&2
      rm -f "$log"
      what_to_install "could not install the GMP headers (not root, no known package manager, or it failed: is another apt-get or dpkg running?)"
      exit 1
    fi
  fi
fi
echo "kvnet installed in $(pwd)/.venv" >&2
