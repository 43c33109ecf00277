"""The offline CLI end to end, as a user runs it (separate processes)."""

import json
import os
import stat
import subprocess
import sys

import pytest
import typer

from kvnet.cli import app
from kvnet.store import Store
from tests.artifacts import corrupt_piece, fake_artifact, provider_home, serve_process


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
    with Store(home / "store", read_only=True) as store:
        corrupt_piece(store, bytes.fromhex(mid), 0)
    bad = kvnet(home, "verify", mid, check=False)
    assert bad.returncode == 1 and "corrupt" in bad.stdout


def test_exactness_json(home):
    r = json.loads(kvnet(home, "exactness", "--model", "tiny", "--doc-tokens", "300", "--new-tokens", "32",
                         "--json").stdout)
    assert r["tokens_match"] == r["tokens_total"] == 32 and r["max_logit_diff"] == 0.0
    assert {"oneshot_tokens_match", "oneshot_max_logit_diff", "model_id", "bytes_per_token"} <= set(r)


def test_clear_errors(home, tmp_path):
    r = kvnet(home, "show", "ffff", check=False)
    assert r.returncode == 1 and "no store at" in r.stderr
    sm, pieces = fake_artifact(50, 1)
    with Store(home / "store") as store:
        store.put_manifest(sm.raw)
    other = "0" if sm.id.hex()[0] != "0" else "1"
    r = kvnet(home, "show", other, check=False)
    assert r.returncode == 1 and "no manifest id starts with" in r.stderr
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    r = kvnet(home, "publish", str(doc), "--model", "/nonexistent/model", check=False)
    assert r.returncode == 1 and "neither a folder" in r.stderr


def test_version_and_help_text_for_every_option_and_argument():
    r = kvnet(".", "--version")
    assert r.stdout.strip() == f"kvnet {__import__('kvnet').__version__}"
    group = typer.main.get_command(app)
    assert set(group.commands) == {"keygen", "publish", "ls", "show", "verify", "pin", "rm", "gc", "generate",
                                   "serve", "fetch", "exactness", "ledger", "node", "audit"}
    for name, cmd in group.commands.items():
        assert cmd.help, name
        for param in cmd.params:
            assert getattr(param, "help", None), f"kvnet {name}: {param.name} has no help text"
        assert any(p.name == "log_level" for p in cmd.params), f"kvnet {name} has no --log-level"
    assert "--log-level" in kvnet(".", "rm", "--help").stdout


def test_json_outputs_duplicate_publish_rm_and_gc(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("kvnet shares KV caches between agents. " * 20)
    first = json.loads(kvnet(home, "publish", str(doc), "--model", "tiny", "--json").stdout)
    assert first["already_published"] is False and first["n_tokens"] == 780 and first["prefill_s"] > 0
    again = kvnet(home, "publish", str(doc), "--model", "tiny", "--json")
    second = json.loads(again.stdout)
    assert second["manifest_id"] == first["manifest_id"] and second["already_published"] is True
    assert "already published" in again.stderr and first["manifest_id"] in again.stderr
    forced = json.loads(kvnet(home, "publish", str(doc), "--model", "tiny", "--force", "--price", "9",
                              "--json").stdout)
    assert forced["manifest_id"] != first["manifest_id"] and forced["already_published"] is False

    listed = json.loads(kvnet(home, "ls", "--json").stdout)["artifacts"]
    assert {a["id"] for a in listed} == {first["manifest_id"], forced["manifest_id"]}
    assert all(a["complete"] and a["n_tokens"] == 780 for a in listed)
    assert [a["id"] for a in json.loads(kvnet(home, "ls", forced["manifest_id"][:8], "--json").stdout)
            ["artifacts"]] == [forced["manifest_id"]]

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(doc.read_text() + "Question: what does kvnet share?\nAnswer:")
    gen = kvnet(home, "generate", "--model", "tiny", "--prompt-file", str(prompt), "--max-new-tokens", "4",
                "--json")
    g = json.loads(gen.stdout)
    assert g["cached_tokens"] == 780 and g["prompt_tokens"] == 780 + len("Question: what does kvnet share?\nAnswer:")
    assert g["manifest_id"] in (first["manifest_id"], forced["manifest_id"]) and len(g["tokens"]) <= 4
    assert {"load_s", "prefill_s", "generate_s", "full_prefill_s"} <= set(g["timings"])
    assert "cached_tokens 780" in gen.stderr  # stderr stays human

    planned = json.loads(kvnet(home, "gc", "--dry-run", "--json").stdout)["removed"]
    assert [(i["id"], i["reason"], i["superseded_by"]) for i in planned] == [
        (first["manifest_id"], "superseded", forced["manifest_id"])]
    assert len(json.loads(kvnet(home, "ls", "--json").stdout)["artifacts"]) == 2
    assert "removed 1 artifacts" in kvnet(home, "gc").stdout
    kvnet(home, "pin", forced["manifest_id"][:10])
    refused = kvnet(home, "rm", forced["manifest_id"][:10], check=False)
    assert refused.returncode == 1 and "is pinned" in refused.stderr and "Traceback" not in refused.stderr
    assert "removed" in kvnet(home, "rm", forced["manifest_id"][:10], "--force").stdout
    assert json.loads(kvnet(home, "ls", "--json").stdout)["artifacts"] == []


def test_ambiguous_prefix_lists_candidates(home):
    ids = []
    with Store(home / "store") as store:
        for seed in range(17):  # 17 ids over 16 first hex digits: at least two share one
            sm, _ = fake_artifact(200 + seed, 1)
            store.put_manifest(sm.raw)
            ids.append(sm.id.hex())
    first = next(h[0] for h in ids if sum(x[0] == h[0] for x in ids) > 1)
    expected = sorted(h for h in ids if h[0] == first)
    for command in ("show", "verify", "rm"):
        r = kvnet(home, command, first, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"'{first}' is ambiguous: {len(expected)} manifests" in r.stderr
        listed = sorted(ln.split()[0] for ln in r.stderr.splitlines() if ln.startswith("  "))
        assert listed == expected
        assert "tokens  fake " in r.stderr  # id, tokens and title of each candidate
    ls = json.loads(kvnet(home, "ls", first, "--json").stdout)["artifacts"]
    assert sorted(a["id"] for a in ls) == expected


@pytest.mark.parametrize(("bulk", "path"), [(None, "bulk-tls"), ("tcp", "bulk-tcp"), ("off", "streams")])
def test_fetch_json(tmp_path, bulk, path):
    sm, pieces = fake_artifact(51, 3)
    proc, addr = serve_process(provider_home(tmp_path, "P", sm, pieces))
    try:
        home = tmp_path / "F"
        kvnet(home, "keygen")
        r = kvnet(home, "fetch", "--bootstrap", addr, "--manifest", sm.id.hex(), "--json",
                  *(["--bulk", bulk] if bulk else []))
        got = json.loads(r.stdout)
        assert got["ok"] is True and got["error"] is None and got["manifest_id"] == sm.id.hex()
        assert got["fetched"] == len(pieces) and got["already_had"] == 0 and got["bytes"] == sm.manifest.total_bytes
        assert [p["path"] for p in got["providers"].values()] == [path]  # --bulk picks how the bytes travel
        assert f"found {sm.id.hex()}" in r.stderr  # stdout holds only the JSON object
    finally:
        proc.terminate()
        proc.wait(10)
