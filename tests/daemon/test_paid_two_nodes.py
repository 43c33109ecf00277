"""Paid reuse between two real kvnet-node processes: A hosts at a fee, B's agent reuses A's document.

The answer's `kvnet.price_paid` must be what the receipts say in both ledgers (`GET /v1/ledger`: the
same channel, sequence and cumulative amount at payer and payee, hosting units equal to the bytes B
fetched), and B's Prometheus counters follow its ledger. B restarts with a spending limit below A's
fee: its ledger survived the restart, and a chat request whose network prefix costs more than the
limit is answered 402 `spending_limit` naming the limit, with no byte moved (nothing stored, no
fetch started, neither ledger changed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from kvnet.receipts import hosting_cost
from tests.daemon.nodes import ROOT, NodeProc, start, write_config

FEE = 1000  # micro-units per MiB: a ~420 KB tiny-model document costs a few hundred
DOC = ("Section 7: a host quotes its fee per MiB in its offer, and the payer signs a receipt for the "
       "verified bytes only. " * 8).strip()
DOC2 = ("Appendix B: a fetch that would cost more than a spending limit is refused before any byte "
        "moves. " * 8).strip()


def _messages(doc: str, question: str) -> list[dict]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


def _wait_visible(c: httpx.Client, messages: list[dict], manifest_id: str) -> None:
    """Until B's lookup sees A's announcement (A announces in the background)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        net = c.post("/v1/kv/lookup", json={"messages": messages}).json()["network"]
        if net is not None and net["manifest_id"] == manifest_id:
            return
        time.sleep(0.5)
    raise AssertionError("A's document never became visible to B")


def _metric(node: NodeProc, name: str) -> float:
    text = httpx.get(f"http://{node.ready['metrics']}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    assert values, f"{name} not in the metrics"
    return sum(values)


def _kvnet_json(*args: str) -> dict:
    """`kvnet ARGS --json` in this process (typer's runner: the same app, no interpreter start-up)."""
    from typer.testing import CliRunner

    from kvnet.cli import app

    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _kvnet(*args: str) -> str:
    """`kvnet ARGS` as a user runs it (its rich tables at 200 columns)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _channel(ledger: dict, role: str) -> dict:
    chans = [c for c in ledger["channels"] if c["role"] == role]
    assert len(chans) == 1, ledger["channels"]
    return chans[0]


def test_paid_reuse_matches_both_ledgers_and_a_limit_refuses_before_any_byte(tmp_path):
    a = start(write_config(tmp_path / "a", extra=f"[prices]\nhost_fee_per_mib = {FEE}"))
    try:
        b_cfg = write_config(tmp_path / "b", extra=f'bootstrap = ["{a.addr}"]')
        b = start(b_cfg)
        try:
            with a.http() as ca, b.http() as cb:
                pub = ca.post("/v1/kv/publish", json={"text": DOC, "for_chat": True}).json()
                msgs = _messages(DOC, "Who signs the receipt?")
                _wait_visible(cb, msgs, pub["manifest_id"])
                r = cb.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 4})
                assert r.status_code == 200, r.text
                k = r.json()["kvnet"]
                led_a, led_b = ca.get("/v1/ledger").json(), cb.get("/v1/ledger").json()
                paid_metric = _metric(b, "kvnet_paid_microunits_total")
                signed_metric = _metric(b, 'kvnet_receipts_total{direction="signed"}')
                accepted_metric = _metric(a, 'kvnet_receipts_total{direction="accepted"}')
                cli_json = _kvnet_json("node", "ledger", "--socket", b.socket)
                cli_table = _kvnet("node", "ledger", "--socket", b.socket)
                pub2 = ca.post("/v1/kv/publish", json={"text": DOC2, "for_chat": True}).json()
        finally:
            assert b.stop() == 0
        # B again, on the same data dir, now refusing any host fee above half of A's
        b_cfg.write_text(b_cfg.read_text().replace("[model]", f"[prices]\nmax_per_mib = {FEE // 2}\n[model]"))
        b = start(b_cfg)
        try:
            with a.http() as ca, b.http() as cb:
                led_b_restarted = cb.get("/v1/ledger").json()
                msgs2 = _messages(DOC2, "When is a fetch refused?")
                _wait_visible(cb, msgs2, pub2["manifest_id"])
                refused = cb.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs2, "max_tokens": 4})
                after_b, after_a = cb.get("/v1/ledger").json(), ca.get("/v1/ledger").json()
                held = [x["manifest_id"] for x in cb.get("/v1/kv").json()["artifacts"]]
                status = cb.get("/v1/status").json()
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0
    offline = _kvnet_json("ledger", "--home", str(b_cfg.parent / "data"))

    # the paid answer: reused from A, and its price is what both ledgers hold
    assert k["source"] == "network" and k["providers"] == [a.ready["peer_id"]] and k["bytes_fetched"] > 0
    assert k["currency"] == "USD" and k["price_paid"] >= hosting_cost(k["bytes_fetched"], FEE) > 0
    out, inn = _channel(led_b, "out"), _channel(led_a, "in")
    assert out["payer"] == led_b["me"] == inn["payer"] and out["payee"] == led_a["me"] == inn["payee"]
    assert (out["channel"], out["seq"], out["cumulative"]) == (inn["channel"], inn["seq"], inn["cumulative"])
    assert out["seq"] >= 1 and out["cumulative"] == k["price_paid"]
    [man_b] = led_b["manifests"]
    assert (man_b["manifest"], man_b["role"], man_b["kind"]) == (pub["manifest_id"], "out", "hosting")
    assert man_b["units"] == k["bytes_fetched"] and man_b["amount"] == k["price_paid"]
    assert led_a["peers"] == [{"peer": led_b["me"], "role": "in", "currency": "USD", "channels": 1,
                               "receipts": inn["seq"], "amount": k["price_paid"], "debtor": False}]
    assert led_a["debtors"] == [] and led_b["debtors"] == []
    assert paid_metric == k["price_paid"] and signed_metric == out["seq"] == accepted_metric
    # `kvnet node ledger` (through kvnet.client) and `kvnet ledger` on B's data dir show the same data
    assert cli_json == led_b
    assert out["channel"][:16] in cli_table and "latest receipt per channel" in cli_table
    assert offline == {k: v for k, v in after_b.items() if k not in ("me", "currency")}
    # the restart kept B's ledger
    assert led_b_restarted["channels"] == led_b["channels"] and led_b_restarted["me"] == led_b["me"]
    # over the limit: a 402 naming it, and no byte moved
    assert refused.status_code == 402, refused.text
    err = refused.json()["error"]
    assert err["code"] == "spending_limit" and err["type"] == "payment_required"
    assert "spending limit per_mib" in err["message"] and "[prices] max_per_mib" in err["message"]
    assert f"{FEE}" in err["message"] and f"{FEE // 2}" in err["message"]
    assert held == [pub["manifest_id"]]  # DOC2 was not stored, not even its manifest
    assert status["fetches"] == [] and status["recent_fetches"] == []
    assert after_b["channels"] == led_b["channels"] and after_a["channels"] == led_a["channels"]
