"""Pins for kvnet.p2p.compat section 6 (provider lookups): fail as soon as a py-libp2p upgrade changes
what `providers_and_closers_from_peer` relies on."""

from __future__ import annotations

import inspect

from libp2p.kad_dht.provider_store import ProviderStore

from kvnet.p2p import compat


def test_get_providers_from_peer_returns_providers_and_closer_ids_and_swallows_errors():
    fn = ProviderStore._get_providers_from_peer_with_closers
    assert list(inspect.signature(fn).parameters)[1:3] == ["peer_id", "key"]
    src = inspect.getsource(fn)
    assert "return providers, closer_peers" in src  # (providers, closer peer ids)
    assert "return [], []" in src  # a failing peer looks like an empty answer: the lookup never trusts one
    assert "closer_peers.append(closer_id)" in src  # closer peers are IDs, not PeerInfos
    assert inspect.iscoroutinefunction(compat.providers_and_closers_from_peer)
