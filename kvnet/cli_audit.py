"""`kvnet audit`: audit a stored artifact's blocks against a prompt, and verify fraud proofs offline.

    kvnet audit ID --prompt-file F [--blocks N | --all] [--json]
    kvnet audit verify PROOF [--pieces DIR-or-home] [--json]

Neither needs a running node. A block that fails in the producer's own profile yields a fraud proof,
written under <home>/proofs/ (docs/audits.md). Registered as a sub-app by kvnet/cli.py; every
KvnetError raised here becomes one `error:` line there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from kvnet.errors import InputError
from kvnet.tokenizer import read_text

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # one block, one line, whatever the width
DEFAULT_HOME = Path(os.environ.get("KVNET_HOME", Path.home() / ".kvnet"))


class _AuditGroup(TyperGroup):
    """`kvnet audit ID ...` runs the `run` command; `kvnet audit verify ...` the `verify` command (a
    manifest id is hex, so it is never a command's name)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and args[0] not in self.commands:
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


audit_app = typer.Typer(cls=_AuditGroup, no_args_is_help=True, add_completion=False,
                        help="Audit artifacts' blocks and verify fraud proofs, with no node running "
                             "(docs/audits.md): `kvnet audit ID --prompt-file F [--blocks N | --all]` "
                             "(short for `kvnet audit run ID ...`), `kvnet audit verify PROOF`.")

def _log_level(value: str) -> str:
    from kvnet import logs

    try:
        logs.setup(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


LogLevel = Annotated[str, typer.Option("--log-level", envvar="KVNET_LOG_LEVEL", callback=_log_level, is_eager=True,
                                       help="Log detail on stderr: debug, info, warning or error.")]


@audit_app.callback()
def _audit(log_level: LogLevel = "warning") -> None:
    """Audit artifacts' blocks and verify fraud proofs, with no node running (docs/audits.md)."""


Home = Annotated[Path, typer.Option("--home", envvar="KVNET_HOME", help="Node directory: key and store.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; messages stay on stderr.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="The producer's model: local HF folder, or tiny / "
                                        "qwen3-0.6b-shape / qwen3-4b-shape.")]


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2))


def _engine(model: str, dtype: str, attn: str | None):
    """An engine; `attn` switches its attention kernel (another compute profile, for cross-profile audits)."""
    from kvnet.engine import Engine, compute_profile
    from kvnet.errors import KvnetError

    try:
        with console.status(f"loading model {model} ({dtype})"):
            engine = Engine(model, dtype)
        if attn is not None and attn != engine.profile["attn"]:
            engine.model.set_attn_implementation(attn)
            engine.profile = compute_profile(attn)
    except KvnetError:
        raise
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        # transformers raises these for a folder that is not a usable Qwen3 checkpoint or an unknown kernel
        raise InputError(f"cannot load model {model!r} ({dtype}, attention {attn or 'default'}): "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    return engine


def _print_report(report) -> None:
    for b in report.blocks:
        style = "green" if b.passed else "red"
        out.print(f"block {b.block:>4}  tokens {b.start}..{b.end - 1}  [{style}]{b.verdict}[/{style}]  "
                  f"max |diff| {b.max_abs:.3g}  rel {b.rel:.3g} (tolerance {b.tolerance:.3g})"
                  + (f"  first differing layer {b.first_layer}" if b.first_layer is not None else ""),
                  highlight=False)
    where = "the producer's profile" if report.same_profile else "another compute profile than the producer's"
    out.print(f"{len(report.blocks)} of {report.covered} covered blocks audited ({report.total_blocks} in the "
              f"artifact), in {where}", highlight=False)


@audit_app.command("run")
def run(
    ident: Annotated[str, typer.Argument(help="Manifest id or unique hex prefix of one.")],
    prompt_file: Annotated[Path, typer.Option("--prompt-file", exists=True, dir_okay=False,
                                              help="UTF-8 text whose tokens start with the artifact's document.")],
    model: ModelOpt,
    home: Home = DEFAULT_HOME,
    blocks: Annotated[int, typer.Option("--blocks", min=0, help="Random blocks to audit besides the last "
                                                                  "covered one (>= 0).")] = 1,
    all_blocks: Annotated[bool, typer.Option("--all", help="Audit every covered block.")] = False,
    block: Annotated[list[int] | None, typer.Option("--block", min=0, help="Audit this block (repeatable).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Run dtype (default: the artifact's).")] = None,
    attn: Annotated[str | None, typer.Option("--attn", help="Attention kernel: sdpa or eager (default: the "
                                                            "model's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random block choice.")] = None,
    proof_dir: Annotated[Path | None, typer.Option("--proof-dir", file_okay=False,
                                                   help="Where fraud proofs go (default <home>/proofs).")] = None,
    as_json: JsonOpt = False,
    log_level: LogLevel = "warning",
):
    """Recompute blocks of artifact ID from its own earlier blocks and compare; exit 1 if any fails."""
    from kvnet import audit
    from kvnet.store import Store

    text = read_text(prompt_file)
    with Store(home / "store", read_only=True) as store:
        mid = store.resolve_id(ident)
        sm = store.get_manifest(mid)
        engine = _engine(model, dtype or sm.manifest.dtype, attn)
        prompt = engine.tokenizer.encode(text)
        report = audit.audit(engine, sm, prompt, lambda i: store.read_piece(mid, i, verify=False),
                             blocks=block, n_random=blocks, all_blocks=all_blocks,
                             rng=random.Random(seed) if seed is not None else None)
    proofs = _write_proofs(sm, report, prompt, proof_dir or home / "proofs") if report.same_profile else []
    if as_json:
        _emit({**report.to_json(), "proofs": [str(p) for p in proofs]})
    else:
        _print_report(report)
    for p in proofs:
        console.print(f"fraud proof written to {p} (check it with `kvnet audit verify {p}`)", markup=False,
                      highlight=False)
    report.raise_for_failure()


def _write_proofs(sm, report, prompt: list[int], folder: Path) -> list[Path]:
    """One proof per block that failed in the producer's profile, named <manifest id>.<block>.kvproof."""
    from kvnet import fraud

    paths = []
    for b in report.failed:
        raw = fraud.build_proof(sm, b, prompt)
        path = folder / f"{sm.id.hex()}.{b.block}.kvproof"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, path)
        except OSError as exc:
            raise InputError(f"cannot write the fraud proof {path}: {exc.strerror or exc}") from exc
        paths.append(path)
    return paths


@audit_app.command("verify")
def verify(
    proof_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A fraud proof file.")],
    model: ModelOpt,
    pieces: Annotated[Path | None, typer.Option("--pieces", file_okay=False, help="The artifact's pieces: a kvnet "
                                                "home, a store, or a folder of files named by their BLAKE3 hex "
                                                "(default: --home).")] = None,
    home: Home = DEFAULT_HOME,
    as_json: JsonOpt = False,
    log_level: LogLevel = "warning",
):
    """Check a fraud proof: the signature, the tokens' chain keys, then the recomputation; exit 1 if it is
    rejected (the error names the rule)."""
    from kvnet import fraud

    try:
        raw = proof_file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {proof_file}: {exc.strerror or exc}") from exc
    proof = fraud.check_proof(raw)  # the torch-free rules first: a malformed proof costs no model load
    read, close = fraud.pieces_reader(proof.signed, pieces or home)
    try:
        engine = _engine(model, proof.signed.manifest.dtype, proof.signed.manifest.profile.get("attn"))
        v = fraud.verify_proof(raw, engine, read)
    finally:
        close()
    summary = {"ok": True, "proof_id": proof.id.hex(), "manifest_id": proof.manifest_id.hex(), "block": proof.block,
               "publisher": proof.signed.manifest.publisher.hex(), "max_abs": v.max_abs, "rel": v.rel,
               "tolerance": v.tolerance, "first_layer": v.first_layer}
    if as_json:
        _emit(summary)
        return
    out.print(f"proof valid: block {proof.block} of {proof.manifest_id.hex()} is not the KV of its tokens "
              f"(rel {v.rel:.3g} > tolerance {v.tolerance:.3g}); publisher {summary['publisher']}",
              highlight=False)


# -- the node policy in `kvnet generate` (kvnet/cli.py) ------------------------------------------------


class GenerateAudit:
    """`kvnet generate`'s audit of the prefix it loaded (docs/audits.md, "The node policy").

    `loaded` queues the audit on the BackgroundAuditor's thread and returns at once, so the answer is
    printed without waiting; `finish` waits for it (after the answer), then acts on a fraud found: the
    proof is written to <home>/proofs/ (a `kvnet serve` or kvnet-node on this home signs it and puts it
    in the DHT), the manifest is refused (kvnet.refusals: persisted, its publisher scored down) and
    removed from the store. One line on stderr says what the audit found."""

    def __init__(self, engine: Any, home: Path, blocks: int) -> None:
        from kvnet.audit import BackgroundAuditor

        self.home, self.proofs = home, []
        self.auditor = BackgroundAuditor(engine, home / "store", n_random=blocks, on_proof=self.proofs.append)

    def loaded(self, manifest_id: bytes, prompt: list[int]) -> None:
        self.auditor.loaded(manifest_id, prompt)

    def finish(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the audit, act on its proofs; a summary for the JSON answer."""
        done = self.auditor.drain(timeout)
        self.auditor.close()
        refused = [self._refuse(raw) for raw in self.proofs]
        for r in self.auditor.reports:
            bad = [b.block for b in r.failed]
            verdict = f"FAILED blocks {bad}" if bad else "passed"
            console.print(f"audit of {r.manifest_id.hex()[:16]}: blocks {[b.block for b in r.blocks]} {verdict}"
                          f" (worst rel {max((b.rel for b in r.blocks), default=0.0):.3g})", markup=False,
                          highlight=False)
        for exc in self.auditor.errors:
            console.print(f"audit could not run: {exc}", markup=False, highlight=False)
        for path in refused:
            console.print(f"artifact refused; fraud proof written to {path}", markup=False, highlight=False)
        return {"done": done, "reports": [r.to_json() for r in self.auditor.reports],
                "errors": [str(e) for e in self.auditor.errors], "proofs": [str(p) for p in refused]}

    def _refuse(self, raw: bytes) -> Path:
        from kvnet import fraud
        from kvnet.refusals import FILENAME, Refusals
        from kvnet.store import NotFoundError, Store

        proof = fraud.check_proof(raw)
        path = fraud.write_proof(self.home / "proofs", raw)
        refusals = Refusals(self.home / FILENAME)
        try:
            refusals.refuse(proof.manifest_id, proof.signed.manifest.publisher, proof.id, proof.block)
        finally:
            refusals.close()
        with Store(self.home / "store") as store, contextlib.suppress(NotFoundError):
            store.delete(proof.manifest_id, force=True)
        return path
