"""Protocol semantics: what each request does to the ``PrefixRegistry`` and what it answers.

Kept apart from the socket loop (``service``) so the rules of a connection's life (Hello
first, holders only for holder requests, errors that close) read in one place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from . import paths
from .index import PrefixRegistry
from .offers import OfferCatalog
from .protocol import (
    PROTOCOL_VERSION,
    ErrorReply,
    Hello,
    HelloReply,
    HolderAccepted,
    HolderList,
    Lease,
    LeaseChain,
    ListHolders,
    Lookup,
    LookupResult,
    NoMatch,
    OfferHolder,
    Offers,
    Ok,
    Publish,
    Published,
    Reclaim,
    Reclaimed,
    RegisterHolder,
    RegistryStatus,
    ReleaseLeases,
    Reply,
    Request,
    Status,
    Sync,
    Synced,
    Unpublish,
    Unpublished,
)
from .records import RequestRejected


class Session:
    """Protocol state of one connection; ``owner`` names it to the lease books (unique for
    the registry's lifetime: the leases it takes end when it closes)."""

    __slots__ = ("owner", "greeted", "client", "pid", "holder_id", "closing")

    def __init__(self, owner: int = 0) -> None:
        self.owner = owner
        self.greeted = False
        self.client = ""
        self.pid = 0
        self.holder_id: int | None = None
        self.closing = False  # the connection ends once this reply is sent


class RequestDispatcher:
    def __init__(
        self, registry: PrefixRegistry, lookup_table_path: str, offers: OfferCatalog | None = None
    ) -> None:
        self.registry = registry
        self.offers = offers if offers is not None else OfferCatalog()
        self._lookup_table_path = lookup_table_path
        self._started_at = time.monotonic()
        self._handlers: dict[type, Callable[[Session, Request], Reply]] = {
            Hello: self._on_hello, RegisterHolder: self._on_register, Publish: self._on_publish,
            Lookup: self._on_lookup, Lease: self._on_lease, LeaseChain: self._on_lease_chain, ReleaseLeases: self._on_release,
            Reclaim: self._on_reclaim, Unpublish: self._on_unpublish, Sync: self._on_sync,
            ListHolders: self._on_list_holders, Offers: self._on_offers, Status: self._on_status,
        }  # fmt: skip

    def handle(self, session: Session, request: Request) -> Reply:
        """The reply to ``request``; sets ``session.closing`` when the connection must end."""
        if not session.greeted and not isinstance(request, Hello):
            return ErrorReply(code="no_hello", message="send Hello first")
        try:
            return self._handlers[type(request)](session, request)
        except RequestRejected as exc:
            return ErrorReply(code=exc.code, message=exc.message)

    def _holder_id(self, session: Session) -> int:
        if session.holder_id is None:
            raise RequestRejected("not_holder", "this connection has not registered a holder")
        return session.holder_id

    def _on_hello(self, session: Session, req: Hello) -> Reply:
        if req.protocol_version != PROTOCOL_VERSION:
            session.closing = True
            return ErrorReply(
                code="bad_version",
                message=f"server speaks protocol {PROTOCOL_VERSION}, got {req.protocol_version}",
            )
        if session.greeted:
            raise RequestRejected("bad_request", "Hello was already sent on this connection")
        session.greeted, session.client, session.pid = True, req.client, req.pid
        return HelloReply(PROTOCOL_VERSION, os.getpid(), self._lookup_table_path)

    def _on_register(self, session: Session, req: RegisterHolder) -> Reply:
        if session.holder_id is not None:
            raise RequestRejected("bad_request", "this connection already is a holder")
        if req.pid <= 0:
            raise RequestRejected("bad_request", f"bad pid {req.pid}")
        bad = [p for p in req.cleanup_paths if not paths.is_holder_file(p)]
        if bad:
            # The registry unlinks these when the holder dies: only holder files
            # (paths.holder_file), never anything else.
            raise RequestRejected("bad_request", f"not a holder file: {bad[0]!r}")
        holder = self.registry.register_holder(
            namespace=req.namespace, name=req.name, pid=req.pid, fingerprint=req.fingerprint,
            descriptor=req.descriptor, cleanup_paths=req.cleanup_paths,
        )  # fmt: skip
        session.holder_id = holder.holder_id
        return HolderAccepted(holder.holder_id, holder.bit)

    def _on_publish(self, session: Session, req: Publish) -> Reply:
        holder_id = self._holder_id(session)
        self.offers.check(req.tokens, req.keys)
        accepted, released = self.registry.publish(holder_id, req.keys, req.locations, req.parents)
        if req.tokens:
            ns = self.registry.holder(holder_id).namespace
            self.offers.describe(ns, req.tokens, lambda key: self.registry.holder_bits(ns, key))
        return Published(accepted, released)

    def _on_lookup(self, session: Session, req: Lookup) -> Reply:
        holder_id, run = self.registry.longest_run(req.namespace, req.keys, _exclude(session, req))
        return LookupResult(holder_id, run)

    def _on_lease(self, session: Session, req: Lease) -> Reply:
        granted = self.registry.lease(
            req.namespace, req.keys, req.ttl_ms, req.min_blocks, _exclude(session, req),
            owner=session.owner,
        )  # fmt: skip
        return NoMatch() if granted is None else granted

    def _on_lease_chain(self, session: Session, req: LeaseChain) -> Reply:
        granted = self.registry.lease_chain(
            req.namespace, req.tail, req.blocks, req.ttl_ms, req.head_parent,
            _exclude(session, req), owner=session.owner,
        )  # fmt: skip
        return NoMatch() if granted is None else granted

    def _on_release(self, session: Session, req: ReleaseLeases) -> Reply:
        self.registry.release_leases(req.lease_ids)
        return Ok()

    def _on_reclaim(self, session: Session, req: Reclaim) -> Reply:
        return Reclaimed(self.registry.reclaim(self._holder_id(session), req.count))

    def _on_unpublish(self, session: Session, req: Unpublish) -> Reply:
        released, pending = self.registry.unpublish(self._holder_id(session), req.locations)
        return Unpublished(released, pending)

    def _on_sync(self, session: Session, req: Sync) -> Reply:
        return Synced(self.registry.sync(self._holder_id(session)))

    def _on_list_holders(self, session: Session, req: ListHolders) -> Reply:
        return HolderList(self.registry.holder_infos())

    def _on_offers(self, session: Session, req: Offers) -> Reply:
        feed = self.offers.read(req.namespace, req.feed_id, req.cursor, req.max_changes, req.after)
        feed.holders = [OfferHolder(h.bit, h.holder_id, h.descriptor)
                        for h in self.registry.holders() if h.namespace == req.namespace]
        return feed

    def _on_status(self, session: Session, req: Status) -> Reply:
        reg, counters = self.registry, self.registry.counters
        return RegistryStatus(
            server_pid=os.getpid(),
            uptime_s=time.monotonic() - self._started_at,
            capacity_blocks=reg.capacity_blocks,
            published_blocks=reg.published_blocks,
            active_leases=reg.active_leases,
            holders=reg.holder_infos(),
            lookups=counters.lookups,
            lease_requests=counters.lease_requests,
            leases_granted=counters.leases_granted,
            blocks_leased=counters.blocks_leased,
            blocks_released_lru=counters.blocks_released_lru,
            holders_lost=counters.holders_lost,
        )


def _exclude(session: Session, req: Lookup | Lease | LeaseChain) -> int | None:
    """The holder a lookup must skip: the one named in the request, else the caller's own."""
    return req.exclude_holder if req.exclude_holder is not None else session.holder_id
