"""Devnet scenarios, run against a started `Cluster` through the nodes' agent sockets.

basic: node 0 publishes a document for chat; every other node's agent asks its own question over it.
       Each answer must reuse the document's KV from the network (cached tokens = the document's
       prefix, source "network") and be token-exact against that node's own full prefill of the same
       prompt (`kvnet_reuse: false`), and the receipts in the agent node's ledger and in each
       provider's match (same channel, seq, cumulative; `GET /v1/ledger`) and add up to the answer's
       price paid. Reported per agent: cached tokens, bytes fetched, providers, price paid, receipts
       matched, time to first token reused versus full prefill.
churn: SIGKILLed and restarted nodes (see `churn`).
byzantine: a node serving corrupt pieces and two liar processes lying in offers (see `byzantine`).
load:  node 0 publishes; `requests` concurrent agent requests (`concurrency` at a time) against node 0
       over the document, each with its own question: throughput, p50/p99 latency, errors (must be 0).
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devnet.cluster import Cluster, DevNode


def document(n_bytes: int) -> str:
    """A deterministic document of `n_bytes` ASCII bytes (one token each on the synthetic models)."""
    words = "the provider signs a manifest and every peer verifies each piece against it before use".split()
    out, i = "", 0
    while len(out) < n_bytes:
        out += words[i % len(words)] + " "
        i += 1
    return out[:n_bytes]


def ask_stream(node: DevNode, model: str, messages: list[dict], **extra: Any) -> dict[str, Any]:
    """A streaming chat request; returns the final kvnet object, usage, text and time to first token."""
    body = {"model": model, "messages": messages, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft, text, final, usage = None, "", None, None
    with node.http() as c, c.stream("POST", "/v1/chat/completions", json=body) as s:
        if s.status_code != 200:
            s.read()
            raise RuntimeError(f"{node.name}: HTTP {s.status_code}: {s.text[:300]}")
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"{node.name}: {ev['error']['message']}")
            if ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("choices"):
                text += ev["choices"][0]["delta"].get("content", "")
            final = ev.get("kvnet", final)
            usage = ev.get("usage", usage)
    return {"kvnet": final, "usage": usage, "text": text, "ttft_s": ttft, "total_s": time.perf_counter() - t0}


def _publish(node: DevNode, doc: str) -> dict[str, Any]:
    with node.http() as c:
        r = c.post("/v1/kv/publish", json={"text": doc, "for_chat": True, "title": "devnet document"})
        r.raise_for_status()
        return r.json()


def _wait_visible(node: DevNode, messages: list[dict], manifest_id: str, limit_s: float = 60.0) -> None:
    """Until `node`'s network lookup finds the publisher's announcement (it runs in the background)."""
    deadline = time.monotonic() + limit_s
    with node.http() as c:
        while time.monotonic() < deadline:
            net = c.post("/v1/kv/lookup", json={"messages": messages}).json().get("network")
            if net and net["manifest_id"] == manifest_id:
                return
            time.sleep(0.5)
    raise RuntimeError(f"{node.name}: the published document never became visible on the network")


def basic(cluster: Cluster, doc_bytes: int = 1200) -> dict[str, Any]:
    doc = document(doc_bytes)
    pub = _publish(cluster.nodes[0], doc)
    rows, ok = [], True
    for i, node in enumerate(cluster.nodes[1:], start=1):
        messages = [{"role": "system", "content": doc},
                    {"role": "user", "content": f"Agent {i}: what does a peer check before it uses a piece?"}]
        _wait_visible(node, messages, pub["manifest_id"])
        reused = ask_stream(node, cluster.model, messages)
        full = ask_stream(node, cluster.model, messages, kvnet_reuse=False)
        k = reused["kvnet"]
        exact = k["token_ids"] == full["kvnet"]["token_ids"]
        row = {"node": node.name, "cached_tokens": k["cached_tokens"], "source": k["source"],
               "bytes_fetched": k["bytes_fetched"], "providers": k["providers"], "price_paid": k["price_paid"],
               "ttft_reused_s": round(reused["ttft_s"], 4), "ttft_full_s": round(full["ttft_s"], 4),
               "exact": exact}
        # providers: the publisher or any node that fetched it before (they announce what they hold)
        row.update(_receipts_agree(cluster, node, k))
        row["ok"] = (exact and k["cached_tokens"] == pub["n_tokens"] and k["source"] == "network"
                     and bool(k["providers"]) and row["receipts_match"])
        ok &= row["ok"]
        rows.append(row)
    return {"scenario": "basic", "ok": ok and bool(rows), "document_tokens": pub["n_tokens"],
            "manifest_id": pub["manifest_id"], "kv_bytes": pub["total_bytes"], "agents": rows}


def _receipts_agree(cluster: Cluster, node: DevNode, k: dict[str, Any]) -> dict[str, Any]:
    """The fetcher's receipts against each payee's (`GET /v1/ledger`): every channel the agent's node
    pays on has the same latest seq and cumulative amount in its payee's ledger (the payees are the
    answer's providers, plus any host whose endgame duplicate lost the race: it delivered, so it is
    paid), and (one fetch per agent node in `basic`) those cumulative amounts add up to `price_paid`.
    With a fee of 0 there are no receipts: the check is that none were made and 0 was paid."""
    ledgers = {}
    for n in cluster.nodes:
        with n.http() as c:
            ledgers[n.name] = c.get("/v1/ledger").json()
    mine = ledgers[node.name]
    by_key = {led["me"]: led for led in ledgers.values()}
    out = [ch for ch in mine["channels"] if ch["role"] == "out"]
    ok = all(ch["payee"] in by_key for ch in out)
    for o in (ch for ch in out if ch["payee"] in by_key):
        theirs = {ch["channel"]: ch for ch in by_key[o["payee"]]["channels"] if ch["role"] == "in"}
        t = theirs.get(o["channel"])
        ok &= t is not None and (t["payer"], t["seq"], t["cumulative"]) == (mine["me"], o["seq"], o["cumulative"])
    total = sum(o["cumulative"] for o in out)
    ok &= total == k["price_paid"]
    if total > 0:  # every provider of the answer was paid
        names = {n.peer_id: n.name for n in cluster.nodes}
        ok &= {ledgers[names[p]]["me"] for p in k["providers"]} <= {o["payee"] for o in out}
    return {"receipts_match": bool(ok), "channels_matched": len(out), "ledger_paid": total}


def load(cluster: Cluster, requests: int = 32, concurrency: int = 8, doc_bytes: int = 1200) -> dict[str, Any]:
    doc = document(doc_bytes)
    node = cluster.nodes[0]
    pub = _publish(node, doc)

    def one(i: int) -> dict[str, Any]:
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": f"Question number {i}?"}]
        try:
            r = ask_stream(node, cluster.model, messages)
            return {"ok": r["kvnet"]["cached_tokens"] == pub["n_tokens"], "latency_s": r["total_s"],
                    "ttft_s": r["ttft_s"], "error": None}
        except Exception as exc:  # noqa: BLE001 - counted as an error of the scenario
            return {"ok": False, "latency_s": None, "ttft_s": None, "error": str(exc)}

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(concurrency)
    try:
        results = list(pool.map(one, range(requests)))
    finally:  # Ctrl-C: drop the requests not started yet, so teardown follows at once
        pool.shutdown(wait=True, cancel_futures=True)
    wall = time.perf_counter() - t0
    lat = sorted(r["latency_s"] for r in results if r["latency_s"] is not None)
    errors = [r["error"] for r in results if r["error"]]

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

    return {"scenario": "load", "ok": not errors and all(r["ok"] for r in results), "requests": requests,
            "concurrency": concurrency, "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "p50_s": pct(0.50), "p99_s": pct(0.99),
            "median_ttft_s": round(statistics.median(r["ttft_s"] for r in results if r["ttft_s"]), 4)
            if lat else None, "errors": errors[:5], "error_count": len(errors)}


def churn(cluster: Cluster, doc_bytes: int = 1200) -> dict[str, Any]:
    """Nodes are SIGKILLed and restarted during the run: requests still succeed, and nothing already
    verified is fetched twice. node1 fetches the document, is SIGKILLed and restarted, and answers
    again from its own store (0 bytes fetched); then the publisher is SIGKILLed for good, and the last
    node, which never held the document, gets it from node1 (which re-announced it at restart)."""
    if cluster.n < 3:
        raise RuntimeError("churn needs at least 3 nodes")
    doc = document(doc_bytes)
    pub = _publish(cluster.nodes[0], doc)
    steps: list[dict[str, Any]] = []

    def ask(node: DevNode, label: str, want_source: str) -> None:
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": f"{label}: which piece?"}]
        if want_source == "network":
            _wait_visible(node, messages, pub["manifest_id"])
        k = ask_stream(node, cluster.model, messages)["kvnet"]
        ok = k["cached_tokens"] == pub["n_tokens"] and k["source"] == want_source
        if want_source == "local":
            ok = ok and k["bytes_fetched"] == 0
        steps.append({"step": label, "node": node.name, "cached_tokens": k["cached_tokens"], "source": k["source"],
                      "bytes_fetched": k["bytes_fetched"], "providers": k["providers"], "ok": ok})

    n1 = cluster.nodes[1]
    ask(n1, "first fetch", "network")
    cluster.kill(n1)
    n1 = cluster.restart(n1)
    ask(n1, "after SIGKILL + restart", "local")
    cluster.kill(cluster.nodes[0])
    last = cluster.nodes[-1]
    ask(last, "publisher gone", "network")
    if steps[-1]["ok"]:
        steps[-1]["ok"] = steps[-1]["providers"] != [cluster.nodes[0].peer_id]
    return {"scenario": "churn", "ok": all(s["ok"] for s in steps), "document_tokens": pub["n_tokens"],
            "steps": steps}


def _corrupt(node: DevNode, manifest_id: str) -> int:
    """Flip one byte in every MiB of `node`'s stored copy (its data file): it now serves corrupt pieces."""
    path = node.dir / "data" / "store" / "data" / f"{manifest_id}.kv"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in range(4096, size, 1 << 20):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    return size


LIARS = ("forged", "foreign", "phantom")  # devnet/liar.py: each a separate process that lies in its offers
# Lies a node's lookups catch and score down (each offer that fails verification).
SCORED_LIES = frozenset({"forged", "foreign"})
# Lies a fetch catches: `phantom` (offers every piece, holds none, answers `missing`) is scored down
# (`phantom`, -3) by every fetch that asked it for pieces and got none; a fetch asks it whenever it is
# the cheapest provider (liars charge no fee) or is among the providers the fetch splits pieces over.
SCORED_IN_FETCH = frozenset({"phantom"})
CATCH_LOOKUPS = 10  # lookups an agent's node may need before it has asked a liar (bounded, not timed)


def _scores(node: DevNode) -> dict[str, float]:
    with node.http() as c:
        return {p["peer_id"]: p["score"] for p in c.get("/v1/peers").json()["peers"]}


def _until_scored(node: DevNode, messages: list[dict], liars: list[DevNode]) -> tuple[dict[str, float], int]:
    """The liars' scores on `node`, once every liar has been asked (and caught) by one of its lookups.

    An agent's lookup asks every provider a batch of DHT answers names, but stops 1 s after one offer
    verified: a liar whose answer is later than that is not asked this time. So this looks up again,
    at most CATCH_LOOKUPS times, until each liar's score there is below 0; returns the scores and how
    many extra lookups that took (0: the agent's own requests had caught them all)."""
    liars = [liar for liar in liars if liar.ready["liar"] in SCORED_LIES]
    for extra in range(CATCH_LOOKUPS + 1):
        scores = _scores(node)
        if all(scores.get(liar.peer_id, 0.0) < 0 for liar in liars):
            return scores, extra
        with node.http() as c:
            c.post("/v1/kv/lookup", json={"messages": messages}).raise_for_status()
    return _scores(node), CATCH_LOOKUPS


def byzantine(cluster: Cluster, doc_bytes: int = 7000, liars: tuple[str, ...] = LIARS) -> dict[str, Any]:
    """One node serves corrupt pieces, and liar processes lie in their offers; every agent still gets
    verified, correct KV (token-exact against its own full prefill), no agent's answer uses a byte
    from any of them, and the agents' nodes score the SCORED_LIES liars down (and the corrupt node,
    whenever a fetch asked it for a piece).

    The corrupt node: node1 fetches the document, then its stored copy rots (one byte flipped per
    MiB); its own agent's answer fails verification on load and is prefilled instead. The liars
    (devnet/liar.py), started once the document is published: `forged` offers the document's
    manifest with a broken signature, `foreign` announces the document's prefix keys but offers a
    manifest of its own over other tokens, `phantom` offers the real manifest with every piece and
    holds none (scored down by a fetch that asked it). All announce the document's manifest id and
    chain keys."""
    if cluster.n < 3:
        raise RuntimeError("byzantine needs at least 3 nodes")
    doc = document(doc_bytes)
    pub = _publish(cluster.nodes[0], doc)
    procs = [cluster.start_liar(lie, pub["manifest_id"]) for lie in liars]
    liar_ids = {liar.peer_id: liar.ready["liar"] for liar in procs}
    bad = cluster.nodes[1]
    rows: list[dict[str, Any]] = []
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": "Who verifies?"}]
    _wait_visible(bad, messages, pub["manifest_id"])
    first = ask_stream(bad, cluster.model, messages)["kvnet"]
    if first["source"] != "network":  # it must hold a copy before that copy can rot
        raise RuntimeError(f"{bad.name} did not fetch the document: {first['network_error']}")
    _corrupt(bad, pub["manifest_id"])
    own = ask_stream(bad, cluster.model, messages)["kvnet"]  # its own rotten copy fails verification on load
    own_full = ask_stream(bad, cluster.model, messages, kvnet_reuse=False)["kvnet"]
    rotten = {"node": bad.name, "load_error": own["load_error"], "cached_tokens": own["cached_tokens"],
              "exact": own["token_ids"] == own_full["token_ids"]}
    for node in cluster.nodes[2:]:
        _wait_visible(node, messages, pub["manifest_id"])
        reused = ask_stream(node, cluster.model, messages)
        full = ask_stream(node, cluster.model, messages, kvnet_reuse=False)
        k = reused["kvnet"]
        with node.http() as c:
            fetches = c.get("/v1/status").json()["recent_fetches"]
        scores, extra_lookups = _until_scored(node, messages, procs)
        offered = {p for f in fetches for p in f.get("providers", [])}
        used_bad = bad.peer_id in offered
        rows.append({"node": node.name, "cached_tokens": k["cached_tokens"], "source": k["source"],
                     "exact": k["token_ids"] == full["kvnet"]["token_ids"], "providers": k["providers"],
                     "corrupt_provider_offered": used_bad, "corrupt_provider_score": scores.get(bad.peer_id),
                     "corrupt_provider_supplied": bad.peer_id in k["providers"], "network_error": k["network_error"],
                     "liar_scores": {lie: scores.get(pid) for pid, lie in liar_ids.items()},
                     "liars_in_fetch": sorted(liar_ids[p] for p in offered if p in liar_ids),
                     "liars_supplied": sorted(liar_ids[p] for p in k["providers"] if p in liar_ids),
                     "extra_lookups": extra_lookups})
    ok = all(r["exact"] and r["cached_tokens"] == pub["n_tokens"] and not r["corrupt_provider_supplied"]
             and not r["liars_supplied"]
             and all(s is not None and s < 0 for lie, s in r["liar_scores"].items() if lie in SCORED_LIES)
             and all((r["liar_scores"].get(lie) or 0) < 0 for lie in r["liars_in_fetch"] if lie in SCORED_IN_FETCH)
             for r in rows)
    # Whether a fetch sends node1 a piece request at all depends on which provider's worker takes the
    # pieces first; when it does, node1 is dropped and scored down (bad_piece, -10), and its score is
    # reported. What holds whatever the order: it supplied nothing (above).
    ok = ok and rotten["exact"] and rotten["cached_tokens"] == 0 and rotten["load_error"] is not None
    return {"scenario": "byzantine", "ok": ok and bool(rows),
            "corrupt_node_itself": rotten, "document_tokens": pub["n_tokens"], "kv_bytes": pub["total_bytes"],
            "corrupt_node": bad.name, "liars": {lie: pid for pid, lie in liar_ids.items()},
            "unscored_lies": sorted(set(liars) - SCORED_LIES - SCORED_IN_FETCH), "agents": rows}


SCENARIOS = {"basic": basic, "load": load, "churn": churn, "byzantine": byzantine}
