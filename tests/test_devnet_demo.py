"""The README's main job: the devnet demo runs end to end and its exactness check passes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_devnet_demo():
    r = subprocess.run([sys.executable, str(ROOT / "devnet" / "demo.py"), "--doc-tokens", "700"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cached_tokens 700" in r.stdout
    assert "network: fetched 700 tokens" in r.stdout
    assert "equals a one-shot prefill" in r.stdout
