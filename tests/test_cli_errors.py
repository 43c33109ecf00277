"""Common mistakes give one `error: ...` line on stderr, a non-zero exit and no traceback.

Every test runs the real `kvnet` command in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity
from kvnet.store import Store
from tests.artifacts import fake_artifact, serve_process

ROOT = Path(__file__).resolve().parents[1]
DOC = "kvnet shares KV caches between agents. " * 20  # 780 tokens with the byte tokenizer


def _env(home: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}  # narrow: the line must not wrap
    env.pop("KVNET_HOME", None)
    if home is not None:
        env["KVNET_HOME"] = str(home)
    return env


def kvnet(home: Path | None, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True,
                          env=_env(home), timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, needle: str, code: int = 1) -> str:
    """Assert a failed run printed exactly one `error:` line containing `needle`, and no traceback."""
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == code, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], where
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    identity.generate(h / "identity.key")
    return h


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_addr() -> str:
    """A well-formed peer address where nobody listens (a fresh peer id, a closed port)."""
    from kvnet.p2p.host import peer_id_of

    pid = peer_id_of(identity.public_bytes(Ed25519PrivateKey.generate()))
    return f"/ip4/127.0.0.1/tcp/{_unused_port()}/p2p/{pid.to_base58()}"


# -- sizes and counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, option", [
    (("generate", "-m", "tiny", "--prompt-file", "{doc}", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("generate", "-m", "tiny", "--prompt-file", "{doc}", "--max-new-tokens", "-4"), "--max-new-tokens"),
    (("exactness", "--doc-tokens", "0"), "--doc-tokens"),
    (("exactness", "--doc-tokens", "-1"), "--doc-tokens"),
    (("exactness", "--new-tokens", "0"), "--new-tokens"),
    (("publish", "{doc}", "-m", "tiny", "--block-size", "0"), "--block-size"),
    (("publish", "{doc}", "-m", "tiny", "--price", "-1"), "--price"),
    (("publish", "{doc}", "-m", "tiny", "--ttl", "-1"), "--ttl"),
    (("serve", "--capacity-mb", "0"), "--capacity-mb"),
    (("ls", "--log-level", "loud"), "--log-level"),
])
def test_bad_sizes_are_refused_in_one_line(home, tmp_path, args, option):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    r = kvnet(home, *(a.format(doc=doc) for a in args))
    line = one_error_line(r, option, code=2)
    assert "Invalid value" in line


def test_currency_length_is_checked_before_the_model_loads(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    r = kvnet(home, "publish", str(doc), "-m", "/no/such/model", "--currency", "x" * 17)
    one_error_line(r, "--currency must be 1 to 16 characters")


# -- files -------------------------------------------------------------------------------------------------


def test_non_utf8_document_and_binary_prompt(home, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    one_error_line(kvnet(home, "publish", str(latin1), "-m", "tiny"), "is not UTF-8 text")
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    one_error_line(kvnet(home, "generate", "-m", "tiny", "--prompt-file", str(binary)), "is binary")
    one_error_line(kvnet(home, "fetch", "--bootstrap", _unreachable_addr(), "-m", "tiny", "--prompt-file",
                         str(binary)), "is binary")


def test_model_folder_with_invalid_or_non_qwen3_config(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3", ')
    one_error_line(kvnet(home, "publish", str(doc), "-m", str(folder)), "config.json is not valid JSON")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    one_error_line(kvnet(home, "publish", str(doc), "-m", str(folder)), "is not a Qwen3 model")
    one_error_line(kvnet(home, "generate", "-m", str(folder), "--prompt-file", str(doc)), "is not a Qwen3 model")
    (folder / "config.json").write_text("[1, 2]")
    one_error_line(kvnet(home, "exactness", "-m", str(folder)), "is not a Qwen3 model")


# -- the identity key comes first -----------------------------------------------------------------------


def test_identity_key_is_checked_before_the_model_is_loaded(tmp_path):
    """With no key and an unloadable model, the error is about the key: the model was never touched."""
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    bad_model = str(tmp_path / "no-such-model")
    for args in (("publish", str(doc), "-m", bad_model),
                 ("generate", "-m", bad_model, "--prompt-file", str(doc), "--bootstrap", _unreachable_addr()),
                 ("fetch", "-m", bad_model, "--prompt-file", str(doc), "--bootstrap", _unreachable_addr())):
        one_error_line(kvnet(keyless, *args), "identity key")  # not "model ref ... is neither a folder ..."


# -- bootstrap -------------------------------------------------------------------------------------------


def test_malformed_bootstrap_is_one_line(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    for bad in ("/ip4/1.2.3/tcp/4001", "/ip4/127.0.0.1/tcp/4001", "not-an-address"):
        one_error_line(kvnet(home, "generate", "-m", "tiny", "--prompt-file", str(doc), "--bootstrap", bad),
                       "bootstrap")
        one_error_line(kvnet(home, "fetch", "--manifest", "ab" * 32, "--bootstrap", bad), "bootstrap")


def test_unreachable_bootstrap_generate_falls_back_and_fetch_fails(home, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    assert kvnet(home, "publish", str(doc), "-m", "tiny").returncode == 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(DOC + "Question: what does kvnet share?\nAnswer:")
    addr = _unreachable_addr()
    gen = kvnet(home, "generate", "-m", "tiny", "--prompt-file", str(prompt), "--bootstrap", addr,
                "--max-new-tokens", "4", "--no-baseline")
    assert gen.returncode == 0, gen.stderr
    assert "Traceback" not in gen.stderr
    assert "no bootstrap peer reachable" in gen.stderr and "continuing with the local store" in gen.stderr
    assert "cached_tokens 780" in gen.stderr  # the answer came from the local store
    assert gen.stdout.strip()
    assert "libp2p" not in gen.stderr  # its dial-failure ERRORs stay hidden at the default log level
    fetched = kvnet(home, "fetch", "--manifest", "ab" * 32, "--bootstrap", addr)
    one_error_line(fetched, "no bootstrap peer reachable")
    assert "libp2p" not in fetched.stderr
    # ... and appear when asked for (libp2p's debug records carry its own tracebacks: that is debug output)
    debug = kvnet(home, "fetch", "--manifest", "ab" * 32, "--bootstrap", addr, "--log-level", "debug")
    assert debug.returncode == 1 and "DEBUG libp2p" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: no bootstrap peer reachable")


def test_fetch_without_bootstrap_says_no_peer_was_asked(home):
    one_error_line(kvnet(home, "fetch", "--manifest", "ab" * 32), "no peer was asked (no --bootstrap given)")


# -- verify ------------------------------------------------------------------------------------------------


def test_verify_an_incomplete_artifact_fails_and_names_the_missing_pieces(home):
    sm, pieces = fake_artifact(41, 8)
    with Store(home / "store") as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, [(i, pieces[i]) for i in (0, 1, 2, 6)])
    r = kvnet(home, "verify", sm.id.hex()[:12])
    one_error_line(r, "incomplete artifact: missing pieces 3-5, 7 (4 of 8)")
    assert "4/8 pieces verified, 4 missing, 0 corrupt" in r.stdout


# -- unwritable homes -------------------------------------------------------------------------------------


def test_home_under_a_regular_file_fails_in_one_line(tmp_path):
    """ENOTDIR: works as any user (root included), unlike chmod. Writing commands name the directory."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    home = afile / "home"
    one_error_line(kvnet(home, "keygen"), f"cannot write {home / 'identity.key'}: Not a directory")
    one_error_line(kvnet(home, "gc"), f"cannot write to the store directory {home / 'store'}: Not a directory")
    r = kvnet(home, "ls")  # nothing stored there: an empty list, not an error
    assert r.returncode == 0 and "Traceback" not in r.stderr


def _read_only_prefix(home: Path) -> tuple[str, ...]:
    """Run a command with `home` bind-mounted read-only over itself in a user + mount namespace.

    Tests run as root here, where chmod does not stop writes; a read-only mount does (EROFS)."""
    script = f'mount --bind "{home}" "{home}" && mount -o remount,ro,bind "{home}" "{home}" && exec "$@"'
    return ("unshare", "-rm", "sh", "-c", script, "sh")


def _can_mount_read_only(tmp_path: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run([*_read_only_prefix(probe), "touch", str(probe / "x")], capture_output=True, text=True)
    if "Read-only file system" not in r.stderr:
        return f"cannot make a read-only bind mount in a user namespace here: {r.stderr.strip()!r}"
    return None


def test_read_only_home_lists_and_shows_but_refuses_writes(home, tmp_path):
    why = _can_mount_read_only(tmp_path)
    if why:
        pytest.skip(f"READ-ONLY HOME NOT TESTED: {why}")
    sm, pieces = fake_artifact(42, 2)
    with Store(home / "store") as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, list(enumerate(pieces)))
    ro = _read_only_prefix(home)
    listed = kvnet(home, "ls", "--json", prefix=ro)
    assert listed.returncode == 0, listed.stderr
    assert [a["id"] for a in json.loads(listed.stdout)["artifacts"]] == [sm.id.hex()]
    shown = kvnet(home, "show", sm.id.hex()[:10], prefix=ro)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == sm.id.hex(), shown.stderr
    checked = kvnet(home, "verify", sm.id.hex(), prefix=ro)
    assert checked.returncode == 0 and "2/2 pieces verified" in checked.stdout, checked.stderr
    store_dir = home / "store"
    one_error_line(kvnet(home, "rm", sm.id.hex(), prefix=ro),
                   f"cannot write to the store directory {store_dir}: Read-only file system")
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    # an unloadable model: had it been loaded first, the error would be about the model
    r = kvnet(home, "publish", str(doc), "-m", str(tmp_path / "no-such-model"), prefix=ro)
    one_error_line(r, f"cannot write to the store directory {store_dir}: Read-only file system")
    one_error_line(kvnet(home / "sub", "keygen", prefix=ro), "Read-only file system")


# -- serve ---------------------------------------------------------------------------------------------


def test_serve_on_a_port_another_node_listens_on_refuses_to_start(home, tmp_path):
    first, addr = serve_process(home)
    try:
        port = addr.split("/tcp/")[1].split("/")[0]
        other = tmp_path / "other"
        identity.generate(other / "identity.key")
        r = kvnet(other, "serve", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        one_error_line(r, port)
        assert "listening" not in r.stdout
    finally:
        first.terminate()
        first.wait(10)
