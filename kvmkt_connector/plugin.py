"""vLLM general plugin: makes ``"kv_connector": "MarketplaceConnector"`` resolve by name.

vLLM runs every ``vllm.general_plugins`` entry point in the front end, in EngineCore and in
each worker, possibly several times per process; ``register_connector`` raises on a
duplicate name, hence the membership check.
"""

from kvmkt_connector import CONNECTOR_MODULE, CONNECTOR_NAME


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
