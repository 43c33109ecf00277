"""The network layer: libp2p hosts, the kvnet DHT, the offer and pieces protocols, and the fetcher.

Built on py-libp2p (trio). Everything here sits above `store` and `artifact`: what peers send is
verified against signed manifests before it is stored or loaded.
"""
