"""The `kvnet` command: keys, publish, list, show, verify, generate, exactness; serve and fetch on the network."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvnet import identity
from kvnet.hashing import b3

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
out = Console()

DEFAULT_HOME = Path(os.environ.get("KVNET_HOME", Path.home() / ".kvnet"))
Home = Annotated[Path, typer.Option("--home", envvar="KVNET_HOME", help="Node directory: key and store.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Local HF folder, or tiny / qwen3-0.6b-shape / "
                                        "qwen3-4b-shape.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="bf16 (default) or fp32.")]


def _fetch_prefix(home: Path, bootstrap: list[str], model_id: bytes, prompt: list[int]) -> None:
    """Fetch the network's longest prefix of `prompt` into the local store, if longer than ours."""
    import trio

    from kvnet.p2p import commands

    with _store(home) as store:
        local = store.lookup(model_id, prompt)
    try:
        node = commands.open_node(home, None, bootstrap)
    except identity.IdentityError as exc:
        raise _fail(str(exc)) from exc

    with _progress() as prog:
        task = prog.add_task("fetch pieces", total=None)
        outcome = trio.run(lambda: commands.fetch(
            node, model_id=model_id, tokens=prompt, min_tokens=(local.n_tokens if local else 0) + 1,
            on_piece=lambda d, t: prog.update(task, completed=d, total=t)))
    node.store.close()
    found, result = outcome.found, outcome.result
    if outcome.error:
        console.print(f"network: fetch failed ({outcome.error}); continuing with the local store")
    elif result is not None:
        console.print(f"network: fetched {found.n_tokens} tokens of KV ({result.bytes / 1e6:.1f} MB from "
                      f"{len(found.providers)} providers in {result.seconds:.2f} s)")
    elif found is None:
        console.print("network: no longer prefix found")


ListenOpt = Annotated[list[str] | None, typer.Option("--listen", help="Multiaddr to listen on (repeatable).")]
BootstrapOpt = Annotated[list[str] | None, typer.Option("--bootstrap", "-b",
                                                        help="Peer multiaddr /ip4/../tcp/N/p2p/ID (repeatable).")]


def _fail(msg: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code=1)


def _store(home: Path, verify_on_read: bool = False):
    from kvnet.store import Store

    return Store(home / "store", verify_on_read=verify_on_read)


def _engine(model: str, dtype: str):
    from kvnet.engine import Engine, EngineError
    from kvnet.models import ModelRefError

    with console.status(f"loading model {model} ({dtype})"):
        try:
            return Engine(model, dtype, progress=lambda s: console.print(s))
        except (ModelRefError, EngineError) as exc:
            raise _fail(str(exc)) from exc


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _resolve(store, ident: str) -> bytes:
    from kvnet.store import StoreError

    try:
        return store.resolve_id(ident)
    except StoreError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def keygen(home: Home = DEFAULT_HOME, force: Annotated[bool, typer.Option(help="Replace an existing key.")] = False):
    """Create this node's Ed25519 identity key (mode 0600)."""
    path = home / "identity.key"
    try:
        key = identity.generate(path, force=force)
    except identity.IdentityError as exc:
        raise _fail(str(exc)) from exc
    out.print(f"wrote {path}\npublic key {identity.public_bytes(key).hex()}")


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Text document to publish.")],
    model: ModelOpt,
    home: Home = DEFAULT_HOME,
    dtype: DtypeOpt = "bf16",
    title: Annotated[str | None, typer.Option(help="Title recorded in the manifest.")] = None,
    url: Annotated[str | None, typer.Option(help="Source URL recorded in the manifest.")] = None,
    price: Annotated[int, typer.Option(help="Price per load, integer micro-units.")] = 0,
    currency: Annotated[str, typer.Option(help="Currency label of the price.")] = "USD",
    ttl: Annotated[int, typer.Option(help="Seconds until the manifest expires (0: never).")] = 0,
    block_size: Annotated[int, typer.Option(help="Tokens per chain block.")] = 256,
):
    """Tokenize, prefill, sign and store FILE's KV; print its manifest id and sizes."""
    from kvnet.manifest import Terms
    from kvnet.publish import publish_tokens

    try:
        key = identity.load(home / "identity.key")
    except identity.IdentityError as exc:
        raise _fail(str(exc)) from exc
    text = file.read_text()
    engine = _engine(model, dtype)
    tokens = engine.tokenizer.encode(text)
    if not tokens:
        raise _fail(f"{file} holds no tokens")
    source = {"title": title or file.name, "text_b3": b3(text.encode())}
    if url:
        source["url"] = url
    n_layers = engine.layout.layers
    with _progress() as prog, _store(home) as store:
        t_pre = prog.add_task(f"prefill {len(tokens)} tokens", total=n_layers)
        t_put = prog.add_task("store pieces", total=None)
        res = publish_tokens(
            engine, store, key, tokens, block_size=block_size, terms=Terms(price, currency), source=source,
            ttl_seconds=ttl,
            on_layer=lambda i: prog.update(t_pre, completed=i),
            on_piece=lambda i, n: prog.update(t_put, completed=i, total=n),
        )
    m = res.signed.manifest
    out.print(f"manifest  {res.manifest_id.hex()}")
    out.print(f"tokens    {m.n_tokens}  ({len(m.chain)} blocks of {m.block_size})")
    out.print(f"bytes     {m.total_bytes:,}  in {len(m.pieces)} pieces  ({m.bytes_per_token:,} B/token)")
    out.print(f"time      prefill {res.prefill_s:.2f} s, total {res.total_s:.2f} s")


@app.command("ls")
def ls(home: Home = DEFAULT_HOME):
    """List stored artifacts, most recently used first."""
    with _store(home) as store:
        entries = store.entries()
    table = Table("title", "tokens", "MB", "pieces", "pinned", "last used")
    table.add_column("id", no_wrap=True)
    for e in entries:
        table.add_row(e.title or "", str(e.n_tokens), f"{e.total_bytes / 1e6:.1f}",
                      f"{e.present}/{e.n_pieces}", "yes" if e.pinned else "",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)), e.id.hex()[:16])
    out.print(table)


@app.command()
def show(ident: Annotated[str, typer.Argument(help="Manifest id or unique prefix.")], home: Home = DEFAULT_HOME):
    """Print a manifest as JSON (bytes as hex)."""
    with _store(home) as store:
        sm = store.get_manifest(_resolve(store, ident))
        present = len(store.present_pieces(sm.id))
    body = sm.manifest.body()

    def hexify(v):
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, list):
            return [hexify(x) for x in v]
        if isinstance(v, dict):
            return {k: hexify(x) for k, x in v.items()}
        return v

    print(json.dumps({"id": sm.id.hex(), "pieces_present": present, **hexify(body)}, indent=2))


@app.command()
def verify(ident: Annotated[str, typer.Argument(help="Manifest id or unique prefix.")], home: Home = DEFAULT_HOME):
    """Re-check the manifest signature and every stored piece's hash."""
    from kvnet.artifact import ArtifactError
    from kvnet.store import NotFoundError

    with _store(home) as store:
        mid = _resolve(store, ident)
        sm = store.get_manifest(mid)
        bad, missing = [], []
        for i in range(len(sm.manifest.pieces)):
            try:
                store.read_piece(mid, i, verify=True)
            except NotFoundError:
                missing.append(i)
            except ArtifactError as exc:
                bad.append(str(exc))
    for line in bad:
        console.print(f"[red]{line}[/red]")
    n = len(sm.manifest.pieces)
    out.print(f"signature ok; {n - len(bad) - len(missing)}/{n} pieces verified, {len(missing)} missing, "
              f"{len(bad)} corrupt (dropped)")
    if bad:
        raise typer.Exit(code=1)


@app.command()
def pin(ident: str, home: Home = DEFAULT_HOME, off: Annotated[bool, typer.Option("--off")] = False):
    """Protect an artifact from eviction (or release it with --off)."""
    with _store(home) as store:
        store.pin(_resolve(store, ident), not off)


@app.command()
def generate(
    model: ModelOpt,
    prompt_file: Annotated[Path, typer.Option("--prompt-file", exists=True, dir_okay=False)],
    home: Home = DEFAULT_HOME,
    dtype: DtypeOpt = "bf16",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    baseline: Annotated[bool, typer.Option(help="Also run a full prefill to measure the time saved.")] = True,
    bootstrap: BootstrapOpt = None,
):
    """Answer a prompt, reusing the longest stored KV prefix; report cached tokens and time saved.

    With --bootstrap, first look for a longer prefix on the network and fetch it (verified)."""
    from kvnet.artifact import ArtifactError
    from kvnet.reuse import answer

    engine = _engine(model, dtype)
    prompt = engine.tokenizer.encode(prompt_file.read_text())
    if not prompt:
        raise _fail("the prompt is empty")
    if bootstrap:
        _fetch_prefix(home, bootstrap, engine.model_id, prompt)
    with _store(home) as store:
        try:
            ans = answer(engine, store, prompt, max_new_tokens)
        except ArtifactError as exc:
            raise _fail(str(exc)) from exc
    print(ans.text)  # plain: the model's text is not rich markup
    console.print(f"prompt_tokens {ans.prompt_tokens}  cached_tokens {ans.cached_tokens}  "
                  f"(manifest {ans.manifest_id.hex()[:16] if ans.manifest_id else '-'})")
    console.print(f"load {ans.load_s:.3f} s + prefill of the rest {ans.prefill_s:.3f} s; "
                  f"generation {ans.generate_s:.3f} s")
    if baseline and ans.cached_tokens:
        t0 = time.perf_counter()
        engine.generate_from(None, prompt, 1)
        full = time.perf_counter() - t0
        console.print(f"full prefill would take {full:.3f} s: saved {full - ans.load_s - ans.prefill_s:.3f} s "
                      f"({full / max(ans.load_s + ans.prefill_s, 1e-9):.1f}x faster to first token)")


@app.command()
def serve(home: Home = DEFAULT_HOME, listen: ListenOpt = None, bootstrap: BootstrapOpt = None,
          capacity_mb: Annotated[int | None, typer.Option(help="Store capacity (LRU eviction).")] = None):
    """Join the network and serve this node's store until interrupted (prints its address)."""
    import trio

    from kvnet.p2p import commands

    try:
        node = commands.open_node(home, listen, bootstrap or [],
                                  capacity_bytes=capacity_mb * 2**20 if capacity_mb else None)
    except identity.IdentityError as exc:
        raise _fail(str(exc)) from exc
    trio.run(commands.serve, node, lambda n: commands.line(f"listening {n.addrs[0]}"))


@app.command()
def fetch(
    home: Home = DEFAULT_HOME,
    bootstrap: BootstrapOpt = None,
    manifest: Annotated[str | None, typer.Option(help="Fetch this manifest id in full.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", exists=True, dir_okay=False,
                                                     help="Fetch the longest network prefix of this prompt.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model ref (with --prompt-file).")] = None,
    dtype: DtypeOpt = "bf16",
    log_pieces: Annotated[bool, typer.Option(help="Print a line per stored piece (for scripts).")] = False,
):
    """Find KV on the network (by manifest id or by a prompt's prefix), fetch it verified, store it."""
    import trio

    from kvnet.p2p import commands

    if (manifest is None) == (prompt_file is None):
        raise _fail("give exactly one of --manifest or --prompt-file")
    kwargs: dict = {}
    if manifest is not None:
        try:
            kwargs["manifest_id"] = bytes.fromhex(manifest)
        except ValueError:
            kwargs["manifest_id"] = b""
        if len(kwargs["manifest_id"]) != 32:
            raise _fail("--manifest takes a full 64-hex-digit manifest id")
    else:
        if model is None:
            raise _fail("--prompt-file needs --model")
        engine = _engine(model, dtype)
        kwargs["model_id"] = engine.model_id
        kwargs["tokens"] = engine.tokenizer.encode(prompt_file.read_text())
    try:
        node = commands.open_node(home, None, bootstrap or [])
    except identity.IdentityError as exc:
        raise _fail(str(exc)) from exc
    with _progress() as prog:
        task = prog.add_task("fetch pieces", total=None)

        def on_piece(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)
            if log_pieces:
                commands.line(f"piece {done}/{total}")

        def on_found(f) -> None:
            commands.line(f"found {f.signed.id.hex()} covering {f.n_tokens} tokens at {len(f.providers)} providers")

        outcome = trio.run(lambda: commands.fetch(node, on_piece=on_piece, on_found=on_found, **kwargs))
    if outcome.found is None:
        raise _fail("nothing found on the network")
    if outcome.error:
        raise _fail(f"fetch failed, nothing unverified was stored: {outcome.error}")
    r = outcome.result
    out.print(f"fetched {r.fetched} pieces ({r.bytes / 1e6:.1f} MB) in {r.seconds:.2f} s "
              f"({r.mb_per_s:.0f} MB/s); already had {r.already_had}")
    for peer, stats in r.providers.items():
        out.print(f"  {peer}: {stats['pieces']} pieces" + (f", dropped ({stats['dropped']})"
                                                          if stats["dropped"] else ""))


@app.command()
def exactness(
    model: ModelOpt = "tiny",
    doc_tokens: Annotated[int, typer.Option("--doc-tokens")] = 300,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 32,
    dtype: DtypeOpt = "bf16",
    seed: int = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report only.")] = False,
):
    """Publish a seeded document, reload it in a fresh process, and compare with prefill."""
    from kvnet import exactness as exp

    with console.status(f"exactness: {model} {dtype}, {doc_tokens} document tokens, {new_tokens} new"):
        report = exp.run(model, doc_tokens, new_tokens, dtype, seed, progress=lambda s: console.print(s))
    report.pop("tokens", None)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    ok = report["tokens_match"] == report["tokens_total"] and report["max_logit_diff"] == 0.0
    out.print(f"[bold]{model}[/bold] {dtype}: document {doc_tokens} tokens, artifact "
              f"{report['artifact_bytes']:,} B ({report['bytes_per_token']:,} B/token)")
    out.print(f"loaded KV vs prefill-then-continue: {report['tokens_match']}/{report['tokens_total']} tokens, "
              f"max |logit diff| {report['max_logit_diff']:.3g}  ({'exact' if ok else 'NOT EXACT'})")
    out.print(f"loaded KV vs one-shot prefill:      {report['oneshot_tokens_match']}/{report['tokens_total']} "
              f"tokens, max |logit diff| {report['oneshot_max_logit_diff']:.3g}")
    out.print(f"load {report['load_s']:.3f} s vs prefill {report['prefill_s']:.3f} s")


if __name__ == "__main__":
    app()
