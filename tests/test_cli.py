"""The offline CLI end to end, as a user runs it (separate processes)."""

import json
import os
import stat
import subprocess
import sys

import pytest


def kvnet(home, *args, check=True):
    env = {**os.environ, "KVNET_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvnet {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def home(tmp_path):
    kvnet(tmp_path, "keygen")
    return tmp_path


def test_keygen_writes_a_private_key_file_and_refuses_to_overwrite(home):
    mode = stat.S_IMODE((home / "identity.key").stat().st_mode)
    assert mode == 0o600
    again = kvnet(home, "keygen", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_publish_ls_show_verify_generate(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("kvnet shares KV caches between agents. " * 20)  # 780 tokens with the byte tokenizer
    pub = kvnet(home, "publish", str(doc), "--model", "tiny", "--title", "Doc", "--price", "25")
    assert "tokens    780" in pub.stdout and "B/token" in pub.stdout
    mid = pub.stdout.split()[1]
    assert len(mid) == 64
    assert mid[:16] in kvnet(home, "ls").stdout
    shown = json.loads(kvnet(home, "show", mid[:12]).stdout)
    assert shown["id"] == mid and shown["n_tokens"] == 780 and shown["terms"]["price_per_load"] == 25
    assert shown["source"]["title"] == "Doc"
    assert "0 corrupt" in kvnet(home, "verify", mid).stdout
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(doc.read_text() + "Question: what does kvnet share?\nAnswer:")
    gen = kvnet(home, "generate", "--model", "tiny", "--prompt-file", str(prompt), "--max-new-tokens", "8")
    assert "cached_tokens 780" in gen.stderr
    # a corrupted piece on disk is caught by verify, which exits non-zero
    piece = next((home / "store" / "pieces").rglob("*"))
    while piece.is_dir():
        piece = next(piece.iterdir())
    data = bytearray(piece.read_bytes())
    data[0] ^= 0xFF
    piece.write_bytes(data)
    bad = kvnet(home, "verify", mid, check=False)
    assert bad.returncode == 1 and "corrupt" in bad.stdout


def test_exactness_json(home):
    r = json.loads(kvnet(home, "exactness", "--model", "tiny", "--doc-tokens", "300", "--new-tokens", "32",
                         "--json").stdout)
    assert r["tokens_match"] == r["tokens_total"] == 32 and r["max_logit_diff"] == 0.0
    assert {"oneshot_tokens_match", "oneshot_max_logit_diff", "model_id", "bytes_per_token"} <= set(r)


def test_clear_errors(home, tmp_path):
    r = kvnet(home, "show", "ffff", check=False)
    assert r.returncode == 1 and "no manifest id starts with" in r.stderr
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    r = kvnet(home, "publish", str(doc), "--model", "/nonexistent/model", check=False)
    assert r.returncode == 1 and "neither a folder" in r.stderr
