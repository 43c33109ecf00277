"""The paper's table, measured: full prefill versus reuse from the local store and from a peer.

    python -m bench.paper_table --model qwen3-0.6b-shape --lengths 255,512,1024,2048,3774 --runs 3 \
        --json docs/figures/paper_table.json --md docs/figures/paper_table.md --png docs/figures/paper_table.png

Per document length L (a seeded document, then a fixed question of Q tokens), min/median/max over --runs:
  - prefill: one forward pass of document + question, up to the first answer token (time to first token);
  - local reuse: verified load of the document's KV from a store on disk + the question's pass + first token;
  - peer reuse: a fresh fetch-only node that knows only a bootstrap node (a `kvnet serve` process) finds
    the artifact in the DHT by the prompt's chain keys, held by a provider (a second `kvnet serve` process,
    over libp2p on loopback), fetches it (each piece verified, stored durably), then loads it verified from
    its own store + the question's pass + first token. Joining the network (dialing the bootstrap peer, one
    routing refresh) is timed apart (`peer_join_s`): an agent's node joins once, not per document;
  - FLOPs of both passes counted from the config (bench/_flops.py), and their ratio next to the measured ones;
  - exactness: every reused answer (--answer-tokens greedy tokens) is compared token for token with the full
    prefill's, in every run; the first token's largest logit difference is reported too.

Synthetic weights (seeded random) give the architecture's true cost; they say nothing of a trained model's
answers. The document and question are byte-tokenized, so Q is the question's length in bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._flops import prefill_flops, reuse_flops  # noqa: E402
from kvnet import identity  # noqa: E402
from kvnet.engine import KV, Engine, Generation  # noqa: E402
from kvnet.exactness import SUFFIX_TEXT, seeded_document  # noqa: E402
from kvnet.models import SYNTHETIC_CONFIGS  # noqa: E402
from kvnet.publish import publish_tokens  # noqa: E402
from kvnet.reuse import load_prefix  # noqa: E402
from kvnet.store import Store  # noqa: E402
from tests.artifacts import serve_process  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 220)
DEFAULT_LENGTHS = "255,512,1024,2048,3774"
SCHEMA = "kvnet/bench/paper_table/v1"


# -- the engine on a device ----------------------------------------------------------------------------


class DeviceEngine(Engine):
    """kvnet's Engine with the model on `device` (cpu or cuda).

    kvnet's own engine runs on the CPU; the benchmark needs the same code path on a GPU. Only the forward
    pass changes (token ids and positions are made on the device); KV loaded from a store lives in host
    memory and is copied to the device as part of the timed load (`to_device`), as any real loader must.
    """

    def __init__(self, ref: str, dtype: str, device: str, progress: Callable[[str], None] | None = None) -> None:
        super().__init__(ref, dtype, progress)
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.model.to(self.device)
            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
            self.profile = {**self.profile, "device": f"{self.device.type}-{name}"}

    @torch.inference_mode()
    def _forward(self, tokens: list[int], cache: Any, start: int, on_layer: Callable[[int], None] | None):
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(tokens), dtype=torch.long, device=self.device).unsqueeze(0)
        return self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)

    def to_device(self, kv: KV) -> KV:
        if self.device.type == "cpu":
            return kv
        return KV([k.to(self.device) for k in kv.keys], [v.to(self.device) for v in kv.values])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- one measured answer --------------------------------------------------------------------------------


@dataclass
class Answer:
    """A greedy answer and the time to its first token (the rest is generated untimed, for exactness)."""

    seconds: float
    load_s: float  # of which loading the KV (zero for a full prefill)
    tokens: list[int]
    first_logits: torch.Tensor


def answer(engine: DeviceEngine, kv_fn: Callable[[], KV | None], suffix: list[int], n_tokens: int,
           extra_s: float = 0.0) -> Answer:
    """Time `kv_fn()` (load, or nothing) + the suffix's pass + the first token; then finish the answer."""
    engine.sync()
    t0 = time.perf_counter()
    kv = kv_fn()
    engine.sync()
    load_s = time.perf_counter() - t0
    first: Generation = engine.generate_from(kv, suffix, 1, return_logits=True)  # int(argmax) syncs
    seconds = time.perf_counter() - t0 + extra_s
    tokens = list(first.tokens)
    if n_tokens > 1:
        tokens += engine.generate_from(first.kv, tokens[-1:], n_tokens - 1).tokens
    return Answer(seconds, load_s, tokens, first.logits[0].cpu())


@dataclass
class PeerFetch:
    join_s: float
    find_s: float
    fetch_s: float
    bytes: int
    paths: list[str]
    manifest_id: bytes
    n_tokens: int
    discovery: str  # "prompt prefix" or "manifest id"


async def _peer_fetch(home: Path, bootstrap: str, model_id: bytes, prompt: list[int],
                      manifest_id: bytes) -> PeerFetch:
    """A fresh fetch-only node: join through `bootstrap`, find the prompt's longest prefix, fetch it.

    Prefix search finds announced boundaries of 1, 2, 4, ... whole blocks (256 tokens by default), so a
    prompt whose document is shorter than one block has none: that document is found by its manifest id
    (as `kvnet fetch --manifest` finds it), and the row says so."""
    from kvnet.p2p.node import Node

    node = Node(identity.load(home / "identity.key"), Store(home / "store"), bootstrap=[bootstrap],
                scores_path=home / "scores.sqlite", timeout=10.0)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(partial(node.run, announce=False))
        t1 = trio.current_time()
        found, how = await node.find(model_id, prompt), "prompt prefix"
        if found is None:  # no announced boundary in the prompt (shorter than one block): ask by id
            found, how = await node.find_manifest(manifest_id), "manifest id"
        if found is None:
            raise RuntimeError("the peer's artifact was not found in the DHT")
        t2 = trio.current_time()
        result = await node.fetch(found, found.n_tokens)
        t3 = trio.current_time()
        nursery.cancel_scope.cancel()
    node.store.close()
    return PeerFetch(t1 - t0, t2 - t1, t3 - t2, result.bytes, sorted(set(result.paths.values())),
                     found.signed.id, found.n_tokens, how)


# -- one length -----------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": xs}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Bench:
    """Everything one table needs: the engine, a local store, a provider node process."""

    def __init__(self, engine: DeviceEngine, workdir: Path, answer_tokens: int) -> None:
        self.engine = engine
        self.workdir = workdir
        self.answer_tokens = answer_tokens
        self.suffix = engine.tokenizer.encode(SUFFIX_TEXT)
        self.key = Ed25519PrivateKey.generate()
        self.local = workdir / "local"
        self.provider = workdir / "provider"
        self.bootstrap = workdir / "bootstrap"
        for home in (self.provider, self.bootstrap):
            identity.generate(home / "identity.key")
        self.procs: list[subprocess.Popen] = []
        self.addr = ""
        self.published: dict[int, dict[str, Any]] = {}

    def publish(self, n: int) -> None:
        """Prefill and store the length-n document locally, and give the provider the same artifact."""
        doc = seeded_document(self.engine.tokenizer, n, seed=n)
        with Store(self.local) as store:
            pub = publish_tokens(self.engine, store, self.key, doc)
            pieces = [(i, store.read_piece(pub.manifest_id, i, verify=True))
                      for i in range(len(pub.signed.manifest.pieces))]
        with Store(self.provider / "store") as store:
            store.put_manifest(pub.signed.raw)
            for start in range(0, len(pieces), 16):
                store.put_pieces(pub.manifest_id, pieces[start:start + 16])
        m = pub.signed.manifest
        self.published[n] = {"doc": doc, "mid": pub.manifest_id, "bytes": m.total_bytes,
                             "bytes_per_token": m.bytes_per_token, "pieces": len(m.pieces),
                             "publish_prefill_s": pub.prefill_s, "publish_total_s": pub.total_s}

    def start_provider(self) -> None:
        """Two `kvnet serve` processes: a bootstrap node B, and the provider P that knows only B and
        announces everything it holds (its provider records land on B, as on any real network where
        the provider is not the node a fetcher first dials). Fetchers know only B."""
        b, self.addr = serve_process(self.bootstrap)
        self.procs.append(b)
        p, _ = serve_process(self.provider, self.addr)
        self.procs.append(p)

    def stop_provider(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def full(self, n: int) -> Answer:
        doc = self.published[n]["doc"]
        return answer(self.engine, lambda: None, doc + self.suffix, self.answer_tokens)

    def local_reuse(self, n: int) -> Answer:
        mid = self.published[n]["mid"]

        def load() -> KV:
            with Store(self.local) as store:  # a fresh handle, as a new process would open it
                return self.engine.to_device(load_prefix(self.engine, store, mid, n))

        return answer(self.engine, load, self.suffix, self.answer_tokens)

    def peer_reuse(self, n: int, run: int) -> tuple[Answer, PeerFetch]:
        doc = self.published[n]["doc"]
        home = self.workdir / f"fetcher-{n}-{run}"
        identity.generate(home / "identity.key")
        got = trio.run(_peer_fetch, home, self.addr, self.engine.model_id, doc + self.suffix,
                       self.published[n]["mid"])
        if got.manifest_id != self.published[n]["mid"] or got.n_tokens != n:
            raise RuntimeError(f"the DHT found {got.n_tokens} tokens of {got.manifest_id.hex()[:16]}, "
                               f"not the {n}-token artifact")

        def load() -> KV:
            with Store(home / "store") as store:
                return self.engine.to_device(load_prefix(self.engine, store, got.manifest_id, n))

        ans = answer(self.engine, load, self.suffix, self.answer_tokens, extra_s=got.find_s + got.fetch_s)
        shutil.rmtree(home, ignore_errors=True)
        return ans, got


def measure_length(bench: Bench, n: int, runs: int, config: dict[str, Any], memcpy_gbps: float,
                   step: Callable[[str], None]) -> dict[str, Any]:
    """All runs at one length, and the row the table shows."""
    pub = bench.published[n]
    full_s, local_s, peer_s, join_s, find_s, fetch_s, load_s, peer_load_s = [], [], [], [], [], [], [], []
    exact_local, exact_peer, diff_local, diff_peer, paths, found_by = [], [], [], [], set(), set()
    finite: list[bool] = []  # fp16 with random weights can overflow: NaN logits would make "exact" vacuous
    for run in range(runs):
        step(f"{n} tokens, run {run + 1}: prefill")
        full = bench.full(n)
        step(f"{n} tokens, run {run + 1}: local reuse")
        local = bench.local_reuse(n)
        step(f"{n} tokens, run {run + 1}: peer reuse")
        peer, got = bench.peer_reuse(n, run)
        full_s.append(full.seconds)
        local_s.append(local.seconds)
        peer_s.append(peer.seconds)
        load_s.append(local.load_s)
        peer_load_s.append(peer.load_s)
        join_s.append(got.join_s)
        find_s.append(got.find_s)
        fetch_s.append(got.fetch_s)
        paths.update(got.paths)
        found_by.add(got.discovery)
        exact_local.append(local.tokens == full.tokens)
        exact_peer.append(peer.tokens == full.tokens)
        diff_local.append(_max_diff(local.first_logits, full.first_logits))
        diff_peer.append(_max_diff(peer.first_logits, full.first_logits))
        finite.append(all(bool(torch.isfinite(a.first_logits).all()) for a in (full, local, peer)))
    q = len(bench.suffix)
    fl_pre, fl_re = prefill_flops(config, n, q), reuse_flops(config, n, q)
    med_full, med_local, med_peer = (statistics.median(x) for x in (full_s, local_s, peer_s))
    saved = med_full - med_local
    return {
        "tokens": n, "question_tokens": q, "answer_tokens": bench.answer_tokens,
        "kv_bytes": pub["bytes"], "kv_bytes_per_token": pub["bytes_per_token"], "pieces": pub["pieces"],
        "publish_prefill_s": pub["publish_prefill_s"], "publish_total_s": pub["publish_total_s"],
        "prefill_s": _stats(full_s), "local_reuse_s": _stats(local_s), "peer_reuse_s": _stats(peer_s),
        "local_load_s": _stats(load_s), "peer_load_s": _stats(peer_load_s),
        "peer_join_s": _stats(join_s), "peer_find_s": _stats(find_s), "peer_fetch_s": _stats(fetch_s),
        "peer_paths": sorted(paths), "peer_discovery": sorted(found_by),
        "fetch_MBps": pub["bytes"] / 1e6 / statistics.median(fetch_s),
        "flops_prefill": fl_pre.total, "flops_reuse": fl_re.total,
        "flops_prefill_attention": fl_pre.attention,
        "flops_ratio": fl_pre.total / fl_re.total,
        "ratio_local": med_full / med_local, "ratio_peer": med_full / med_peer,
        "exact_local": all(exact_local), "exact_peer": all(exact_peer),
        "exact_local_runs": sum(exact_local), "exact_peer_runs": sum(exact_peer), "runs": runs,
        "first_logit_max_diff_local": max(diff_local), "first_logit_max_diff_peer": max(diff_peer),
        "logits_finite": all(finite),
        # physical floors: a local load cannot beat one memory copy of the KV; a fetch is worth it over a
        # link of B bytes/s while kv_bytes / B < the time reuse saves (prefill - local reuse)
        "load_floor_s": pub["bytes"] / (memcpy_gbps * 1e9),
        "breakeven_link_MBps": pub["bytes"] / 1e6 / saved if saved > 0 else None,
    }


# -- machine facts --------------------------------------------------------------------------------------


def memcpy_gbps(mb: int = 256) -> float:
    """Host memory copy bandwidth (best of 3), the floor under any local KV load."""
    src = torch.empty(mb << 20, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return (mb << 20) / best / 1e9


def h2d_gbps(device: torch.device, mb: int = 256) -> float | None:
    """Host-to-device copy bandwidth from pageable memory (as loaded KV is), best of 3; None on the CPU."""
    if device.type != "cuda":
        return None
    src = torch.ones(mb << 20, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        src.to(device)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return (mb << 20) / best / 1e9


def machine(engine: DeviceEngine) -> dict[str, Any]:
    import transformers

    try:
        from importlib.metadata import version

        libp2p = version("libp2p")
    except Exception:  # noqa: BLE001 - the version is informative only
        libp2p = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "libp2p": libp2p,
           "device": str(engine.device), "profile": engine.profile}
    if engine.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(engine.device)
        out["cuda"] = torch.version.cuda
        out["h2d_GBps"] = h2d_gbps(engine.device)
    return out


# -- output ---------------------------------------------------------------------------------------------


def _mmm(s: dict[str, Any]) -> str:
    return f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}"


def _exact(r: dict[str, Any], path: str) -> str:
    word = "yes" if r[f"exact_{path}"] else "NO"
    if not r.get("logits_finite", True):
        word += ", logits not finite (overflow): vacuous"
    return f"{word} ({r[f'exact_{path}_runs']}/{r['runs']})"


COLUMNS = ("tokens", "KV MB", "KB/token", "prefill s (min/med/max)", "local reuse s", "of which load s (floor)",
           "peer reuse s",
           "prefill/local", "prefill/peer", "FLOPs ratio", "exact local", "exact peer", "fetch MB/s",
           "break-even link MB/s", "peer found by")


def row_cells(r: dict[str, Any]) -> list[str]:
    link = r["breakeven_link_MBps"]
    return [str(r["tokens"]), f"{r['kv_bytes'] / 1e6:.1f}", f"{r['kv_bytes_per_token'] / 1e3:.1f}",
            _mmm(r["prefill_s"]), _mmm(r["local_reuse_s"]),
            f"{r['local_load_s']['median']:.3f} ({r['load_floor_s']:.3f})", _mmm(r["peer_reuse_s"]),
            f"{r['ratio_local']:.1f}x", f"{r['ratio_peer']:.2f}x", f"{r['flops_ratio']:.1f}x",
            _exact(r, "local"), _exact(r, "peer"), f"{r['fetch_MBps']:.0f}",
            f"{link:.0f}" if link is not None else "never",
            ", ".join("prefix" if d == "prompt prefix" else "id" for d in r["peer_discovery"])]


def title(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    return (f"{report['model']} {report['dtype']} on {report['device']} ({where}); question {report['question_tokens']}"
            f" tokens; min/median/max of {report['runs']} runs")


def rich_table(report: dict[str, Any]) -> Table:
    t = Table(*COLUMNS, title=title(report))
    for r in report["rows"]:
        t.add_row(*row_cells(r))
    return t


def markdown(report: dict[str, Any]) -> str:
    lines = [f"**{title(report)}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in report["rows"]]
    m = report["machine"]
    paths = ", ".join(sorted({p for r in report["rows"] for p in r["peer_paths"]}))
    lines += ["", f"Machine: {m['platform']}; {m['cpu']} ({m['cpu_count']} cores, torch threads "
              f"{m['torch_threads']}){'; GPU ' + m['gpu'] if 'gpu' in m else ''}; Python {m['python']}, torch "
              f"{m['torch']}, transformers {m['transformers']}, libp2p {m['libp2p']}. Host memcpy "
              f"{report['memcpy_GBps']:.1f} GB/s. Peer path: {paths}; "
              f"joining the network (not in peer reuse) took "
              f"{statistics.median(r['peer_join_s']['median'] for r in report['rows']):.2f} s (median).",
              "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("prefill_s", "full prefill", "o-"), ("local_reuse_s", "reuse, local store", "s-"),
                              ("peer_reuse_s", "reuse, from a peer (libp2p)", "^-")):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["min"] for m, r in zip(med, rows, strict=True)],
               [r[key]["max"] - m for m, r in zip(med, rows, strict=True)]]
        ax1.errorbar(x, med, yerr=err, fmt=style, capsize=3, label=label)
    ax1.set_xlabel("document tokens")
    ax1.set_ylabel("seconds to first token")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend()
    ax1.set_title("time to first token")
    ax2.plot(x, [r["ratio_local"] for r in rows], "s-", label="prefill / local reuse (time)")
    ax2.plot(x, [r["ratio_peer"] for r in rows], "^-", label="prefill / peer reuse (time)")
    ax2.plot(x, [r["flops_ratio"] for r in rows], "k--", label="prefill / reuse (FLOPs)")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xlabel("document tokens")
    ax2.set_ylabel("ratio")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend()
    ax2.set_title("how much cheaper reuse is")
    fig.suptitle(f"{report['model']} {report['dtype']} on {report.get('machine', {}).get('gpu') or report['device']}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise SystemExit("--lengths needs at least one positive length")
    return lengths


def run(model: str, lengths: list[int], dtype: str, runs: int, device: str, answer_tokens: int,
        command: str) -> dict[str, Any]:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    engine = DeviceEngine(model, dtype, device, progress=console.print)
    config = SYNTHETIC_CONFIGS.get(model) or json.loads((engine.resolved.folder / "config.json").read_text())
    bw = memcpy_gbps()
    total = len(lengths) * (1 + 3 * runs) + 2
    with tempfile.TemporaryDirectory(prefix="kvnet-paper-") as tmp, Progress(
        TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as prog:
        task = prog.add_task("warm-up", total=total)

        def step(what: str) -> None:
            prog.update(task, description=what, advance=1)

        bench = Bench(engine, Path(tmp), answer_tokens)
        engine.generate_from(None, bench.suffix + bench.suffix, 2)  # first-call costs (allocator, kernels)
        for n in lengths:
            step(f"{n} tokens: publish")
            bench.publish(n)
        step("starting the provider node")
        bench.start_provider()
        try:
            rows = [measure_length(bench, n, runs, config, bw, step) for n in lengths]
        finally:
            bench.stop_provider()
        prog.update(task, description="done", completed=total)
    return {"schema": SCHEMA, "model": model, "dtype": dtype, "device": device, "runs": runs,
            "question_tokens": len(bench.suffix), "answer_tokens": answer_tokens, "memcpy_GBps": bw,
            "model_id": engine.model_id.hex(), "machine": machine(engine), "command": command,
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b-shape", help="a model ref (built-in synthetic name or folder)")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"document lengths, comma-separated ({DEFAULT_LENGTHS})")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--answer-tokens", type=int, default=24, help="greedy tokens compared for exactness")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    if args.runs < 1 or args.answer_tokens < 1:
        raise SystemExit("--runs and --answer-tokens must be at least 1")
    shown = " ".join(["python -m bench.paper_table", *(argv if argv is not None else sys.argv[1:])])
    report = run(args.model, parse_lengths(args.lengths), args.dtype, args.runs, args.device, args.answer_tokens,
                 shown)
    console.print(rich_table(report))
    for path, text in ((args.json, json.dumps(report, indent=2)), (args.md, markdown(report))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            console.print(f"wrote {path}")
    if args.png is not None:
        plot(report, args.png)
        console.print(f"wrote {args.png}")
    return report


if __name__ == "__main__":
    main()
