"""``kv_connector_extra_config`` keys of MarketplaceConnector, with their defaults.

Every key is optional; README.md documents each one. Unknown keys and wrong types are
rejected at startup with a message naming the key, so a typo never silently disables sharing.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

_VLLM_MEDIA = frozenset({"GPU", "CPU"})  # vLLM's own KV events' media (any case)


class MarketplaceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Registry: where instances meet. None -> $KVMKT_REGISTRY_SOCKET, $XDG_RUNTIME_DIR/kvmkt/
    # registry.sock or /tmp/kvmkt-<uid>/registry.sock. Started on demand unless disabled.
    registry_socket: str | None = None
    registry_autostart: bool = True
    registry_timeout_ms: int = 1000
    # How long to stay away from an unreachable registry before trying again.
    registry_retry_s: float = 5.0
    # How often the scheduler collects pages the registry let go (ms).
    registry_sync_interval_ms: int = 200

    # What this instance does; kv_role narrows it further (producer: export, consumer: import).
    enable_import: bool = True
    enable_export: bool = True
    # Name shown by `kvmkt status`; default: "<host>:<pid>/<engine id prefix>".
    instance_name: str | None = None

    # Import policy.
    min_import_tokens: int = 32  # smaller matches are recomputed (not worth a round trip)
    # How long the registry keeps leased entries listed for us (leases only steer: pages
    # are checked by their tag after every copy).
    lease_ttl_s: float = 30.0

    # Transport: "auto" picks cuda_ipc between GPUs with peer access, else host_shm.
    transport: Literal["auto", "host_shm", "cuda_ipc"] = "auto"
    # host_shm: bytes of the export region per worker; None: room for every block of the
    # KV cache. Either way capped at half the free space of /dev/shm when it is created.
    host_region_bytes: int | None = None

    # KV events (with vLLM's kv_events_config on): announce blocks neighbours offer that this
    # instance can import, under this medium (llm-d: a device tier); None or "": do not.
    kv_events_medium: str | None = "KVMKT"
    kv_events_max_blocks: int = 16_384  # blocks known/announced at most
    kv_events_interval_ms: int = 1000  # how often the registry's offer feed is read

    # Testing only: let requests ask for corrupted imports (negative controls).
    allow_fault_injection: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("registry_timeout_ms", self.registry_timeout_ms > 0),
            ("registry_retry_s", self.registry_retry_s >= 0),
            ("registry_sync_interval_ms", self.registry_sync_interval_ms >= 0),
            ("min_import_tokens", self.min_import_tokens >= 1),
            ("lease_ttl_s", self.lease_ttl_s > 0),
            ("host_region_bytes", self.host_region_bytes is None or self.host_region_bytes >= 0),
            ("kv_events_max_blocks", self.kv_events_max_blocks >= 1),
            ("kv_events_interval_ms", self.kv_events_interval_ms >= 10),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"invalid kv_connector_extra_config value for {', '.join(bad)}")
        if (self.kv_events_medium or "").upper() in _VLLM_MEDIA:
            # A router keys entries by (pod, medium): our BlockRemoved would delete the
            # instance's own cache entries there.
            raise ValueError(
                f"kv_events_medium {self.kv_events_medium!r} is one of vLLM's own media "
                f"({', '.join(sorted(_VLLM_MEDIA))}, any case): pick another, e.g. \"KVMKT\""
            )

    def retry_delay(self, failed_after_s: float) -> float:
        """Wait before the next registry attempt: a moment if the failed one took no time
        (nothing listens: a restarted registry is used at once), else ``registry_retry_s``
        (a registry that answers slowly must not cost a timeout per request)."""
        fast = failed_after_s < min(0.05, self.registry_timeout_ms / 2000)
        return min(0.2, self.registry_retry_s) if fast else self.registry_retry_s

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> MarketplaceConfig:
        try:
            return msgspec.convert(extra or {}, cls, strict=False)
        except (msgspec.ValidationError, ValueError) as e:
            raise ValueError(f"MarketplaceConnector: bad kv_connector_extra_config: {e}") from e


def describe_defaults() -> dict[str, Any]:
    """Key -> default (the table in README.md lists the same)."""
    return msgspec.structs.asdict(MarketplaceConfig())
