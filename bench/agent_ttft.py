"""Time to first token through the agent socket: a reused document versus a full prefill.

    python -m bench.agent_ttft [--model qwen3-0.6b-shape] [--doc-tokens 2048] [--repeats 3] [--json OUT]

Starts real kvnet-node processes (temp dirs, loopback): A publishes a document for chat; then
  - local:    A's agent asks questions over it (KV from A's own store),
  - network:  B (bootstrapped to A) asks: the first question fetches the KV from A, the next reuse B's copy,
  - full:     A's agent asks over a document of the same length nobody published (full prefill).
Each ask is a streaming /v1/chat/completions request; TTFT is the time from sending it to the first
SSE event that carries the first token. Prints a table and writes JSON (figures for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from devnet.cluster import start_node, write_config


def _doc(n: int, seed: int) -> str:
    """~n tokens of ASCII text for the byte tokenizer of the synthetic models (one byte, one token)."""
    rng = random.Random(seed)
    words = ["kv", "cache", "prefix", "token", "peer", "piece", "manifest", "agent", "model", "store"]
    out = ""
    while len(out) < n:
        out += rng.choice(words) + " "
    return out[:n]


def _ask(c, model: str, doc: str, question: str) -> dict:
    body = {"model": model, "max_tokens": 4, "stream": True,
            "messages": [{"role": "system", "content": doc}, {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    ttft, last = None, None
    with c.stream("POST", "/v1/chat/completions", json=body) as s:
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = json.loads(line[6:])
    k = last["kvnet"]
    return {"ttft_s": round(ttft, 4), "total_s": round(time.perf_counter() - t0, 4),
            "cached_tokens": k["cached_tokens"], "source": k["source"], "bytes_fetched": k["bytes_fetched"],
            "fetch_s": k["fetch_s"], "load_s": k["load_s"], "prefill_s": k["prefill_s"],
            "prompt_tokens": last["usage"]["prompt_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b-shape")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kvnet-ttft-") as tmp:
        def cfg(name: str, bootstrap: list[str] | None = None) -> Path:
            return write_config(Path(tmp) / name, args.model, args.dtype, bootstrap, {"use_network": True})

        a = start_node(cfg("a"))
        try:
            doc, other = _doc(args.doc_tokens, 1), _doc(args.doc_tokens, 2)
            with a.http(timeout=600) as ca:
                pub = ca.post("/v1/kv/publish", json={"text": doc, "for_chat": True}).json()
                for i in range(args.repeats):
                    rows.append({"case": "local", **_ask(ca, args.model, doc, f"Question {i}?")})
                for i in range(args.repeats):
                    rows.append({"case": "full", **_ask(ca, args.model, other + str(i), f"Question {i}?")})
            b = start_node(cfg("b", [a.addr]))
            try:
                with b.http(timeout=600) as cb:
                    deadline = time.monotonic() + 120
                    while cb.post("/v1/kv/lookup", json={"messages": [{"role": "system", "content": doc},
                                                                      {"role": "user", "content": "?"}]}
                                  ).json()["network"] is None and time.monotonic() < deadline:
                        time.sleep(0.5)
                    for i in range(args.repeats):
                        rows.append({"case": "network" if i == 0 else "network-then-local",
                                     **_ask(cb, args.model, doc, f"Question {i}?")})
            finally:
                b.stop()
        finally:
            a.stop()
    print(f"{args.model} {args.dtype}, document {pub['n_tokens']} tokens ({pub['total_bytes']:,} bytes of KV)")
    print(f"{'case':<20} {'ttft s':>8} {'cached':>7} {'fetched MB':>10} {'fetch s':>8} {'load s':>7} {'prefill s':>9}")
    for r in rows:
        print(f"{r['case']:<20} {r['ttft_s']:>8.3f} {r['cached_tokens']:>7} {r['bytes_fetched'] / 1e6:>10.1f} "
              f"{r['fetch_s']:>8.3f} {r['load_s']:>7.3f} {r['prefill_s']:>9.3f}")
    full = statistics.median(r["ttft_s"] for r in rows if r["case"] == "full")
    local = statistics.median(r["ttft_s"] for r in rows if r["case"] == "local")
    print(f"median TTFT: full prefill {full:.3f} s, reused (local) {local:.3f} s: {full / local:.1f}x")
    report = {"model": args.model, "dtype": args.dtype, "doc_tokens": pub["n_tokens"], "kv_bytes": pub["total_bytes"],
              "rows": rows, "median_ttft_full_s": full, "median_ttft_local_s": local, "argv": sys.argv[1:]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
