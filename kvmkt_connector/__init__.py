"""kvmkt-connector: a KV cache marketplace for vLLM.

One vLLM instance imports prefix KV that a neighbour on the same node already computed,
instead of recomputing it. See README.md for the user guide and the architecture.
"""

__version__ = "0.1.0"

# The name vLLM's kv_transfer_config uses, and where the class lives.
CONNECTOR_NAME = "MarketplaceConnector"
CONNECTOR_MODULE = "kvmkt_connector.connector.facade"
