"""The daemon's payment hook: where receipts slot in once payments are wired (docs/payments.md).

The service calls `before_fetch` before it fetches KV for a request or a /v1/kv/fetch (raise a
`KvnetError`, e.g. `kvnet.ledger.SpendingLimitError`, to refuse: the request then prefills locally or
answers the error), and `after_fetch` once the pieces are stored, which returns what was paid (the
response's `kvnet.price_paid`). `NoPayments`, the default, pays nothing and refuses nothing. The
limits come from node.toml `[prices]` (`PricesConfig`).
"""

from __future__ import annotations

from typing import Protocol

from kvnet.daemon.config import PricesConfig
from kvnet.p2p.fetcher import FetchResult
from kvnet.p2p.node import Found


class PaymentHook(Protocol):
    def before_fetch(self, found: Found, n_tokens: int, prices: PricesConfig) -> None: ...
    def after_fetch(self, found: Found, result: FetchResult, prices: PricesConfig) -> int: ...


class NoPayments:
    """Until payments are wired: every transfer is free."""

    def before_fetch(self, found: Found, n_tokens: int, prices: PricesConfig) -> None:
        return None

    def after_fetch(self, found: Found, result: FetchResult, prices: PricesConfig) -> int:
        return 0
