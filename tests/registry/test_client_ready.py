"""``RegistryClient.ready``: whether a posted request's reply is in, without ever waiting for
one that is not (vLLM's scheduler thread asks it every step while a question is out)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvmkt_connector.registry.client import RegistryClient
from kvmkt_connector.registry.errors import RegistryUnavailable


def test_ready_never_waits_and_tells_when_the_reply_is_in(registry):
    with RegistryClient.connect(registry.socket_path, client_name="t", autostart=False) as c:
        os.kill(registry.proc.pid, signal.SIGSTOP)  # a registry that cannot answer yet
        try:
            pending = c.post_list_holders()
            t0 = time.monotonic()
            for _ in range(100):
                assert not c.ready(pending)
            assert time.monotonic() - t0 < 0.5  # (it did not wait for the reply)
        finally:
            os.kill(registry.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not c.ready(pending):
            assert time.monotonic() < deadline, "the reply never came"
            time.sleep(0.01)
        assert pending.done
        assert c.ready(pending)
        assert pending.result().holders == []  # (no holder registered)


def test_ready_on_a_closed_connection_is_true_and_result_says_why(registry):
    c = RegistryClient.connect(registry.socket_path, client_name="t", autostart=False)
    pending = c.post_list_holders()
    c.close()
    assert c.ready(pending)
    with pytest.raises(RegistryUnavailable):
        pending.result()


def test_a_question_of_a_lost_connection_is_not_ready(registry):
    """The scheduler then drops it (and asks again when due) instead of reading it, which
    would count a registry fallback although no request fell back."""
    from kvmkt_connector.config import MarketplaceConfig
    from kvmkt_connector.connector.registry_link import RegistryLink
    from kvmkt_connector.metrics import MarketplaceStats

    stats = MarketplaceStats()
    link = RegistryLink(MarketplaceConfig(registry_socket=registry.socket_path,
                                          registry_autostart=False), "t", stats)
    pending = link.call(lambda c: c.post_list_holders())
    assert pending is not None and link.connected
    link._down("test: the registry went away")
    assert not link.connected and not link.ready(pending)
    assert "fallback_registry_unavailable" not in stats.data["c"]
    link.close()
