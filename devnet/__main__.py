"""`python -m devnet run --nodes N --scenario basic|load|churn|byzantine [--model tiny] [--dtype fp32]
[--fee-per-mib 10] [--liars L] [--json]`.

Starts N real kvnet-node processes on loopback (devnet.cluster), runs the scenario against their
agent sockets (devnet.scenarios), prints a report (a rich table, or one JSON object with --json), and
tears everything down, also after Ctrl-C or a failing scenario. Exit 0 only if the scenario passed
and every node stopped cleanly (no process, no socket file left).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from rich.console import Console
from rich.table import Table

from devnet.cluster import DEFAULT_FEE_PER_MIB, Cluster
from devnet.scenarios import LIARS, SCENARIOS

console = Console(stderr=True)


def _table(report: dict) -> None:
    out = Console(width=160)
    if report["scenario"] == "basic":
        t = Table("agent", "cached", "source", "fetched MB", "providers", "paid", "receipts", "TTFT reused s",
                  "TTFT full s", "exact", title=f"basic: document of {report['document_tokens']} tokens "
                                 f"({report['kv_bytes'] / 1e6:.1f} MB of KV)")
        for r in report["agents"]:
            t.add_row(r["node"], str(r["cached_tokens"]), str(r["source"]), f"{r['bytes_fetched'] / 1e6:.2f}",
                      str(len(r["providers"])), str(r["price_paid"]),
                      "match" if r["receipts_match"] else "DIFFER", f"{r['ttft_reused_s']:.3f}",
                      f"{r['ttft_full_s']:.3f}", "yes" if r["exact"] else "NO")
        out.print(t)
    elif report["scenario"] == "byzantine":
        liars = sorted(report["liars"])
        t = Table("agent", "cached", "source", "exact", "corrupt provider offered", "its score here",
                  *(f"liar {lie}: score here" for lie in liars), "liars supplied",
                  title=f"byzantine: {report['corrupt_node']} serves corrupt pieces; liars lie in offers "
                        f"({', '.join(liars)}; not scored today: {', '.join(report['unscored_lies']) or 'none'})")
        for r in report["agents"]:
            t.add_row(r["node"], str(r["cached_tokens"]), str(r["source"]), "yes" if r["exact"] else "NO",
                      "yes" if r["corrupt_provider_offered"] else "no", str(r["corrupt_provider_score"]),
                      *(str(r["liar_scores"][lie]) for lie in liars), ", ".join(r["liars_supplied"]) or "none")
        out.print(t)
    elif report["scenario"] == "churn":
        t = Table("step", "node", "cached", "source", "fetched MB", "ok", title="churn")
        for r in report["steps"]:
            t.add_row(r["step"], r["node"], str(r["cached_tokens"]), str(r["source"]),
                      f"{r['bytes_fetched'] / 1e6:.2f}", "yes" if r["ok"] else "NO")
        out.print(t)
    else:
        out.print(f"load: {report['requests']} requests, {report['concurrency']} at a time: "
                  f"{report['requests_per_s']} req/s, p50 {report['p50_s']} s, p99 {report['p99_s']} s, "
                  f"median TTFT {report['median_ttft_s']} s, errors {report['error_count']}", highlight=False)
    for line in report.get("leftovers", []):
        out.print(f"[red]leftover:[/red] {line}")
    out.print("[green]PASS[/green]" if report["ok"] else "[red]FAIL[/red]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devnet")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start a devnet, run a scenario, tear it down")
    run.add_argument("--nodes", type=int, default=3)
    run.add_argument("--scenario", choices=sorted(SCENARIOS), default="basic")
    run.add_argument("--model", default="tiny")
    run.add_argument("--dtype", default="fp32", help="fp32 (default: bitwise exactness) or bf16")
    run.add_argument("--doc-bytes", type=int, default=None, help="document size (default: 1200; byzantine 7000)")
    run.add_argument("--fee-per-mib", type=int, default=DEFAULT_FEE_PER_MIB,
                     help=f"every node's hosting fee, micro-units per MiB (default {DEFAULT_FEE_PER_MIB}; 0: free)")
    run.add_argument("--liars", default=",".join(LIARS),
                     help=f"byzantine: liar processes, comma-separated from {', '.join(LIARS)} (default: all)")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    liars = tuple(x for x in args.liars.split(",") if x)
    if any(x not in LIARS for x in liars):
        ap.error(f"--liars: each one of {', '.join(LIARS)}")
    if args.scenario == "basic" and args.nodes < 2:
        ap.error("basic needs at least 2 nodes (a publisher and an agent's node)")
    if args.scenario in ("churn", "byzantine") and args.nodes < 3:
        ap.error(f"{args.scenario} needs at least 3 nodes")
    # Ctrl-C and SIGTERM both tear the devnet down (also when started where SIGINT is ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.fee_per_mib < 0:
        ap.error("--fee-per-mib must be >= 0")
    cluster = Cluster(args.nodes, args.model, args.dtype, fee_per_mib=args.fee_per_mib)
    report: dict
    try:
        with cluster:
            console.print(f"devnet: {args.nodes} nodes up ({args.model} {args.dtype}) in {cluster.tmp}; "
                          f"scenario {args.scenario}", highlight=False, soft_wrap=True)
            try:
                kw: dict = {"doc_bytes": args.doc_bytes} if args.doc_bytes else {}
                if args.scenario == "byzantine":
                    kw["liars"] = liars
                report = SCENARIOS[args.scenario](cluster, **kw)
            except Exception as exc:  # noqa: BLE001 - a failing scenario is a report, then teardown
                report = {"scenario": args.scenario, "ok": False, "error": str(exc)}
    except KeyboardInterrupt:
        console.print("interrupted: every node was stopped")
        return 130
    report["nodes"] = args.nodes
    report["leftovers"] = cluster.leftovers
    report["dir"] = str(cluster.tmp)  # removed by now
    report["ok"] = report["ok"] and not cluster.leftovers
    if args.json:
        print(json.dumps(report, indent=2))
    elif "error" in report:
        console.print(f"[red]FAIL[/red] {report['error']}")
    else:
        _table(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
