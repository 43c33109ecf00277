"""Publish and load times versus prefill, for a synthetic Qwen3 at several document lengths.

    .venv/bin/python bench/publish_load.py --model qwen3-0.6b-shape --lengths 1024 2048

Prints a table, writes bench/out/publish_load.json and (with matplotlib: pip install -e '.[bench]')
bench/out/publish_load.png. Every ratio is measured in this one run; load times are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from kvnet.engine import Engine
from kvnet.exactness import SUFFIX_TEXT, seeded_document
from kvnet.models import SYNTHETIC_CONFIGS
from kvnet.publish import publish_tokens
from kvnet.reuse import load_prefix
from kvnet.store import Store

console = Console()


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def measure(engine: Engine, n: int, repeats: int) -> dict:
    doc = seeded_document(engine.tokenizer, n, seed=n)
    suffix = engine.tokenizer.encode(SUFFIX_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp)) as store:
            pub = publish_tokens(engine, store, Ed25519PrivateKey.generate(), doc)
        loads, reuses, fulls = [], [], []
        for _ in range(repeats):
            with Store(Path(tmp)) as store:  # a fresh handle each time, as a new process would open it
                kv, t_load = timed(lambda s=store: load_prefix(engine, s, pub.manifest_id))
            _, t_first = timed(lambda kv=kv: engine.generate_from(kv, suffix, 1))
            _, t_full = timed(lambda: engine.generate_from(None, doc + suffix, 1))
            loads.append(t_load)
            reuses.append(t_load + t_first)
            fulls.append(t_full)
    m = pub.signed.manifest
    return {
        "tokens": n, "bytes": m.total_bytes, "bytes_per_token": m.bytes_per_token,
        "publish_prefill_s": pub.prefill_s, "publish_total_s": pub.total_s,
        "load_s": statistics.median(loads), "reuse_first_token_s": statistics.median(reuses),
        "full_prefill_first_token_s": statistics.median(fulls),
        "speedup": statistics.median(fulls) / statistics.median(reuses),
        "suffix_tokens": len(suffix),
    }


def kv_sizes() -> Table:
    t = Table("model", "layers", "kv heads", "head dim", "bf16 B/token", "fp32 B/token", title="KV size (from config)")
    for name, c in SYNTHETIC_CONFIGS.items():
        per = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * c["head_dim"]
        t.add_row(name, str(c["num_hidden_layers"]), str(c["num_key_value_heads"]), str(c["head_dim"]),
                  f"{per * 2:,}", f"{per * 4:,}")
    return t


def plot(rows: list[dict], model: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["full_prefill_first_token_s"] for r in rows], "o-", label="full prefill → first token")
    ax.plot(x, [r["reuse_first_token_s"] for r in rows], "o-", label="load KV + suffix → first token")
    ax.plot(x, [r["load_s"] for r in rows], "o--", label="load verified KV from store")
    ax.set_xlabel("document tokens")
    ax.set_ylabel("seconds")
    ax.set_title(f"{model}: reuse vs prefill ({torch.get_num_threads()} threads, CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b-shape")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()

    console.print(kv_sizes())
    engine = Engine(args.model, args.dtype, progress=console.print)
    rows = []
    for n in args.lengths:
        with console.status(f"{args.model} {args.dtype}: {n} tokens"):
            rows.append(measure(engine, n, args.repeats))
    t = Table("tokens", "artifact MB", "B/token", "publish: prefill s", "publish: total s", "load s",
              "reuse→1st token s", "prefill→1st token s", "speedup",
              title=f"{args.model} {args.dtype}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    for r in rows:
        t.add_row(str(r["tokens"]), f"{r['bytes'] / 1e6:.1f}", f"{r['bytes_per_token']:,}",
                  f"{r['publish_prefill_s']:.2f}", f"{r['publish_total_s']:.2f}", f"{r['load_s']:.3f}",
                  f"{r['reuse_first_token_s']:.3f}", f"{r['full_prefill_first_token_s']:.2f}",
                  f"{r['speedup']:.1f}x")
    console.print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish_load.json").write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                                             "rows": rows}, indent=2))
    if plot(rows, args.model, args.out / "publish_load.png"):
        console.print(f"plot: {args.out / 'publish_load.png'}")


if __name__ == "__main__":
    main()
