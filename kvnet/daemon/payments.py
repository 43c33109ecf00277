"""The daemon's payment hook: spending limits before a fetch, the price actually paid after it.

The node's p2p layer does the paying (kvnet.p2p.billing: a `Payer` over the node's ledger signs
hosting receipts for verified pieces and the load's license receipt, docs/payments.md). This hook is
what the agent socket sees of it:

- `before_fetch` runs the p2p layer's own check (`Payer.start`: the node's spending limits against
  each provider's quoted fee and the manifest's license price, provider choice included) before any
  byte moves, so a fetch no provider can be paid for within the limits is refused with
  `SpendingLimitError` naming the limit; the agent socket answers it as HTTP 402
  (docs/agent-api.md, "Payments"). It returns a ledger mark.
- `after_fetch` reads back from the ledger what this node signed for that manifest since the mark
  (hosting and license lines of its own receipts): the response's `kvnet.price_paid` is what the
  receipts say, not an estimate. The service runs one fetch of a manifest at a time, so the sum
  belongs to this fetch alone.

A node whose host fee is 0 and whose peers charge nothing simply pays 0: there is no special
"payments off" mode.
"""

from __future__ import annotations

from typing import Protocol

import trio

from kvnet.ledger import Ledger
from kvnet.p2p.fetcher import FetchResult
from kvnet.p2p.node import Found, Node

__all__ = ["PaymentHook", "LedgerPayments"]


class PaymentHook(Protocol):
    async def before_fetch(self, found: Found, n_tokens: int) -> int: ...
    async def after_fetch(self, found: Found, result: FetchResult | None, mark: int) -> int: ...


class LedgerPayments:
    """The hook over a node's Payer and ledger (the default of every kvnet-node)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ledger: Ledger = node.ledger
        self.currency = node.payer.limits.currency

    async def before_fetch(self, found: Found, n_tokens: int) -> int:
        """Refuse (SpendingLimitError) a fetch over a limit, before any byte moves; else a ledger mark."""
        sm = found.signed
        needed = sm.manifest.pieces_for_tokens(n_tokens)
        n_bytes = sum(sm.manifest.piece_len(i) for i in needed)
        # the same check node.fetch makes again (the day's spending may change in between); no side effects
        self.node.payer.start(sm, found.providers, n_bytes, self.node.scores)
        return await trio.to_thread.run_sync(self.ledger.mark)

    async def after_fetch(self, found: Found, result: FetchResult | None, mark: int) -> int:
        """Micro-units of this node's currency signed for `found`'s manifest since `mark` (`result` is
        None after a failed fetch: the pieces that verified were paid all the same)."""
        paid = await trio.to_thread.run_sync(self.ledger.signed_since, mark, found.signed.id)
        return paid.get(self.currency, 0)
