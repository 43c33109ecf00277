"""Announcing across real processes: a `kvnet serve` announces what a `kvnet publish` on the same home
stored, without a restart; a `kvnet fetch` process announces nothing (it exits right after).

The node that observes is in-process (a real libp2p node on loopback), so its DHT state can be read.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import trio

from kvnet import identity
from kvnet.store import Store
from tests.artifacts import ROOT, fake_artifact, provider_home, serve_process
from tests.p2p.conftest import make_node


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def _kvnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvnet.cli", *args]


async def _run(*args: str, env: dict[str, str] | None = None) -> trio.CompletedProcess:
    return await trio.run_process(_kvnet(*args), capture_stdout=True, capture_stderr=True, check=False,
                                  env={**_env(), **(env or {})})


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(10)


@pytest.mark.trio
async def test_a_document_published_next_to_a_running_serve_is_found_without_a_restart(tmp_path):
    home = tmp_path / "S"
    identity.generate(home / "identity.key")
    serve, addr = await trio.to_thread.run_sync(serve_process, home)
    try:
        async with trio.open_nursery() as n:
            reader = await n.start(make_node(tmp_path, "R", [addr]).run)
            doc = tmp_path / "doc.txt"
            doc.write_text("A document published while its node is serving. " * 12)
            pub = await _run("publish", str(doc), "--model", "tiny", "--home", str(home))
            assert pub.returncode == 0, pub.stderr.decode()
            with Store(home / "store") as store:
                (mid,) = [e.id for e in store.entries()]
            with trio.fail_after(60):  # bounded: the serving node polls its store every 2 s
                while (found := await reader.find_manifest(mid)) is None:
                    await trio.sleep(0.5)
            assert [p.peer for p in found.providers] == [addr.rsplit("/", 1)[1]]
            n.cancel_scope.cancel()
        assert serve.poll() is None  # the same process, never restarted
    finally:
        _stop(serve)


@pytest.mark.trio
async def test_kvnet_fetch_makes_no_provider_announcements(tmp_path):
    """Both processes log each announcement at INFO ("announced N provider records for ID"): the
    serving provider does, the fetch process (which exits right after its last piece) does not."""
    sm, pieces = fake_artifact(63, 8, kv_shape=(28, 8, 128))  # 8 pieces of 1 MiB
    info = {"KVNET_LOG_LEVEL": "info"}
    async with trio.open_nursery() as n:
        boot = await n.start(make_node(tmp_path, "B").run)
        provider, _ = await trio.to_thread.run_sync(
            partial(serve_process, provider_home(tmp_path, "P", sm, pieces), boot.addrs[0], env=info))
        try:
            home = tmp_path / "F"
            identity.generate(home / "identity.key")
            r = await _run("fetch", "--home", str(home), "--bootstrap", boot.addrs[0], "--manifest", sm.id.hex(),
                           env=info)
            assert r.returncode == 0, r.stderr.decode()
            assert f"fetched {len(pieces)} pieces" in r.stdout.decode()
            assert "provider records" not in r.stderr.decode()
        finally:
            _stop(provider)
            n.cancel_scope.cancel()
    assert f"announced 1 provider records for {sm.id.hex()[:16]}" in provider.stderr.read()
