"""KV connectors: KV blocks saved to and loaded from outside the engine (``--kv-transfer-config``,
docs/kv_transfer.md)."""

from tessellm.kv_transfer.base import (KVConnectorBase, KVConnectorContext, KVConnectorRole,
                                       KVConnectorStats)
from tessellm.kv_transfer.config import KVTransferConfig, parse_kv_transfer_config
from tessellm.kv_transfer.registry import connector_names, make_connector, register_kv_connector

__all__ = ["KVConnectorBase", "KVConnectorContext", "KVConnectorRole", "KVConnectorStats",
           "KVTransferConfig", "connector_names", "make_connector", "parse_kv_transfer_config",
           "register_kv_connector"]
