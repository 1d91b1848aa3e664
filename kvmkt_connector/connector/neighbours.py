"""Says once per neighbour why this instance does not share KV with it: the user's first
question when nothing is imported. Every ``interval_s`` the registry's holders are listed,
and each one whose namespace differs from ours gets one warning naming what differs
(model, dtype, layout, ...), and counts as ``fallback_incompatible``."""

from __future__ import annotations

import time

import msgspec

from kvmkt_connector.compat import CompatFingerprint
from kvmkt_connector.connector.registry_link import RegistryLink
from kvmkt_connector.logs import get_logger
from kvmkt_connector.metrics import MarketplaceStats
from kvmkt_connector.registry.client import PendingReply

logger = get_logger(__name__)


class NeighbourCheck:
    def __init__(self, link: RegistryLink, stats: MarketplaceStats, interval_s: float = 10.0
                 ) -> None:  # fmt: skip
        self._link, self._stats, self._interval_s = link, stats, interval_s
        self._fp: CompatFingerprint | None = None  # ours, once the workers' layout is known
        self._namespace = b""
        self._warned: set[int] = set()  # holder ids
        self._next = 0.0
        self._asked: tuple[int, PendingReply] | None = None  # (link epoch, reply)

    def start(self, fp: CompatFingerprint, namespace: bytes) -> None:
        """Our fingerprint is known: check now (waiting for the answer, at start-up)."""
        self._fp, self._namespace = fp, namespace
        self.check(wait=True)

    def due(self) -> bool:
        return self._fp is not None and (self._asked is not None
                                         or time.monotonic() >= self._next)

    def check(self, wait: bool = False) -> None:
        """In vLLM's steps (not ``wait``) the question is posted, and its answer read in a
        later step once it is in: waited for, a registry busy with a large publish held the
        scheduler thread for up to 18 ms (session 11, GPU)."""
        if wait:
            self._next = time.monotonic() + self._interval_s
            self._warn_about(self._link.call(lambda c: c.list_holders()))
            return
        if self._asked is None:
            self._next = time.monotonic() + self._interval_s
            posted = self._link.call(lambda c: c.post_list_holders())
            if posted is not None:
                self._asked = (self._link.epoch, posted)
            return
        epoch, pending = self._asked
        if epoch != self._link.epoch or not self._link.connected:
            self._asked = None  # (that connection is gone: ask again when due)
        elif self._link.ready(pending):
            self._asked = None
            reply = self._link.result(pending)
            self._warn_about(reply.holders if reply is not None else None)

    def _warn_about(self, holders: list | None) -> None:
        for h in holders or ():
            if h.namespace == self._namespace or h.holder_id in self._warned:
                continue
            self._warned.add(h.holder_id)
            self._stats.count("fallback_incompatible")
            try:
                theirs = msgspec.msgpack.decode(h.fingerprint, type=CompatFingerprint)
                diff = self._fp.describe_differences(theirs) if self._fp else "?"
            except msgspec.DecodeError:
                diff = "an unreadable fingerprint (other kvmkt version?)"
            logger.warning(
                "kvmkt: not sharing KV with %s (pid %d): not interchangeable: %s",
                h.name, h.pid, diff,
            )
