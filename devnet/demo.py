"""A local devnet in one command: three real kvnet nodes on loopback share a document's KV.

    .venv/bin/python devnet/demo.py [--model tiny] [--doc-tokens 1200]

1. P (publisher) prefills a seeded document, signs and stores its KV.
2. B (bootstrap) and P run as `kvnet serve` processes; P knows only B.
3. C, a fresh node that knows only B, runs `kvnet generate --bootstrap B` on "document + question":
   it finds P through the DHT by the prompt's chain keys, fetches the KV in verified pieces, and
   answers with the document's tokens cached.
4. The demo checks C's answer token for token against a one-shot prefill of the whole prompt.
Everything runs in a temporary directory and is cleaned up; the processes are stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvnet.engine import Engine  # noqa: E402
from kvnet.exactness import SUFFIX_TEXT, seeded_document  # noqa: E402

console = Console()
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}


def kvnet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True, env=ENV)
    if check and proc.returncode != 0:
        raise SystemExit(f"kvnet {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def serve(home: Path, bootstrap: str | None = None) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "kvnet.cli", "serve", "--home", str(home)]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    words = proc.stdout.readline().split()
    if not words or words[0] != "listening":
        raise SystemExit(f"kvnet serve failed: {proc.stderr.read()}")
    return proc, words[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--doc-tokens", type=int, default=1200)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    engine = Engine(args.model, "bf16", progress=console.print)
    doc_tokens = seeded_document(engine.tokenizer, args.doc_tokens, seed=1)
    doc_text = engine.tokenizer.decode(doc_tokens)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="kvnet-devnet-") as tmp:
        homes = {name: Path(tmp) / name for name in ("B", "P", "C")}
        for home in homes.values():
            kvnet("keygen", "--home", str(home))
        (Path(tmp) / "doc.txt").write_text(doc_text)
        (Path(tmp) / "prompt.txt").write_text(doc_text + SUFFIX_TEXT)
        try:
            console.rule("[bold]1. P publishes the document")
            console.print(kvnet("publish", str(Path(tmp) / "doc.txt"), "--model", args.model, "--home",
                                str(homes["P"]), "--title", "devnet demo document").stdout)
            console.rule("[bold]2. B and P join the network")
            b, b_addr = serve(homes["B"])
            procs.append(b)
            p, p_addr = serve(homes["P"], b_addr)
            procs.append(p)
            console.print(f"B listening on {b_addr}\nP listening on {p_addr} (bootstrapped from B)")
            console.rule("[bold]3. C, knowing only B, answers document + question")
            gen = kvnet("generate", "--model", args.model, "--home", str(homes["C"]), "--bootstrap", b_addr,
                        "--prompt-file", str(Path(tmp) / "prompt.txt"), "--max-new-tokens", str(args.new_tokens))
            console.print(gen.stderr.strip())
            console.print(f"answer: {gen.stdout.strip()!r}")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    console.rule("[bold]4. Exactness")
    prompt = engine.tokenizer.encode(doc_text + SUFFIX_TEXT)
    expected = engine.tokenizer.decode(engine.generate_from(None, prompt, args.new_tokens, stop_at_eos=True).tokens)
    same = gen.stdout.rstrip("\n") == expected
    console.print(f"C's answer {'equals' if same else 'DIFFERS FROM'} a one-shot prefill of the whole prompt")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
