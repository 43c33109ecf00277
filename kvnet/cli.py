"""The `kvnet` command: keys, publish, list, show, verify, rm, gc, generate, exactness; serve and fetch; ledger.

Every deliberate failure (a `KvnetError`, also when trio wraps it in an ExceptionGroup) becomes one
line `error: ...` on stderr and exit code 1; a traceback means a bug. Inputs are checked before the
model is loaded (the key, the files, the store, the bootstrap addresses), so a mistake costs no wait.
"""

from __future__ import annotations

import enum
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from kvnet import __version__, identity, logs
from kvnet.errors import KvnetError, first_kvnet_error
from kvnet.hashing import b3
from kvnet.tokenizer import read_text

console = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width
out = Console()


def _print_error(err: KvnetError) -> None:
    console.print("[red]error:[/red] " + escape(_one_line(err)), highlight=False)
    for c in getattr(err, "candidates", None) or []:  # an ambiguous id prefix: show what it matches
        console.print(f"  {c.id.hex()}  {c.n_tokens:>7} tokens  {c.title or ''}", markup=False, highlight=False)


# click's UsageError, found through typer's public BadParameter: typer 0.2x vendors its own click.
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Group(TyperGroup):
    """The command group; turns every KvnetError escaping a command into one line and exit 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERRORS as exc:  # a bad option value (--max-new-tokens 0, ...): one line too
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            name = exc.ctx.command_path if exc.ctx else "kvnet"
            console.print("[red]error:[/red] " + escape(f"{exc.format_message()} (see `{name} --help`)"),
                          highlight=False)
            raise typer.Exit(code=exc.exit_code) from None
        except (KvnetError, BaseExceptionGroup) as exc:
            err = first_kvnet_error(exc)
            if err is None:
                raise
            _print_error(err)
            raise typer.Exit(code=1) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0],
                  pretty_exceptions_enable=False)

DEFAULT_HOME = Path(os.environ.get("KVNET_HOME", Path.home() / ".kvnet"))


class Level(enum.StrEnum):
    """The --log-level choices (kvnet.logs.LEVELS)."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class BulkMode(enum.StrEnum):
    """The --bulk choices of `kvnet fetch` (kvnet.p2p.bulk_wire modes, or libp2p streams only)."""

    tls = "tls"
    tcp = "tcp"
    off = "off"


def _log_level(value: Level) -> Level:
    logs.setup(value.value if isinstance(value, Level) else value)
    return value


Home = Annotated[Path, typer.Option("--home", envvar="KVNET_HOME", help="Node directory: key and store.")]
SubHome = Annotated[Path | None, typer.Option("--home", help="Node directory (default: the group's --home, "
                                                                 "which defaults to $KVNET_HOME, then ~/.kvnet).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Local HF folder, or tiny / qwen3-0.6b-shape / "
                                        "qwen3-4b-shape.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="bf16 (default) or fp32.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; messages stay on stderr.")]
CurrencyOpt = Annotated[str, typer.Option(help="Currency label of fees and limits (1..16 bytes of UTF-8).")]
LogLevel = Annotated[Level, typer.Option(
    "--log-level", envvar="KVNET_LOG_LEVEL", case_sensitive=False, callback=_log_level, is_eager=True,
    help="Log detail on stderr (libp2p's own errors appear from info, all its logs at debug).")]
IdArg = Annotated[str, typer.Argument(help="Manifest id or unique hex prefix of one.")]
ListenOpt = Annotated[list[str] | None, typer.Option("--listen", help="Multiaddr to listen on (repeatable).")]
BootstrapOpt = Annotated[list[str] | None, typer.Option("--bootstrap", "-b",
                                                        help="Peer multiaddr /ip4/../tcp/N/p2p/ID (repeatable).")]
PromptOpt = Annotated[Path, typer.Option("--prompt-file", exists=True, dir_okay=False,
                                         help="UTF-8 text file holding the whole prompt.")]


def _show_version(value: bool) -> None:
    if value:
        print(f"kvnet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                                help="Print the version and exit.")] = False) -> None:
    """kvnet: publish a document's KV cache once, reuse it token-exactly everywhere."""


def _fail(msg: str) -> typer.Exit:
    console.print("[red]error:[/red] " + escape(msg), highlight=False)
    return typer.Exit(code=1)


def _emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2))


def _store(home: Path, write: bool = True):
    """The home's store. Read-only commands open it read-only, so they work on a read-only home."""
    from kvnet.store import Store

    return Store(home / "store", read_only=not write)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _engine(model: str, dtype: str):
    """Load a model; any failure to load it (bad ref, invalid or non-Qwen3 config.json) is one line."""
    from kvnet.engine import Engine

    with console.status(f"loading model {model} ({dtype})"):
        try:
            return Engine(model, dtype, progress=lambda s: console.print(s, markup=False, highlight=False))
        except KvnetError:
            raise
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
            # transformers and json raise these for a folder that is not a usable Qwen3 checkpoint
            raise _fail(f"cannot load model {model!r}: {type(exc).__name__}: {_one_line(exc)}") from exc


def _open_node(home: Path, listen: list[str] | None, bootstrap: list[str], **kw: Any):
    """A network node for `home`: checks the key, the store and the bootstrap addresses right away."""
    from kvnet.p2p import commands

    logs.setup()  # libp2p was just imported, which resets its logger
    node = commands.open_node(home, listen, bootstrap, **kw)
    logs.setup()  # make_host sets libp2p's level itself
    return node


def _run_trio(fn: Any, *args: Any) -> Any:
    """Run a trio function; the first KvnetError inside an ExceptionGroup comes out as itself."""
    from kvnet.p2p import commands

    return commands.run_trio(fn, *args)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _ranges(indices: list[int]) -> str:
    """Piece indices as compact ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    for i in sorted(indices):
        if parts and parts[-1][1] == i - 1:
            parts[-1] = (parts[-1][0], i)
        else:
            parts.append((i, i))
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in parts)


def _hexify(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return [_hexify(x) for x in v]
    if isinstance(v, dict):
        return {k: _hexify(x) for k, x in v.items()}
    return v


# -- keys and publishing ---------------------------------------------------------------------------


@app.command()
def keygen(home: Home = DEFAULT_HOME, force: Annotated[bool, typer.Option(help="Replace an existing key.")] = False,
           log_level: LogLevel = Level.warning):
    """Create this node's Ed25519 identity key (mode 0600)."""
    path = home / "identity.key"
    try:
        key = identity.generate(path, force=force)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror or exc}") from exc
    out.print(f"wrote {path}\npublic key {identity.public_bytes(key).hex()}", highlight=False)


def _publish_summary(sm, reused: bool, prefill_s: float | None, total_s: float | None) -> dict[str, Any]:
    m = sm.manifest
    return {"manifest_id": sm.id.hex(), "already_published": reused, "n_tokens": m.n_tokens,
            "block_size": m.block_size, "blocks": len(m.chain), "total_bytes": m.total_bytes,
            "pieces": len(m.pieces), "bytes_per_token": m.bytes_per_token, "prefill_s": prefill_s,
            "total_s": total_s}


def _print_publish(s: dict[str, Any]) -> None:
    out.print(f"manifest  {s['manifest_id']}", highlight=False)
    out.print(f"tokens    {s['n_tokens']}  ({s['blocks']} blocks of {s['block_size']})", highlight=False)
    out.print(f"bytes     {s['total_bytes']:,}  in {s['pieces']} pieces  ({s['bytes_per_token']:,} B/token)",
              highlight=False)
    if s["prefill_s"] is not None:
        out.print(f"time      prefill {s['prefill_s']:.2f} s, total {s['total_s']:.2f} s", highlight=False)


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="UTF-8 text document to publish.")],
    model: ModelOpt,
    home: Home = DEFAULT_HOME,
    dtype: DtypeOpt = "bf16",
    title: Annotated[str | None, typer.Option(help="Title recorded in the manifest (default: file name).")] = None,
    url: Annotated[str | None, typer.Option(help="Source URL recorded in the manifest.")] = None,
    price: Annotated[int, typer.Option(min=0, help="Price per load, integer micro-units (>= 0).")] = 0,
    currency: Annotated[str, typer.Option(help="Currency label of the price (1-16 characters).")] = "USD",
    ttl: Annotated[int, typer.Option(min=0, help="Seconds until the manifest expires (0: never).")] = 0,
    block_size: Annotated[int, typer.Option(min=1, max=65536, help="Tokens per chain block (1-65536).")] = 256,
    force: Annotated[bool, typer.Option(help="Publish a new manifest even if this key already published "
                                             "the same tokens.")] = False,
    as_json: JsonOpt = False,
    log_level: LogLevel = Level.warning,
):
    """Tokenize, prefill, sign and store FILE's KV; print its manifest id and sizes.

    Publishing the same document again (same model, tokens and block size, same key) reuses the
    existing complete manifest unless --force."""
    from kvnet.manifest import Terms
    from kvnet.publish import find_existing, publish_tokens

    if not 0 < len(currency) <= 16:
        raise _fail("--currency must be 1 to 16 characters")
    key = identity.load(home / "identity.key")  # before the model: a missing key costs no wait
    text = read_text(file)
    with _store(home) as store:
        engine = _engine(model, dtype)
        tokens = engine.tokenizer.encode(text)
        if not tokens:
            raise _fail(f"{file} holds no tokens")
        existing = None if force else find_existing(engine, store, key, tokens, block_size)
        if existing is not None:
            console.print(f"already published by this key: {existing.id.hex()} (reusing it; --force publishes "
                          "a new manifest)", markup=False, highlight=False)
            summary = _publish_summary(existing, True, None, None)
        else:
            # text_b3 is BLAKE3 of the file's exact bytes: read_text decoded them losslessly as UTF-8
            source: dict[str, Any] = {"title": title or file.name, "text_b3": b3(text.encode("utf-8"))}
            if url:
                source["url"] = url
            with _progress() as prog:
                t_pre = prog.add_task(f"prefill {len(tokens)} tokens", total=engine.layout.layers)
                t_put = prog.add_task("store pieces", total=None)
                res = publish_tokens(
                    engine, store, key, tokens, block_size=block_size, terms=Terms(price, currency),
                    source=source, ttl_seconds=ttl,
                    on_layer=lambda i: prog.update(t_pre, completed=i),
                    on_piece=lambda i, n: prog.update(t_put, completed=i, total=n),
                )
            summary = _publish_summary(res.signed, False, round(res.prefill_s, 4), round(res.total_s, 4))
    if as_json:
        _emit_json(summary)
    else:
        _print_publish(summary)


# -- the local store ---------------------------------------------------------------------------------


@app.command("ls")
def ls(
    prefix: Annotated[str, typer.Argument(help="Only ids starting with this hex prefix.")] = "",
    home: Home = DEFAULT_HOME,
    as_json: JsonOpt = False,
    log_level: LogLevel = Level.warning,
):
    """List stored artifacts, most recently used first (works on a read-only home)."""
    from kvnet.store import NotFoundError

    try:
        with _store(home, write=False) as store:
            entries = store.entries(prefix)
    except NotFoundError:
        entries = []  # no store yet: nothing stored
    if prefix and not entries:
        raise _fail(f"no manifest id starts with {prefix!r}")
    if as_json:
        _emit_json({"artifacts": [{
            "id": e.id.hex(), "title": e.title, "model_id": e.model_id.hex(), "n_tokens": e.n_tokens,
            "total_bytes": e.total_bytes, "pieces": e.n_pieces, "pieces_present": e.present, "complete": e.complete,
            "pinned": e.pinned, "last_used": round(e.last_used, 3)} for e in entries]})
        return
    table = Table("title", "tokens", "MB", "pieces", "pinned", "last used")
    table.add_column("id", no_wrap=True)
    for e in entries:
        table.add_row(e.title or "", str(e.n_tokens), f"{e.total_bytes / 1e6:.1f}",
                      f"{e.present}/{e.n_pieces}", "yes" if e.pinned else "",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)), e.id.hex()[:16])
    out.print(table)


@app.command()
def show(ident: IdArg, home: Home = DEFAULT_HOME, log_level: LogLevel = Level.warning):
    """Print a manifest as JSON (bytes as hex); works on a read-only home."""
    with _store(home, write=False) as store:
        sm = store.get_manifest(store.resolve_id(ident))
        present = len(store.present_pieces(sm.id))
    print(json.dumps({"id": sm.id.hex(), "pieces_present": present, **_hexify(sm.manifest.body())}, indent=2))


@app.command()
def verify(ident: IdArg, home: Home = DEFAULT_HOME, log_level: LogLevel = Level.warning):
    """Re-check the manifest signature and every stored piece's hash; fail if any is corrupt or missing.

    Corrupt pieces are dropped from the store (on a read-only home they are only reported)."""
    from kvnet.store import NotFoundError, StoreError

    try:
        store = _store(home)
    except StoreError as exc:
        if isinstance(exc, NotFoundError):
            raise
        console.print(f"note: {exc}; verifying read-only (corrupt pieces are reported, not dropped)",
                      markup=False, highlight=False)
        store = _store(home, write=False)
    with store:
        mid = store.resolve_id(ident)
        sm = store.get_manifest(mid)
        bad, missing = [], []
        for i in range(len(sm.manifest.pieces)):
            try:
                store.read_piece(mid, i, verify=True)
            except NotFoundError:
                missing.append(i)
            except KvnetError as exc:  # a corrupt piece (ArtifactError)
                bad.append(str(exc))
    for line in bad:
        console.print(line, style="red", markup=False, highlight=False)
    n = len(sm.manifest.pieces)
    out.print(f"signature ok; {n - len(bad) - len(missing)}/{n} pieces verified, {len(missing)} missing, "
              f"{len(bad)} corrupt", highlight=False)
    if missing:
        console.print(f"[red]error:[/red] incomplete artifact: missing pieces {_ranges(missing)} "
                      f"({len(missing)} of {n}); `kvnet fetch --manifest {mid.hex()}` can complete it",
                      highlight=False)
    if bad or missing:
        raise typer.Exit(code=1)


@app.command()
def pin(ident: IdArg, home: Home = DEFAULT_HOME,
        off: Annotated[bool, typer.Option("--off", help="Release the pin instead.")] = False,
        log_level: LogLevel = Level.warning):
    """Protect an artifact from eviction, gc and rm (or release it with --off)."""
    with _store(home) as store:
        store.pin(store.resolve_id(ident), not off)


@app.command()
def rm(ident: IdArg, home: Home = DEFAULT_HOME,
       force: Annotated[bool, typer.Option(help="Remove it even if it is pinned.")] = False,
       log_level: LogLevel = Level.warning):
    """Remove one artifact and the pieces no other artifact shares (a pinned one needs --force)."""
    with _store(home) as store:
        mid = store.resolve_id(ident)
        store.delete(mid, force=force)
    out.print(f"removed {mid.hex()}", highlight=False)


@app.command()
def gc(home: Home = DEFAULT_HOME,
       dry_run: Annotated[bool, typer.Option(help="Only list what would be removed.")] = False,
       as_json: JsonOpt = False,
       log_level: LogLevel = Level.warning):
    """Remove partial artifacts (pieces missing) and superseded ones (pinned ones are kept).

    Superseded: the same publisher has a newer, complete manifest for the same model and the same
    tokens (same block size and chain), e.g. after `publish --force` with new terms."""
    with _store(home) as store:
        items = store.gc(dry_run=dry_run)
    if as_json:
        _emit_json({"dry_run": dry_run, "removed": [
            {"id": i.id.hex(), "reason": i.reason, "superseded_by": i.superseded_by.hex() if i.superseded_by else None,
             "n_tokens": i.n_tokens, "title": i.title, "piece_bytes": i.piece_bytes} for i in items]})
        return
    verb = "would remove" if dry_run else "removed"
    for i in items:
        why = f"superseded by {i.superseded_by.hex()[:16]}" if i.superseded_by else i.reason
        out.print(f"{verb} {i.id.hex()}  {i.n_tokens} tokens  {i.title or ''}  ({why})", highlight=False)
    out.print(f"{verb} {len(items)} artifacts", highlight=False)


# -- answering ---------------------------------------------------------------------------------------


def _fetch_prefix(node, engine, prompt: list[int]) -> tuple[dict[str, Any], Any]:
    """Fetch the network's longest prefix of `prompt` into the node's store, if longer than ours; the
    report and the KVBuilder the fetch filled as its pieces verified (kvnet.reuse.prefix_builder: the
    answer then reads back from the store only what it held before), or None.

    Any network failure (no peer reachable, a fetch that failed) is reported and generation goes on
    with the local store: the network is an optimisation here, never a requirement."""
    from kvnet.p2p import commands
    from kvnet.reuse import prefix_builder

    local = node.store.lookup(engine.model_id, prompt)
    built = []

    def builder_for(found):
        b = prefix_builder(engine, found.signed.manifest, found.n_tokens, len(prompt))
        built.append(b)
        return b.add if b is not None else None

    with _progress() as prog:
        task = prog.add_task("fetch pieces", total=None)
        try:
            outcome = _run_trio(lambda: commands.fetch(
                node, model_id=engine.model_id, tokens=prompt, min_tokens=(local.n_tokens if local else 0) + 1,
                on_piece=lambda d, t: prog.update(task, completed=d, total=t), on_verified_for=builder_for))
        except KvnetError as exc:
            console.print(f"network: {_one_line(exc)}; continuing with the local store", markup=False,
                          highlight=False)
            return {"error": str(exc), "fetched_tokens": 0}, None
    found, result = outcome.found, outcome.result
    if outcome.error:
        console.print(f"network: fetch failed ({outcome.error}); continuing with the local store",
                      markup=False, highlight=False)
        return {"error": outcome.error, "fetched_tokens": 0}, None
    if result is not None:
        console.print(f"network: fetched {found.n_tokens} tokens of KV ({result.bytes / 1e6:.1f} MB from "
                      f"{len(found.providers)} providers in {result.seconds:.2f} s)", highlight=False)
        return ({"error": None, "fetched_tokens": found.n_tokens, "bytes": result.bytes,
                 "providers": len(found.providers), "seconds": round(result.seconds, 4)}, built[-1])
    console.print("network: no longer prefix found", highlight=False)
    return {"error": None, "fetched_tokens": 0}, None


@app.command()
def generate(
    model: ModelOpt,
    prompt_file: PromptOpt,
    home: Home = DEFAULT_HOME,
    dtype: DtypeOpt = "bf16",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1,
                                                help="Most tokens to generate (>= 1).")] = 32,
    baseline: Annotated[bool, typer.Option(help="Also run a full prefill to measure the time saved.")] = True,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
    log_level: LogLevel = Level.warning,
    audit_blocks: Annotated[int, typer.Option("--audit-blocks", min=0, help="Audit this many random blocks of "
                                              "the reused artifact plus its last one, after answering "
                                              "(docs/audits.md).")] = 1,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Do not audit the reused artifact.")] = False,
):
    """Answer a prompt, reusing the longest stored KV prefix; report cached tokens and time saved.

    With --bootstrap, first look for a longer prefix on the network and fetch it (verified); if no
    peer answers, say so and answer from the local store. A reused artifact is audited in the
    background (--audit-blocks, --no-audit); a fraud found refuses it (docs/audits.md)."""
    from kvnet import fraud
    from kvnet.cli_audit import GenerateAudit
    from kvnet.reuse import answer

    text = read_text(prompt_file)
    node = _open_node(home, None, bootstrap) if bootstrap else None  # key + bootstrap checked before the model
    store = node.store if node is not None else _store(home)
    with store:
        engine = _engine(model, dtype)
        prompt = engine.tokenizer.encode(text)
        if not prompt:
            raise _fail("the prompt is empty")
        if node is not None:  # a /kvf/ proof found before using a fetched artifact is verified with this model
            node.proof_verifier = lambda raw: fraud.verify_stored(raw, engine, store.root)
        network, built = _fetch_prefix(node, engine, prompt) if node is not None else (None, None)
        ans = answer(engine, store, prompt, max_new_tokens, built=built)
    auditing = GenerateAudit(engine, home, audit_blocks) if ans.manifest_id and not no_audit else None
    if auditing:
        auditing.loaded(ans.manifest_id, prompt)  # runs on its own thread: the answer does not wait
    full = None
    if baseline and ans.cached_tokens:
        t0 = time.perf_counter()
        engine.generate_from(None, prompt, 1)
        full = time.perf_counter() - t0
    if as_json:
        _emit_json({"text": ans.text, "tokens": ans.tokens, "prompt_tokens": ans.prompt_tokens,
                    "cached_tokens": ans.cached_tokens,
                    "manifest_id": ans.manifest_id.hex() if ans.manifest_id else None,
                    "timings": {"load_s": round(ans.load_s, 4), "prefill_s": round(ans.prefill_s, 4),
                                "generate_s": round(ans.generate_s, 4),
                                "full_prefill_s": round(full, 4) if full is not None else None},
                    "network": network, "audit": "queued" if auditing else "off"})
    else:
        print(ans.text)  # plain: the model's text is not rich markup
    console.print(f"prompt_tokens {ans.prompt_tokens}  cached_tokens {ans.cached_tokens}  "
                  f"(manifest {ans.manifest_id.hex()[:16] if ans.manifest_id else '-'})", highlight=False)
    console.print(f"load {ans.load_s:.3f} s + prefill of the rest {ans.prefill_s:.3f} s; "
                  f"generation {ans.generate_s:.3f} s", highlight=False)
    if full is not None:
        console.print(f"full prefill would take {full:.3f} s: saved {full - ans.load_s - ans.prefill_s:.3f} s "
                      f"({full / max(ans.load_s + ans.prefill_s, 1e-9):.1f}x faster to first token)", highlight=False)
    if auditing:
        auditing.finish()  # after the answer is out


# -- the network -------------------------------------------------------------------------------------


@app.command()
def serve(home: Home = DEFAULT_HOME, listen: ListenOpt = None, bootstrap: BootstrapOpt = None,
          capacity_mb: Annotated[int | None, typer.Option(min=1, help="Store capacity in MiB (LRU eviction); "
                                                                     "default unlimited.")] = None,
          stats_file: Annotated[Path | None, typer.Option(
              "--stats-file", dir_okay=False, help="Rewrite this JSON file with the node's resource use "
                                                   "(connections, slots, fds, memory, DHT records).")] = None,
          stats_interval: Annotated[float, typer.Option(min=0.1, help="Seconds between --stats-file "
                                                                      "writes.")] = 5.0,
          fee_per_mib: Annotated[int, typer.Option(min=0, help="Hosting fee in micro-units per MiB served "
                                                               "(docs/payments.md); 0: free.")] = 0,
          currency: CurrencyOpt = "USD",
          credit_window: Annotated[int | None, typer.Option(min=0, help="Micro-units a payer may owe before "
                                                                        "it must pay; default the cost of "
                                                                        "64 MiB at --fee-per-mib.")] = None,
          log_level: LogLevel = Level.warning):
    """Join the network and serve this node's store until interrupted (prints its address)."""
    from kvnet.p2p import commands
    from kvnet.p2p.server import HostingTerms

    node = _open_node(home, listen, bootstrap or [], capacity_bytes=capacity_mb * 2**20 if capacity_mb else None,
                      terms=HostingTerms(fee_per_mib, currency), credit_window=credit_window)
    _run_trio(commands.serve, node, lambda n: commands.line(f"listening {n.addrs[0]}"), stats_file,
              stats_interval)


def _hex32(value: str, error: str) -> bytes:
    """32 bytes from 64 hex digits, or the one error line `error`."""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _fail(error)
    return raw


def _manifest_arg(manifest: str) -> bytes:
    return _hex32(manifest, "--manifest takes a full 64-hex-digit manifest id")


@app.command()
def fetch(
    home: Home = DEFAULT_HOME,
    bootstrap: BootstrapOpt = None,
    manifest: Annotated[str | None, typer.Option(help="Fetch this manifest id (64 hex digits) in full.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", exists=True, dir_okay=False,
                                                     help="Fetch the longest network prefix of this prompt.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model ref (with --prompt-file).")] = None,
    dtype: DtypeOpt = "bf16",
    log_pieces: Annotated[bool, typer.Option(help="Print a line per stored piece (for scripts).")] = False,
    bulk: Annotated[BulkMode, typer.Option(
        help="How piece bytes travel: a bulk connection over TLS 1.3 (the default), plain TCP (public "
             "artifacts only: readable on the path), or libp2p streams only (off).")] = BulkMode.tls,
    max_per_load: Annotated[int | None, typer.Option(min=0, help="Most to pay for a license, per load "
                                                                 "(micro-units); default no limit.")] = None,
    max_per_mib: Annotated[int | None, typer.Option(min=0, help="Highest hosting fee per MiB to pay.")] = None,
    max_per_peer_per_day: Annotated[int | None, typer.Option(min=0, help="Most to pay one peer in 24 h.")] = None,
    max_per_day: Annotated[int | None, typer.Option(min=0, help="Most to pay in total in 24 h.")] = None,
    currency: CurrencyOpt = "USD",
    as_json: JsonOpt = False,
    log_level: LogLevel = Level.warning,
):
    """Find KV on the network (by manifest id or by a prompt's prefix), fetch it verified, store it."""
    from kvnet.ledger import SpendingLimits

    if (manifest is None) == (prompt_file is None):
        raise _fail("give exactly one of --manifest or --prompt-file")
    if not bootstrap:
        raise _fail("no peer was asked (no --bootstrap given): fetch needs at least one peer address")
    kwargs: dict[str, Any] = {"bulk": None if bulk is BulkMode.off else bulk.value}
    if manifest is not None:
        kwargs["manifest_id"] = _manifest_arg(manifest)
    elif model is None:
        raise _fail("--prompt-file needs --model")
    text = read_text(prompt_file) if prompt_file is not None else None
    spending = SpendingLimits(currency, max_per_load, max_per_mib, max_per_peer_per_day, max_per_day)
    node = _open_node(home, None, bootstrap, spending=spending)  # key, store and bootstrap checked before the model
    with node.store:
        if text is not None:
            engine = _engine(model, dtype)
            kwargs["model_id"] = engine.model_id
            kwargs["tokens"] = engine.tokenizer.encode(text)
        outcome = _fetch_run(node, log_pieces, as_json, kwargs)
    _fetch_report(outcome, as_json)


def _fetch_run(node, log_pieces: bool, as_json: bool, kwargs: dict[str, Any]):
    from kvnet.p2p import commands

    with _progress() as prog:
        task = prog.add_task("fetch pieces", total=None)

        def on_piece(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)
            if log_pieces:
                commands.line(f"piece {done}/{total}")

        def on_found(f) -> None:
            msg = f"found {f.signed.id.hex()} covering {f.n_tokens} tokens at {len(f.providers)} providers"
            if as_json:  # stdout holds only the JSON object
                console.print(msg, highlight=False)
            else:
                commands.line(msg)

        return _run_trio(lambda: commands.fetch(node, on_piece=on_piece, on_found=on_found, **kwargs))


def _fetch_report(outcome, as_json: bool) -> None:
    found, r = outcome.found, outcome.result
    error = outcome.error or (None if found is not None else "nothing found on the network")
    summary: dict[str, Any] = {"ok": error is None, "error": error,
                               "manifest_id": found.signed.id.hex() if found else None,
                               "n_tokens": found.n_tokens if found else None}
    if r is not None:
        summary.update({"fetched": r.fetched, "already_had": r.already_had, "bytes": r.bytes,
                        "seconds": round(r.seconds, 4), "mb_per_s": round(r.mb_per_s, 2),
                        "providers": {p: {"pieces": s["pieces"], "dropped": s["dropped"],
                                          "path": r.paths.get(p)} for p, s in r.providers.items()},
                        "paid": outcome.paid})
    if as_json:
        _emit_json(summary)
    if error is not None:
        if found is not None:
            raise _fail(f"fetch failed, nothing unverified was stored: {error}")
        raise _fail(error)
    if as_json:
        return
    out.print(f"fetched {r.fetched} pieces ({r.bytes / 1e6:.1f} MB) in {r.seconds:.2f} s "
              f"({r.mb_per_s:.0f} MB/s); already had {r.already_had}", highlight=False)
    for peer, stats in r.providers.items():
        path = f" over {r.paths[peer]}" if peer in r.paths else ""
        out.print(f"  {peer}: {stats['pieces']} pieces{path}" + (f", dropped ({stats['dropped']})"
                                                          if stats["dropped"] else ""), highlight=False)
    if any(outcome.paid.values()):
        out.print(f"paid {sum(outcome.paid.values()):,} micro-units for hosting (receipts in the ledger: "
                  "`kvnet ledger`)", highlight=False)


# -- the ledger ---------------------------------------------------------------------------------------

ledger_app = typer.Typer(cls=_Group, no_args_is_help=False, invoke_without_command=True,
                         help="Payments: balances, settlement batches (docs/payments.md).")
app.add_typer(ledger_app, name="ledger")


def _open_ledger(home: Path, write: bool = False):
    """The home's ledger, or None if there is none yet (a fresh home has paid and been paid nothing)."""
    from kvnet.ledger import Ledger

    path = home / "ledger.sqlite"
    if not path.exists():
        return None
    return Ledger(path, read_only=not write)


def _print_balances(b: dict[str, list[dict[str, Any]]]) -> None:
    peers = Table("peer", "role", "currency", "channels", "receipts", "amount", "debtor", title="per peer")
    for r in b["peers"]:
        peers.add_row(r["peer"][:16], r["role"], r["currency"], str(r["channels"]), str(r["receipts"]),
                      f"{r['amount']:,}", "yes" if r["debtor"] else "")
    pubs = Table("publisher", "role", "currency", "loads", "amount", title="license, per publisher")
    for r in b["publishers"]:
        pubs.add_row(r["publisher"][:16], r["role"], r["currency"], str(r["loads"]), f"{r['amount']:,}")
    mans = Table("manifest", "role", "kind", "currency", "bytes / loads", "amount", title="per manifest")
    for r in b["manifests"]:
        mans.add_row(r["manifest"][:16], r["role"], r["kind"], r["currency"], f"{r['units']:,}", f"{r['amount']:,}")
    for t in (peers, pubs, mans):
        out.print(t)
    out.print("roles: out = we pay, in = we are paid, held = kept for the payee (license receipts); "
              "amounts in micro-units", highlight=False)


@ledger_app.callback()
def ledger(ctx: typer.Context, home: Home = DEFAULT_HOME, as_json: JsonOpt = False,
           log_level: LogLevel = Level.warning):
    """Balances per peer, per publisher and per manifest, from <home>/ledger.sqlite."""
    ctx.obj = {"home": home}  # `kvnet ledger --home H export OUT` means H, as `export --home H` does
    if ctx.invoked_subcommand is not None:
        return
    from kvnet.ledger import EMPTY_REPORT

    led = _open_ledger(home)
    if led is None:
        report: dict[str, Any] = dict(EMPTY_REPORT)
    else:
        with led:
            report = led.report()  # the same code answers a kvnet-node's GET /v1/ledger
    if as_json:
        _emit_json(report)
        return
    _print_balances(report)


@ledger_app.command("export")
def ledger_export(
    ctx: typer.Context,
    out_file: Annotated[Path, typer.Argument(dir_okay=False, help="Where to write the batch.")],
    home: SubHome = None,
    since: Annotated[int | None, typer.Option(min=0, help="Only receipts timed at or after these unix "
                                                           "seconds (plus each channel's anchor).")] = None,
    held: Annotated[bool, typer.Option(help="Export the license receipts held for publishers instead of "
                                            "those made out to this node.")] = False,
    log_level: LogLevel = Level.warning,
):
    """Write a settlement batch: each channel's latest receipt and the receipts that add up to it."""
    from kvnet.receipts import verify_batch

    home = home or (ctx.obj or {}).get("home", DEFAULT_HOME)
    led = _open_ledger(home)
    if led is None:
        raise _fail(f"no ledger at {home / 'ledger.sqlite'}: this node has no receipts to export")
    with led:
        raw = led.export(since=since, role="held" if held else "in")
    summary = verify_batch(raw)  # what we write must pass the offline check
    tmp = out_file.with_name(out_file.name + ".tmp")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, out_file)
    except OSError as exc:
        raise _fail(f"cannot write {out_file}: {exc.strerror or exc}") from exc
    out.print(f"wrote {out_file}: {len(summary.channels)} channels, {len(raw):,} bytes", highlight=False)


@ledger_app.command("verify")
def ledger_verify(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A batch from `kvnet ledger export`.")],
    payee: Annotated[str | None, typer.Option(help="Require every receipt to be made out to this key "
                                                   "(64 hex digits).")] = None,
    as_json: JsonOpt = False,
    log_level: LogLevel = Level.warning,
):
    """Check a settlement batch offline (no node, no store): signatures, sequences, sums, payee; print
    the amount owed per payer."""
    from kvnet.receipts import verify_batch

    want = _hex32(payee, "--payee takes a 64-hex-digit public key") if payee is not None else None
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror or exc}") from exc
    s = verify_batch(raw, want)
    owed = [{"payer": p.hex(), "currency": c, "amount": a} for (p, c), a in sorted(s.owed().items())]
    if as_json:
        _emit_json({"ok": True, "payee": s.payee.hex() if s.payee else None, "created": s.created, "owed": owed,
                    "channels": [{"channel": c.channel.id.hex(), "payer": c.channel.payer.hex(),
                                  "payee": c.channel.payee.hex(), "currency": c.channel.currency,
                                  "first_seq": c.first_seq, "latest_seq": c.latest_seq,
                                  "from_cumulative": c.from_cumulative, "cumulative": c.cumulative}
                                 for c in s.channels]})
        return
    table = Table("payer", "currency", "owed", title=f"batch ok: {len(s.channels)} channels")
    for o in owed:
        table.add_row(o["payer"][:16], o["currency"], f"{o['amount']:,}")
    out.print(table)


# -- a running kvnet-node (kvnet/cli_node.py) ---------------------------------------------------------

from kvnet.cli_node import register as _register_node  # noqa: E402

_register_node(app, _Group, LogLevel)


# -- the experiment ----------------------------------------------------------------------------------


@app.command()
def exactness(
    model: ModelOpt = "tiny",
    doc_tokens: Annotated[int, typer.Option("--doc-tokens", min=1, help="Document length in tokens (>= 1).")] = 300,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to generate and compare "
                                                                        "(>= 1).")] = 32,
    dtype: DtypeOpt = "bf16",
    seed: Annotated[int, typer.Option(help="Seed of the generated document.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report only.")] = False,
    log_level: LogLevel = Level.warning,
):
    """Publish a seeded document, reload it in a fresh process, and compare with prefill."""
    from kvnet import exactness as exp
    from kvnet.models import resolve

    resolve(model)  # an unusable model ref or folder is one line here, not a failure in the subprocess
    with console.status(f"exactness: {model} {dtype}, {doc_tokens} document tokens, {new_tokens} new"):
        try:
            report = exp.run(model, doc_tokens, new_tokens, dtype, seed, progress=lambda s: console.print(s))
        except KvnetError:
            raise
        except (ValueError, OSError, KeyError, TypeError) as exc:  # a model folder that does not load
            raise _fail(f"cannot load model {model!r}: {type(exc).__name__}: {_one_line(exc)}") from exc
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


# -- audits and fraud proofs (kvnet/cli_audit.py) ------------------------------------------------------

from kvnet.cli_audit import audit_app  # noqa: E402  (a sub-app in its own module, like `ledger` but apart)

app.add_typer(audit_app, name="audit")


if __name__ == "__main__":
    app()
