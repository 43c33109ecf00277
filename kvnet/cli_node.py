"""`kvnet node ...`: talk to a running kvnet-node through its agent socket (kvnet.client.Client).

Registered on the `kvnet` app by kvnet/cli.py (`register`), so that file keeps one small block.
Errors are `KvnetError`s (NodeUnreachable, NodeError): the group prints each as one `error:` line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kvnet.client import Client
from kvnet.tokenizer import read_text

out = Console()
err = Console(stderr=True, soft_wrap=True)
DEFAULT_SOCKET = Path(os.environ.get("KVNET_HOME", Path.home() / ".kvnet")) / "agent.sock"

SocketOpt = Annotated[Path, typer.Option("--socket", envvar="KVNET_SOCKET",
                                         help="The node's agent socket (agent.socket in node.toml).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the node's JSON answer.")]


def _client(socket: Path) -> Client:
    return Client(socket)


def _json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def status(socket: SocketOpt = DEFAULT_SOCKET, as_json: JsonOpt = False) -> None:
    """The node's identity, model, queue, fetches in progress and store usage."""
    with _client(socket) as c:
        s = c.status()
    if as_json:
        _json(s)
        return
    q = s["queue"]
    out.print(f"peer      {s['peer_id']}\naddrs     {', '.join(s['addrs'])}\n"
              f"model     {s['model']['ref']} {s['model']['dtype']}  ({s['model']['model_id'][:16]})\n"
              f"queue     {q['active']}/{q['max']} active; {q['completed']} done, {q['rejected']} refused\n"
              f"peers     {s['peers']} connected, {s['routing_table']} in the routing table\n"
              f"store     {s['store']['bytes']:,} bytes\nfetches   {len(s['fetches'])} in progress\n"
              f"metrics   {s['metrics'] or 'off'}", highlight=False)


def peers(socket: SocketOpt = DEFAULT_SOCKET, as_json: JsonOpt = False) -> None:
    """Connected peers and their scores."""
    with _client(socket) as c:
        ps = c.peers()
    if as_json:
        _json({"peers": ps})
        return
    table = Table("peer", "score", "addrs")
    for p in ps:
        table.add_row(p["peer_id"], f"{p['score']:.1f}", ", ".join(p["addrs"]))
    out.print(table)


def ls(socket: SocketOpt = DEFAULT_SOCKET, as_json: JsonOpt = False) -> None:
    """What the node's store holds."""
    with _client(socket) as c:
        arts = c.kv()
    if as_json:
        _json({"artifacts": arts})
        return
    table = Table("title", "tokens", "pieces", "id")
    for a in arts:
        table.add_row(a["title"] or "", str(a["n_tokens"]), f"{a['pieces_present']}/{a['pieces']}",
                      a["manifest_id"][:16])
    out.print(table)


def publish(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="UTF-8 text document.")],
            socket: SocketOpt = DEFAULT_SOCKET,
            title: Annotated[str | None, typer.Option(help="Title (default: the file name).")] = None,
            for_chat: Annotated[bool, typer.Option("--for-chat/--plain", help="Publish as a chat system message "
                                                   "(reused by chat requests), or as plain text.")] = True,
            as_json: JsonOpt = False) -> None:
    """Publish FILE through the node (prefilled by its model, announced to the network)."""
    with _client(socket) as c:
        r = c.publish(read_text(file), title=title or file.name, for_chat=for_chat)
    if as_json:
        _json(r)
        return
    verb = "already published" if r["already_published"] else "published"
    out.print(f"{verb} {r['manifest_id']}  {r['n_tokens']} tokens  {r['total_bytes']:,} bytes", highlight=False)


def ask(question: Annotated[str, typer.Argument(help="The question.")],
        doc: Annotated[Path, typer.Option("--doc", exists=True, dir_okay=False,
                                          help="Document sent as the system message (reused if published).")],
        socket: SocketOpt = DEFAULT_SOCKET,
        max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = 64,
        as_json: JsonOpt = False) -> None:
    """Ask a question over a document through /v1/chat/completions; report the reused tokens."""
    messages = [{"role": "system", "content": read_text(doc)}, {"role": "user", "content": question}]
    with _client(socket) as c:
        r = c.chat(messages, max_tokens=max_tokens, temperature=0)
    if as_json:
        _json(r)
        return
    print(r["choices"][0]["message"]["content"])
    u, k = r["usage"], r["kvnet"]
    err.print(f"prompt_tokens {u['prompt_tokens']}  cached_tokens {u['prompt_tokens_details']['cached_tokens']}  "
              f"source {k['source'] or '-'}  fetched {k['bytes_fetched']:,} bytes  "
              f"paid {k['price_paid']:,} {k['currency']}  est. prefill saved {k['prefill_s_saved_estimate']:.3f} s",
              highlight=False)


def fetch(socket: SocketOpt = DEFAULT_SOCKET,
          manifest: Annotated[str | None, typer.Option(help="Manifest id (64 hex digits).")] = None,
          prompt_file: Annotated[Path | None, typer.Option("--prompt-file", exists=True, dir_okay=False,
                                                           help="Fetch the longest prefix of this prompt.")] = None,
          as_json: JsonOpt = False) -> None:
    """Have the node fetch KV from the network (by manifest id, or a prompt's longest prefix)."""
    if (manifest is None) == (prompt_file is None):
        err.print("[red]error:[/red] give exactly one of --manifest or --prompt-file", highlight=False)
        raise typer.Exit(1)
    with _client(socket) as c:
        r = c.fetch(manifest) if manifest else c.fetch(text=read_text(prompt_file))
    if as_json:
        _json(r)
        return
    out.print(f"fetched {r['fetched']} pieces ({r['bytes']:,} bytes) of {r['manifest_id']} in {r['seconds']:.2f} s; "
              f"already had {r['already_had']}; paid {r['price_paid']:,} micro-units", highlight=False)


def ledger(socket: SocketOpt = DEFAULT_SOCKET, as_json: JsonOpt = False) -> None:
    """The node's ledger: what it paid and earned, per peer, publisher, manifest and channel."""
    with _client(socket) as c:
        r = c.ledger()
    if as_json:
        _json(r)
        return
    out.print(f"ledger of {(r['me'] or '-')[:16]}; amounts in micro-units", highlight=False)
    peers = Table("peer", "role", "currency", "channels", "receipts", "amount", "debtor", title="per peer")
    for p in r["peers"]:
        peers.add_row(p["peer"][:16], p["role"], p["currency"], str(p["channels"]), str(p["receipts"]),
                      f"{p['amount']:,}", "yes" if p["debtor"] else "")
    chans = Table("channel", "role", "payer", "payee", "currency", "seq", "cumulative",
                  title="latest receipt per channel")
    for ch in r["channels"]:
        chans.add_row(ch["channel"][:16], ch["role"], ch["payer"][:16], ch["payee"][:16], ch["currency"],
                      str(ch["seq"]), f"{ch['cumulative']:,}")
    mans = Table("manifest", "role", "kind", "bytes / loads", "amount", title="per manifest")
    for m in r["manifests"]:
        mans.add_row(m["manifest"][:16], m["role"], m["kind"], f"{m['units']:,}", f"{m['amount']:,}")
    for t in (peers, chans, mans):
        out.print(t)
    for d in r["debtors"]:
        out.print(f"debtor {d['peer'][:16]}: owes {d['owed']:,} {d['currency']} ({d['reason']})", highlight=False)


def register(app: typer.Typer, group_cls: type, log_level_option: Any) -> None:
    """Add the `node` group to the `kvnet` app (`log_level_option`: the app's --log-level annotation)."""
    node_app = typer.Typer(cls=group_cls, no_args_is_help=True, help="Talk to a running kvnet-node.")

    def _node(log_level="warning") -> None:
        """Talk to a running kvnet-node through its agent socket (docs/agent-api.md)."""

    _node.__annotations__ = {"log_level": log_level_option, "return": None}  # the app's own option object
    node_app.callback()(_node)
    for fn in (status, peers, ls, publish, ask, fetch, ledger):
        node_app.command(fn.__name__)(fn)
    app.add_typer(node_app, name="node")
