"""The economics of KV reuse: re-prefilling a document per agent, versus reusing its published KV hosted
next to compute, versus shipping the KV to each agent per load.

    python -m bench.economics --paper                        # the paper's 80M-agent example, from its inputs
    python -m bench.economics --table docs/figures/paper_table.json --price-per-hour 2.0   # kvnet's measured
    python -m bench.economics --paper --table T.json --json OUT --md OUT --png OUT       # both, plot

The cost model (every input is a flag; defaults are the paper example's):
  prefill per load      = L x price per prefill token (from $/Mtok, or $/hour / measured tokens/s, or
                          $/PFLOP x the config's FLOPs)
  reuse compute / load  = prefill per load / R, where R is reuse's compute advantage (the paper: 49.7x at
                          3774 tokens; kvnet: the measured prefill/local-reuse time ratio)
  hosted next to compute, per load = prefill per load x the provider's cached-read tariff T (a fraction of
                          the prefill price; default 1/R, i.e. at cost) + kvnet's license fee
  shipped per load      = reuse compute / load + KV GB x egress $/GB + license fee
  totals for N agents   = one publisher prefill + hosting (KV GB x $/GB-month x months) + N x per-load cost,
                          against N x prefill per load for re-prefill
  break-even reuses     = the N at which a reuse strategy's total equals re-prefill's (the publisher's prefill
                          and hosting paid back); never when a load costs at least a prefill

The paper's example inputs are reconstructed from its stated figures (its text gives the outcomes, not
every input): $5 per million prefill tokens (80M x 3774 tokens x $5/M = $1.51M), R = 49.7, egress $0.09/GB
and a 0.54 GB artifact ($0.049 a load).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class Inputs:
    """Everything the cost model needs; `price_per_token` is the prefill price of one token in $."""

    label: str
    price_per_token: float
    doc_tokens: int
    kv_gb: float
    compute_ratio: float  # prefill compute / reuse compute, R
    agents: float = 80e6
    egress_per_gb: float = 0.09
    cached_read_fraction: float | None = None  # T; None: at cost, 1 / R
    license_fee: float = 0.0  # $ per load, paid to the publisher (kvnet's license terms)
    hosting_per_gb_month: float = 0.0  # $ per GB-month for keeping the KV next to compute
    hosting_months: float = 1.0
    source: str = ""

    @property
    def tariff(self) -> float:
        return self.cached_read_fraction if self.cached_read_fraction is not None else 1.0 / self.compute_ratio


PAPER = Inputs(label="paper example (Qwen3-4B, fp16)", price_per_token=5.0 / 1e6, doc_tokens=3774, kv_gb=0.54,
               compute_ratio=49.7, agents=80e6, egress_per_gb=0.09,
               source="arXiv 2606.13361: 80M agents, one 3774-token document, 0.54 GB of fp16 KV")


@dataclass(frozen=True)
class Outcome:
    """The model's outputs for one set of inputs."""

    prefill_per_load: float
    reuse_compute_per_load: float
    hosted_per_load: float
    egress_per_load: float
    shipped_per_load: float
    egress_over_prefill: float  # the paper's "2.6x the prefill it saves"
    publish_cost: float
    hosting_cost: float
    re_prefill_total: float
    hosted_total: float
    shipped_total: float
    hosted_saving_ratio: float  # re-prefill / hosted (the paper's 49.7x)
    shipped_saving_ratio: float
    breakeven_hosted: float | None  # reuses until hosting next to compute pays (the paper: ~1); None: never
    breakeven_shipped: float | None


def _breakeven(fixed: float, per_load: float, prefill: float) -> float | None:
    """Reuses n at which fixed + n x per_load = n x prefill (the publisher's prefill and hosting are paid
    back); None when a reuse costs at least a prefill, so no number of reuses pays."""
    if per_load >= prefill:
        return None
    return fixed / (prefill - per_load)


def totals(i: Inputs, agents: float) -> tuple[float, float, float]:
    """(re-prefill, hosted reuse, shipped reuse) in $ for `agents` loads."""
    o = evaluate(replace(i, agents=agents))
    return o.re_prefill_total, o.hosted_total, o.shipped_total


def evaluate(i: Inputs) -> Outcome:
    prefill = i.doc_tokens * i.price_per_token
    compute = prefill / i.compute_ratio
    hosted = prefill * i.tariff + i.license_fee
    egress = i.kv_gb * i.egress_per_gb
    shipped = compute + egress + i.license_fee
    hosting = i.kv_gb * i.hosting_per_gb_month * i.hosting_months
    fixed = prefill + hosting  # the publisher prefills once and keeps the KV hosted
    re_total = i.agents * prefill
    hosted_total = fixed + i.agents * hosted
    shipped_total = fixed + i.agents * shipped
    return Outcome(
        prefill_per_load=prefill, reuse_compute_per_load=compute, hosted_per_load=hosted, egress_per_load=egress,
        shipped_per_load=shipped, egress_over_prefill=egress / prefill, publish_cost=prefill, hosting_cost=hosting,
        re_prefill_total=re_total, hosted_total=hosted_total, shipped_total=shipped_total,
        hosted_saving_ratio=re_total / hosted_total, shipped_saving_ratio=re_total / shipped_total,
        breakeven_hosted=_breakeven(fixed, hosted, prefill), breakeven_shipped=_breakeven(fixed, shipped, prefill),
    )


# -- kvnet's measured table -------------------------------------------------------------------------------


def from_table(table: dict[str, Any], *, price_per_hour: float, doc_tokens: int | None = None,
               path: str = "local", **overrides: Any) -> Inputs:
    """Inputs from bench.paper_table's JSON: the row at `doc_tokens` (default: the longest), its measured
    prefill throughput priced at `price_per_hour`, and R = its measured prefill / `path` reuse time ratio."""
    rows = {r["tokens"]: r for r in table["rows"]}
    n = doc_tokens if doc_tokens is not None else max(rows)
    if n not in rows:
        raise SystemExit(f"the table has no row for {n} tokens (it has {sorted(rows)})")
    r = rows[n]
    tok_per_s = (r["tokens"] + r["question_tokens"]) / r["prefill_s"]["median"]
    where = table["machine"].get("gpu") or f"{table['machine']['cpu']} x{table['machine']['torch_threads']}"
    return replace(Inputs(
        label=f"kvnet measured ({table['model']} {table['dtype']}, {where})",
        price_per_token=price_per_hour / 3600 / tok_per_s, doc_tokens=n, kv_gb=r["kv_bytes"] / 1e9,
        compute_ratio=r[f"ratio_{path}"],
        source=(f"{table['model']} {table['dtype']} on {table['device']}: prefill {tok_per_s:.0f} tokens/s at {n} "
                f"tokens, priced at ${price_per_hour}/h; R = measured prefill / {path} reuse time"),
    ), **overrides)


# -- output -----------------------------------------------------------------------------------------------


def _money(x: float) -> str:
    if x >= 1e6:
        return f"${x / 1e6:,.2f}M"
    if x >= 1:
        return f"${x:,.2f}"
    return f"${x:.5f}"


def rows_for(i: Inputs, o: Outcome) -> list[tuple[str, str]]:
    return [
        ("agents (loads)", f"{i.agents:,.0f}"),
        ("document tokens", f"{i.doc_tokens:,}"),
        ("prefill price", f"${i.price_per_token * 1e6:.4f} per M tokens"),
        ("KV size", f"{i.kv_gb:.3f} GB"),
        ("reuse compute advantage R", f"{i.compute_ratio:.1f}x"),
        ("cached-read tariff", f"{i.tariff:.4f} of the prefill price"),
        ("egress", f"${i.egress_per_gb}/GB"),
        ("license fee / hosting", f"${i.license_fee}/load, ${i.hosting_per_gb_month}/GB-month x {i.hosting_months}"),
        ("prefill per load", _money(o.prefill_per_load)),
        ("reuse per load, hosted next to compute", _money(o.hosted_per_load)),
        ("reuse per load, KV shipped", f"{_money(o.shipped_per_load)} (egress {_money(o.egress_per_load)}, "
                                       f"{o.egress_over_prefill:.2f}x the prefill)"),
        ("re-prefill, total", _money(o.re_prefill_total)),
        ("reuse hosted next to compute, total", f"{_money(o.hosted_total)} ({o.hosted_saving_ratio:.1f}x cheaper)"),
        ("reuse with KV shipped per load, total", f"{_money(o.shipped_total)} ({o.shipped_saving_ratio:.2f}x)"),
        ("break-even reuses, hosted", _reuses(o.breakeven_hosted)),
        ("break-even reuses, shipped", _reuses(o.breakeven_shipped)),
    ]


def _reuses(n: float | None) -> str:
    return "never (a load costs more than a prefill)" if n is None else f"{n:.2f}"


def rich_table(i: Inputs, o: Outcome) -> Table:
    t = Table("", "value", title=i.label, caption=i.source)
    for k, v in rows_for(i, o):
        t.add_row(k, v)
    return t


def markdown(cases: list[tuple[Inputs, Outcome]], command: str) -> str:
    head = "| | " + " | ".join(i.label for i, _ in cases) + " |"
    lines = [head, "|---" * (len(cases) + 1) + "|"]
    table = [rows_for(i, o) for i, o in cases]
    for j, (name, _) in enumerate(table[0]):
        lines.append(f"| {name} | " + " | ".join(t[j][1] for t in table) + " |")
    lines += [""] + [f"- {i.label}: {i.source}" for i, _ in cases] + ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def plot(cases: list[Inputs], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [10 ** (k / 4) for k in range(0, 37)]  # 1 .. 1e9
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.2), squeeze=False)
    for ax, i in zip(axes[0], cases, strict=True):
        curves = list(zip(*(totals(i, a) for a in agents), strict=True))
        for ys, label, style in zip(curves, ("re-prefill per agent", "reuse, KV hosted next to compute",
                                             "reuse, KV shipped per load"), ("-", "-", "--"), strict=True):
            ax.plot(agents, ys, style, label=label)
        ax.axvline(i.agents, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("agents reading the document")
        ax.set_ylabel("total cost, $")
        ax.set_title(i.label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[tuple[Inputs, Outcome]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="the paper's 80M-agent example (default if no --table)")
    ap.add_argument("--table", type=Path, help="bench.paper_table JSON: price kvnet's measured figures")
    ap.add_argument("--path", choices=["local", "peer"], default="local",
                    help="which measured reuse time gives R (default local: the KV hosted next to compute)")
    ap.add_argument("--price-per-mtok", type=float, help="prefill $ per million tokens (paper example: 5.0)")
    ap.add_argument("--price-per-hour", type=float, default=2.0,
                    help="$ per hour of the machine whose throughput is used (--table, or --prefill-tok-s)")
    ap.add_argument("--prefill-tok-s", type=float, help="prefill throughput, tokens/s (with --price-per-hour)")
    ap.add_argument("--flops-price", type=float, help="$ per PFLOP of prefill (with --model)")
    ap.add_argument("--model", default="qwen3-4b-shape", help="config whose FLOPs --flops-price prices")
    ap.add_argument("--agents", type=float)
    ap.add_argument("--doc-tokens", type=int)
    ap.add_argument("--kv-gb", type=float)
    ap.add_argument("--compute-ratio", type=float, help="R, prefill compute over reuse compute")
    ap.add_argument("--egress-per-gb", type=float)
    ap.add_argument("--cached-read-fraction", type=float, help="provider's cached-read tariff (default: 1/R)")
    ap.add_argument("--license-fee", type=float, help="kvnet license fee, $ per load")
    ap.add_argument("--hosting-per-gb-month", type=float)
    ap.add_argument("--hosting-months", type=float)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)

    given = {k: getattr(args, k) for k in ("agents", "doc_tokens", "kv_gb", "compute_ratio", "egress_per_gb",
                                           "cached_read_fraction", "license_fee", "hosting_per_gb_month",
                                           "hosting_months") if getattr(args, k) is not None}
    price = _price(args, given.get("doc_tokens", PAPER.doc_tokens))
    cases: list[Inputs] = []
    if args.paper or args.table is None:
        base = replace(PAPER, **given)
        if price is not None:
            base = replace(base, price_per_token=price, label="paper model, your inputs")
        cases.append(base)
    if args.table is not None:
        table = json.loads(args.table.read_text())
        measured = from_table(table, price_per_hour=args.price_per_hour, doc_tokens=given.get("doc_tokens"),
                              path=args.path, **{k: v for k, v in given.items() if k != "doc_tokens"})
        cases.append(measured)
    results = [(i, evaluate(i)) for i in cases]
    for i, o in results:
        console.print(rich_table(i, o))
    command = " ".join(["python -m bench.economics", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema": "kvnet/bench/economics/v1", "command": command,
                                         "cases": [{"inputs": asdict(i), "tariff": i.tariff, "outcome": asdict(o)}
                                                   for i, o in results]}, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(results, command))
    if args.png:
        plot(cases, args.png)
    return results


def _price(args: argparse.Namespace, doc_tokens: int) -> float | None:
    """$ per prefill token from whichever pricing flags were given (None: keep the example's)."""
    if args.price_per_mtok is not None:
        return args.price_per_mtok / 1e6
    if args.prefill_tok_s is not None:
        return args.price_per_hour / 3600 / args.prefill_tok_s
    if args.flops_price is not None:
        from bench._flops import prefill_flops
        from kvnet.models import SYNTHETIC_CONFIGS

        if args.model not in SYNTHETIC_CONFIGS:
            raise SystemExit(f"--model must be one of {', '.join(SYNTHETIC_CONFIGS)} for --flops-price")
        flops = prefill_flops(SYNTHETIC_CONFIGS[args.model], doc_tokens, 0).total
        return args.flops_price * flops / 1e15 / doc_tokens
    return None


if __name__ == "__main__":
    main()
