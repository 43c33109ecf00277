"""A kvnet-node's life: one node per data dir (a second refuses with a clear line), SIGTERM stops it
cleanly (exit 0, socket file removed), a SIGKILLed node's stale socket is replaced, and restarts keep
the store and the identity."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.daemon.nodes import env, node_cmd, start, write_config

DOC = "A document that must survive a restart of its node. " * 8


def test_lock_sigterm_cleanup_stale_socket_and_restart(tmp_path):
    cfg = write_config(tmp_path / "n")
    node = start(cfg)
    try:
        with node.http() as c:
            pub = c.post("/v1/kv/publish", json={"text": DOC, "title": "kept"}).json()
        # a second node on the same data dir refuses before it loads anything
        second = subprocess.run(node_cmd(cfg), capture_output=True, text=True, env=env(), timeout=60)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another kvnet-node" in lines[0] and str(node.proc.pid) in lines[0], lines
        assert os.path.exists(node.socket)  # the refused node did not touch the running one's socket
    finally:
        code = node.stop()
    assert code == 0
    assert not os.path.exists(node.socket)

    killed = start(cfg)
    assert killed.ready["peer_id"] == node.ready["peer_id"]  # the same identity key
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    assert os.path.exists(killed.socket)  # SIGKILL leaves the socket file; the kernel released the lock

    again = start(cfg)
    try:
        with again.http() as c:
            held = c.get("/v1/kv").json()["artifacts"]
            assert [(a["manifest_id"], a["complete"]) for a in held] == [(pub["manifest_id"], True)]
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": DOC + "?", "max_tokens": 2}).json()
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == pub["n_tokens"]
    finally:
        again.proc.send_signal(signal.SIGINT)  # Ctrl-C stops it the same way
        again.proc.wait(30)
    assert again.proc.returncode == 0
    assert not os.path.exists(again.socket)
