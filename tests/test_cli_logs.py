"""kvnet.logs: one stderr handler, libp2p quiet unless asked, repeated messages rate-limited."""

from __future__ import annotations

import logging

import pytest

from kvnet import logs


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _record(msg: str, *args: object, name: str = "libp2p.swarm", level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_message_passes_once_per_interval_with_a_count():
    clock = FakeClock()
    f = logs.RateLimitFilter(interval=5.0, clock=clock)
    assert f.filter(_record("dial to %s failed", "peerA"))
    for peer in ("peerB", "peerC", "peerD"):  # same format string, other peers: held back
        clock.t += 1
        assert not f.filter(_record("dial to %s failed", peer))
    assert f.filter(_record("another message"))  # a different message is not affected
    assert f.filter(_record("dial to %s failed", "peerA", level=logging.ERROR))  # nor another level
    clock.t += 5
    rec = _record("dial to %s failed", "peerE")
    assert f.filter(rec)
    assert "3 similar messages suppressed" in rec.getMessage() and "peerE" in rec.getMessage()
    clock.t += 1
    assert not f.filter(_record("dial to %s failed", "peerF"))


def test_setup_installs_one_handler_and_quiets_libp2p_after_its_import(capsys):
    import libp2p  # noqa: F401 - importing it resets its logger: setup must run after

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("warning")
        logs.setup()  # again, as the CLI does after importing the network code
        ours = [h for h in root.handlers if isinstance(h, logs._Handler)]
        assert len(ours) == 1
        lib = logging.getLogger("libp2p")
        assert lib.getEffectiveLevel() == logging.CRITICAL and lib.propagate and not lib.handlers
        assert logs.current() == "warning"
        logging.getLogger("libp2p.kad_dht").warning("spurious DHT warning")
        logging.getLogger("libp2p.transport.tcp").error("failed dial to a departed peer")
        chatty = logging.getLogger("libp2p.network.auto_connector")
        chatty.setLevel(logging.INFO)  # as libp2p does itself, after setup
        chatty.info("AUTO_CONNECTOR_STATE chatter")
        logging.getLogger("kvnet.test").warning("a kvnet warning")
        err = capsys.readouterr().err
        assert "a kvnet warning" in err and "spurious" not in err and "departed" not in err and "chatter" not in err

        logs.setup("debug")
        assert lib.getEffectiveLevel() == logging.DEBUG and root.level == logging.DEBUG
        logs.setup("info")
        assert root.level == logging.INFO and lib.getEffectiveLevel() == logging.ERROR
        logs.setup("error")
        assert root.level == logging.ERROR and lib.getEffectiveLevel() == logging.CRITICAL
        with pytest.raises(ValueError, match="one of debug, info, warning, error"):
            logs.setup("loud")
    finally:
        logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)
        for h in [h for h in root.handlers if isinstance(h, logs._Handler)]:
            root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logs._level = logs.DEFAULT_LEVEL
