"""The measurements behind the audit tolerances (docs/audits.md, "Tolerances").

    .venv/bin/python -m bench.audit_tolerance [--model tiny] [--tokens 1024] [--block-size 256]

For every producer/auditor pair of compute profiles (bf16 and fp32, SDPA and eager attention): the
producer prefills a seeded document in one pass (as `kvnet publish` does); the auditor recomputes every
block on top of the producer's own earlier blocks (as `kvnet audit` does); the table gives the worst
`rel` and `max_abs` over the blocks (kvnet.audit's definitions) and how many blocks were bitwise equal.
Then the same for two forgeries (block 2 from another text; one token of block 2 changed), and whether
a block-by-block producer audits bitwise. One engine per dtype, its attention switched in place.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvnet import audit
from kvnet.engine import DTYPES, KV, Engine
from tests.conftest import random_tokens

PROFILES = [("bf16", "sdpa"), ("bf16", "eager"), ("fp32", "sdpa"), ("fp32", "eager")]


def _blocks(kv: KV, start: int, end: int):
    return [(k[0, :, start:end], v[0, :, start:end]) for k, v in zip(kv.keys, kv.values, strict=True)]


def _cast(kv: KV, dtype: str) -> KV:
    return KV([k.to(DTYPES[dtype]) for k in kv.keys], [v.to(DTYPES[dtype]) for v in kv.values])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    n, bs = args.tokens, args.block_size
    engines = {d: Engine(args.model, d) for d in ("bf16", "fp32")}
    vocab = min(engines["bf16"].model.config.vocab_size, 150000)
    doc, other = random_tokens(n, seed=7, vocab=vocab), random_tokens(n, seed=8, vocab=vocab)

    def run(profile, tokens, kv=None):
        engine = engines[profile[0]]
        engine.model.set_attn_implementation(profile[1])
        return engine.prefill(tokens, kv=kv)

    spans = [(j * bs, min(n, (j + 1) * bs)) for j in range(-(-n // bs))]
    produced = {p: run(p, doc) for p in PROFILES}
    rows = []
    for prod in PROFILES:
        for aud in PROFILES:
            worst, exact = (0.0, 0.0), 0
            for s, e in spans:
                past = _cast(produced[prod].prefix(s), aud[0]) if s else None
                bitwise, _, _, max_abs, rel = audit._compare(_blocks(run(aud, doc[s:e], past), s, e),
                                                             _blocks(produced[prod], s, e))
                worst, exact = (max(worst[0], rel), max(worst[1], max_abs)), exact + bitwise
            rows.append({"producer": "-".join(prod), "auditor": "-".join(aud), "rel": worst[0],
                         "max_abs": worst[1], "bitwise_blocks": exact, "blocks": len(spans)})
    p = ("bf16", "sdpa")
    s, e = spans[2]
    past = produced[p].prefix(s)
    honest = _blocks(run(p, doc[s:e], past), s, e)
    changed = list(doc)
    changed[s + 5] = (changed[s + 5] + 1) % vocab
    forgeries = {name: audit._compare(honest, _blocks(run(p, toks[s:e], past), s, e))[3:]
                 for name, toks in (("block 2 from another text", other), ("one token of block 2 changed", changed))}
    kv = None
    for s, e in spans:
        kv = run(p, doc[s:e], kv)
    blockwise = all(audit._compare(_blocks(run(p, doc[s:e], KV([k.clone() for k in kv.prefix(s).keys],
                                                                 [v.clone() for v in kv.prefix(s).values])
                                                   if s else None), s, e), _blocks(kv, s, e))[0]
                    for s, e in spans)
    print(f"{args.model}, {n} tokens in blocks of {bs}, {torch.get_num_threads()} threads")
    print(f"{'producer':>11} -> {'auditor':<11} {'rel':>9} {'max_abs':>9}  bitwise blocks")
    for r in rows:
        print(f"{r['producer']:>11} -> {r['auditor']:<11} {r['rel']:>9.3g} {r['max_abs']:>9.3g}  "
              f"{r['bitwise_blocks']}/{r['blocks']}")
    for name, (max_abs, rel) in forgeries.items():
        print(f"forgery, {name}: rel {rel:.3g}, max_abs {max_abs:.3g}")
    print(f"block-by-block producer audits bitwise: {blockwise}")
    print(json.dumps({"model": args.model, "tokens": n, "block_size": bs, "pairs": rows,
                      "forgeries": {k: {"max_abs": v[0], "rel": v[1]} for k, v in forgeries.items()},
                      "blockwise_bitwise": blockwise}))


if __name__ == "__main__":
    main()
