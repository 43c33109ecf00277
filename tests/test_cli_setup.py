"""setup.sh finds the GMP headers the way the compiler does, wherever its include path puts them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_gmp(cc: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "setup.sh"), "--check-gmp"], capture_output=True, text=True,
                          env={**os.environ, "CC": cc}, timeout=60)


def _wrapper(tmp: Path, name: str, include: Path) -> str:
    """A compiler that searches only `include`: stands for any layout (multiarch, /opt, a prefix)."""
    script = tmp / name
    script.write_text(f'#!/bin/sh\nexec cc -nostdinc -I "{include}" "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: setup.sh cannot build fastecdsa either")
def test_gmp_is_found_where_the_compiler_looks_and_nowhere_else(tmp_path):
    odd = tmp_path / "opt" / "gmp" / "include"  # not /usr/include nor /usr/include/*/
    odd.mkdir(parents=True)
    (odd / "gmp.h").write_text("/* a stand-in gmp.h */\n")
    found = _check_gmp(_wrapper(tmp_path, "cc-odd", odd))
    assert found.returncode == 0 and "found" in found.stdout, found.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _check_gmp(_wrapper(tmp_path, "cc-empty", empty))  # even if the system has one elsewhere
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_no_compiler_means_no_gmp():
    r = _check_gmp("/nonexistent/cc")
    assert r.returncode == 1 and "not found" in r.stderr
