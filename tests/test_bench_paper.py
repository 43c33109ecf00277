"""Issue 11's benchmarks stay working: the paper's table on `tiny` (real engine, real store, real
`kvnet serve` processes over libp2p), the FLOPs count against a hand computation, the economics against
the paper's figures, and the GPU script's dry run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import economics
from bench._flops import forward_flops, prefill_flops, reuse_flops
from kvnet.models import SYNTHETIC_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


# -- FLOPs ----------------------------------------------------------------------------------------------

TOY = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
       "intermediate_size": 16, "num_hidden_layers": 3, "vocab_size": 10}


def test_flops_match_a_hand_count():
    """3 layers, h=8, 2 query heads and 1 KV head of 4 dims, I=16, V=10; 5 new tokens after 2 cached.

    Per layer and token: q 8x8, k 8x4, v 8x4, o 8x8 -> 192 MACs; MLP 3 x 8x16 -> 384 MACs.
    Attention pairs: new tokens see 3, 4, 5, 6, 7 keys -> 25 pairs, each 2 heads x 4 dims for QK and
    again for AV -> 16 MACs per pair. LM head: one position, 8x10 -> 80 MACs. FLOPs = 2 x MACs.
    """
    f = forward_flops(TOY, new_tokens=5, cached_tokens=2)
    assert f.projections == 2 * 3 * 5 * 192 == 5760
    assert f.mlp == 2 * 3 * 5 * 384 == 11520
    assert f.attention == 2 * 3 * 25 * 16 == 2400
    assert f.lm_head == 2 * 80 == 160
    assert f.total == 5760 + 11520 + 2400 + 160


def test_flops_prefill_and_reuse_split_one_pass():
    """Prefill of L + Q in one pass costs the document's pass plus the question's pass after it, less one
    LM head (only the last position's logits are computed): the attention term is additive."""
    cfg = SYNTHETIC_CONFIGS["qwen3-0.6b-shape"]
    whole = prefill_flops(cfg, 3774, 77)
    doc, q = forward_flops(cfg, 3774), reuse_flops(cfg, 3774, 77)
    assert whole.attention == doc.attention + q.attention
    assert whole.total == doc.total + q.total - whole.lm_head
    assert whole.total / q.total > 30  # the gap the paper reports, from the L^2 term and L/Q


# -- economics ------------------------------------------------------------------------------------------


def test_economics_reproduces_the_papers_80m_agent_example():
    o = economics.evaluate(economics.PAPER)
    assert o.re_prefill_total == pytest.approx(1.5e6, rel=0.02)  # "about $1.5M to re-prefill"
    assert o.hosted_total == pytest.approx(0.03e6, rel=0.02)  # "$0.03M to reuse"
    assert round(o.hosted_saving_ratio, 1) == 49.7
    assert round(o.egress_per_load, 3) == 0.049  # "$0.049 per 0.54 GB load"
    assert round(o.egress_over_prefill, 1) == 2.6  # "2.6x the prefill"
    assert o.breakeven_hosted == pytest.approx(1.0, abs=0.05)  # "break-even is about one reuse"
    assert o.breakeven_shipped is None  # shipping per load never pays at these prices


def test_economics_cli_prices_a_measured_table(tmp_path):
    """From a table's JSON: R is the measured prefill / local reuse ratio, the price per token comes from
    the measured throughput and the hourly price; break-even follows from both."""
    table = {"model": "m", "dtype": "bf16", "device": "cpu", "machine": {"cpu": "c", "torch_threads": 2},
             "rows": [{"tokens": 1000, "question_tokens": 100, "kv_bytes": 2_000_000_000,
                       "prefill_s": {"median": 11.0}, "ratio_local": 20.0, "ratio_peer": 0.5}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    (_, paper), (inputs, o) = economics.main(["--paper", "--table", str(path), "--price-per-hour", "3.6",
                                              "--json", str(tmp_path / "e.json"), "--md", str(tmp_path / "e.md"),
                                              "--png", str(tmp_path / "e.png")])
    assert inputs.price_per_token == pytest.approx(3.6 / 3600 / 100)  # 1100 tokens in 11 s
    assert o.prefill_per_load == pytest.approx(1000 * 1e-5)
    assert o.hosted_per_load == pytest.approx(o.prefill_per_load / 20)
    assert o.egress_per_load == pytest.approx(2.0 * 0.09)
    assert o.breakeven_shipped is None and o.breakeven_hosted == pytest.approx(1 / (1 - 1 / 20))
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [c["outcome"]["re_prefill_total"] for c in saved["cases"]] == [paper.re_prefill_total,
                                                                         o.re_prefill_total]
    assert "break-even reuses, hosted" in (tmp_path / "e.md").read_text()
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG_MAGIC


# -- the table ------------------------------------------------------------------------------------------


def _check_table(report: dict, lengths: list[int], runs: int) -> None:
    assert report["schema"] == "kvnet/bench/paper_table/v1"
    assert [r["tokens"] for r in report["rows"]] == lengths
    for r in report["rows"]:
        for key in ("prefill_s", "local_reuse_s", "peer_reuse_s"):
            s = r[key]
            assert len(s["runs"]) == runs and s["min"] <= s["median"] <= s["max"]
        assert r["kv_bytes"] == r["tokens"] * r["kv_bytes_per_token"]
        assert r["flops_prefill"] > r["flops_reuse"] > 0
        assert r["peer_paths"]  # the fetch went over a real transport
        assert r["logits_finite"]


def test_paper_table_on_tiny_writes_json_md_png_and_is_exact(tmp_path):
    """One length above one block (so the peer finds the document by the prompt's prefix, as an agent
    would), one run, fp32: every reused answer equals the full prefill's, token for token."""
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-m", "bench.paper_table", "--model", "tiny", "--lengths", "300",
                           "--runs", "1", "--dtype", "fp32", "--json", f"{out}.json", "--md", f"{out}.md",
                           "--png", f"{out}.png"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    _check_table(report, [300], 1)
    (row,) = report["rows"]
    assert row["exact_local"] and row["exact_peer"]
    assert row["peer_discovery"] == ["prompt prefix"]
    assert row["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # tiny: 2 layers x K,V x 2 heads x 16 dims x fp32
    md = Path(f"{out}.md").read_text()
    assert "| 300 |" in md and "yes (1/1)" in md
    assert Path(f"{out}.png").read_bytes()[:8] == PNG_MAGIC


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """bench/gpu_paper_table.sh, as it would run on the GPU machine, on the CPU with `tiny` at 255 tokens
    (shorter than one block: the peer finds it by manifest id): its checks pass, the table and the
    economics are written."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_paper_table.sh"), "--device", "cpu", "--lengths", "255",
                           "--model", "tiny", "--dtypes", "fp16", "--runs", "1", "--out", str(out)],
                          env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ready" in proc.stderr
    report = json.loads((out / "paper_table_tiny_fp16.json").read_text())
    _check_table(report, [255], 1)
    assert report["dtype"] == "fp16" and report["device"] == "cpu"
    assert report["rows"][0]["peer_discovery"] == ["manifest id"]
    for name in ("paper_table_tiny_fp16.md", "paper_table_tiny_fp16.png", "economics_tiny.json",
                 "economics_tiny.md", "economics_tiny.png"):
        assert (out / name).stat().st_size > 0


def test_gpu_script_refuses_cuda_without_a_cuda_torch():
    """On a machine whose torch sees no GPU, the script stops before any work and says what to install."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_paper_table.sh"), "--check"],
                          env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sees no CUDA device" in proc.stderr and "install a CUDA torch build" in proc.stderr
