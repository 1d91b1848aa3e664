"""Node-local prefix registry: which vLLM instance on this node holds which KV blocks.

- ``protocol``: the wire messages (the contract); ``framing``: how they travel.
- ``index.PrefixRegistry``: the authoritative state machine (no I/O); ``leases`` keeps its
  leases within bounds, ``records`` its entries.
- ``service.RegistryServer``: the Unix-socket service around it (``dispatch``: what each
  request does; ``orphans``: files of dead holders).
- ``lookup_table``: the shared-memory table clients read for lookup hints without an RPC;
  ``lookup_writer``: the registry's side of it.
- ``client.RegistryClient`` and ``autostart.ensure_registry``: what instances use.
"""
