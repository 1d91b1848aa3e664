"""Every hook the facade wraps in _timed passes its arguments and returns its result the
same way with hook timing on (KVMKT_TRACE=hooks) and off, and exceptions still propagate."""

from __future__ import annotations

import logging

import pytest

from kvmkt_connector.connector.facade import MarketplaceConnector
from kvmkt_connector.logs import HookTimes


class _Rec:
    """Records calls; returns a distinct sentinel per method."""

    def __init__(self, out):
        self.calls, self._out = [], out

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def f(*a, **k):
            self.calls.append((name, a, k))
            if name == "last_wait_ns":
                return 123
            return self._out[name]
        return f


class _Blocks:
    def get_block_ids(self):
        return ([4, 5, 6],)


def _connector(monkeypatch, on, role):
    monkeypatch.delenv("KVMKT_PROFILE", raising=False)
    monkeypatch.setenv("KVMKT_TRACE", "hooks" if on else "0")
    c = MarketplaceConnector.__new__(MarketplaceConnector)
    c._hooks = HookTimes(logging.getLogger("t"), role)
    assert c._hooks.enabled is on
    out = {"run_jobs": None, "get_finished": {"r1"}, "take_load_errors": {3, 4},
           "take_worker_meta": object(), "take_stats": object(),
           "get_num_new_matched_tokens": (32, True), "update_state_after_alloc": None,
           "build_connector_meta": object(), "update_connector_output": None,
           "request_finished": {"kvmkt": {"imported_tokens": 5}}, "take_events": [object()]}
    rec = _Rec(out)
    c._worker, c._scheduler = (rec, None) if role == "worker" else (None, rec)
    return c, rec, out


@pytest.mark.parametrize("on", [False, True])
def test_worker_hooks(monkeypatch, on):
    c, rec, out = _connector(monkeypatch, on, "worker")
    meta = object()
    monkeypatch.setattr(c, "_get_connector_metadata", lambda: meta, raising=False)
    from kvmkt_connector.connector import facade
    monkeypatch.setattr(facade, "MarketplaceConnectorMetadata", object)
    assert c.start_load_kv(object()) is None
    assert c.get_finished({"x"}) == (None, out["get_finished"])
    assert c.get_block_ids_with_load_errors() is out["take_load_errors"]
    assert c.build_connector_worker_meta() is out["take_worker_meta"]
    assert c.get_kv_connector_stats() is out["take_stats"]
    names = [(n, a, k) for n, a, k in rec.calls if n != "last_wait_ns"]
    assert names == [("run_jobs", (meta,), {}), ("get_finished", (), {}),
                     ("take_load_errors", (), {}), ("take_worker_meta", (), {}),
                     ("take_stats", (), {})]


@pytest.mark.parametrize("on", [False, True])
def test_scheduler_hooks(monkeypatch, on):
    c, rec, out = _connector(monkeypatch, on, "scheduler")
    req, so, co = object(), object(), object()
    assert c.get_num_new_matched_tokens(req, 16) == (32, True)
    assert c.update_state_after_alloc(req, _Blocks(), 48) is None
    assert c.update_state_after_alloc(req, _Blocks(), 0) is None
    assert c.build_connector_meta(so) is out["build_connector_meta"]
    assert c.update_connector_output(co) is None
    assert c.request_finished(req, [1, 2]) == (False, out["request_finished"])
    assert c.take_events() is out["take_events"]
    assert c.get_kv_connector_stats() is out["take_stats"]
    assert rec.calls == [
        ("get_num_new_matched_tokens", (req, 16), {}),
        ("update_state_after_alloc", (req, [4, 5, 6], 48), {}),
        ("update_state_after_alloc", (req, [4, 5, 6], 0), {}),  # (a sibling may load them)
        ("build_connector_meta", (so,), {}),
        ("update_connector_output", (co,), {}),
        ("request_finished", (req, [1, 2]), {}),
        ("take_events", (), {}),
        ("take_stats", (), {}),
    ]
    c._scheduler = None
    assert c.take_events() == ()


@pytest.mark.parametrize("on", [False, True])
def test_exceptions_propagate(monkeypatch, on):
    c, rec, out = _connector(monkeypatch, on, "scheduler")

    def boom(*a):
        raise KeyError("x")
    rec.__dict__["request_finished"] = boom
    with pytest.raises(KeyError):
        c.request_finished(object(), [])
